/*
 * router_smoke.c - single-threaded smoke test of the notification router
 * (csrc/pglf_router.c with its channel map, csrc/pglf_chanmap.c) over real
 * rings, meant for ASan/UBSan builds (scripts/sanitize.sh).  It needs no
 * database and no libpq: the read loop (pglf_pump / pglf_run) is not
 * linked; the test plays the selector thread and the consumers itself.
 *
 * Steps: channel attach (including bucket growth and fan-out), activation
 * with "listen"/"reconnect" markers, routing to inactive and active
 * targets, consumer wake-ups, a "drop" ring that overflows (dropped
 * notifications, owed "overflow" markers carrying the count), a "block"
 * ring that returns PGLF_BLOCKED and is drained with pglf_ring_drain()
 * until pglf_router_flush() returns PGLF_OK, payloads too large for a ring,
 * a marker owed while its ring is full, deactivation, and freeing
 * subscriptions and the router.  After each step the records in the rings
 * are checked kind by kind.
 *
 * Build (no libpq: the router never touches it, pglf_readloop.c does):
 *   gcc -std=c11 -D_GNU_SOURCE -I csrc csrc/tests/router_smoke.c \
 *       csrc/pglf_router.c csrc/pglf_chanmap.c csrc/pglf_ring.c -o router_smoke
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "pglf_router.h"

#define RING_CAP 4096
#define RESERVE 64
#define MAX_RECS 4096
#define NUM_ROUTED 2000
#define MANY_CHANNELS 300

static void fail(int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "router_smoke:%d: FAIL: ", line);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

#define CHECK(cond, ...)                     \
    do {                                     \
        if (!(cond))                         \
            fail(__LINE__, __VA_ARGS__);     \
    } while (0)

static void step(const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("router_smoke: %-12s ok (", name);
    vprintf(fmt, ap);
    printf(")\n");
    va_end(ap);
    fflush(stdout);
}

/* ------------------------------------------------------------------ */
/* records                                                              */

typedef struct batch {
    size_t n;
    const pglf_rec *rec[MAX_RECS];
    _Alignas(8) unsigned char buf[RING_CAP];
} batch;

/* Consumer: move everything out of `r` into `b` with pglf_ring_drain(). */
static void drain(pglf_ring *r, batch *b)
{
    size_t used = 0;
    b->n = pglf_ring_drain(r, b->buf, sizeof(b->buf), MAX_RECS, &used);
    size_t off = 0;
    for (size_t i = 0; i < b->n; i++) {
        const pglf_rec *h = (const pglf_rec *)(b->buf + off);
        CHECK(h->kind != PGLF_KIND_PAD, "drain returned a PAD record");
        b->rec[i] = h;
        off += (size_t)pglf_rec_size(h->len);
    }
    CHECK(off == used, "drain: %zu bytes reported, records span %zu", used, off);
    CHECK(pglf_ring_used(r) == 0, "ring not empty after drain (%zu bytes)",
          pglf_ring_used(r));
}

/* Payload of notification `seq`: "n%07u" then `len - 8` letters. */
static size_t make_payload(unsigned seq, size_t len, char *out)
{
    if (len < 8)
        len = 8;
    char head[16];
    snprintf(head, sizeof(head), "n%07u", seq % 10000000u);
    memcpy(out, head, 8);
    for (size_t i = 8; i < len; i++)
        out[i] = (char)('a' + (seq + i) % 26);
    return len;
}

/* Sequence number of a notification record, checking its payload. */
static unsigned seq_of(const pglf_rec *h, uint32_t chan)
{
    CHECK(h->kind == PGLF_KIND_NOTIFY, "expected a notification, got kind %u reason %u",
          h->kind, h->reason);
    CHECK(h->chan == chan, "notification on chan %u, expected %u", h->chan, chan);
    CHECK(h->len >= 8, "notification payload of %u bytes", h->len);
    const char *p = (const char *)h + PGLF_REC_HDR;
    char digits[8];
    memcpy(digits, p + 1, 7);
    digits[7] = '\0';
    CHECK(p[0] == 'n', "bad payload prefix");
    unsigned seq = (unsigned)strtoul(digits, NULL, 10);
    char expect[RING_CAP];
    make_payload(seq, h->len, expect);
    CHECK(memcmp(p, expect, h->len) == 0, "payload of seq %u corrupted", seq);
    CHECK(h->pid == (int32_t)seq, "pid %d, expected %u", h->pid, seq);
    return seq;
}

static void expect_marker(const pglf_rec *h, uint8_t reason, uint32_t chan)
{
    CHECK(h->kind == PGLF_KIND_MARKER && h->reason == reason && h->chan == chan &&
              h->pid == 0,
          "expected marker reason %u chan %u, got kind %u reason %u chan %u pid %d",
          reason, chan, h->kind, h->reason, h->chan, h->pid);
}

/* Count of an overflow marker. */
static uint64_t overflow_count(const pglf_rec *h, uint32_t chan)
{
    expect_marker(h, PGLF_REASON_OVERFLOW, chan);
    CHECK(h->len == 8, "overflow marker payload of %u bytes", h->len);
    uint64_t n;
    memcpy(&n, (const char *)h + PGLF_REC_HDR, 8);
    CHECK(n > 0, "overflow marker with a zero count");
    return n;
}

/* ------------------------------------------------------------------ */
/* fds                                                                  */

static int new_eventfd(void)
{
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(fd >= 0, "eventfd: %s", strerror(errno));
    return fd;
}

/* 1 if `fd` is signalled (and clear it), else 0. */
static int take_signal(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc = poll(&p, 1, 0);
    CHECK(rc >= 0, "poll: %s", strerror(errno));
    if (rc == 0)
        return 0;
    pglf_fd_clear(fd);
    return 1;
}

static int route(pglf_router *r, const char *chan, unsigned seq, size_t len)
{
    char buf[RING_CAP * 2];
    len = make_payload(seq, len, buf);
    return pglf_route(r, chan, strlen(chan), (int32_t)seq, buf, len);
}

/* ------------------------------------------------------------------ */

int main(void)
{
    static batch ba, bb;
    int ca = new_eventfd(), pa = new_eventfd(), cb = new_eventfd(),
        pb = new_eventfd();
    pglf_ring *ring_a = pglf_ring_new(RING_CAP, ca, ca, pa);   /* "drop" */
    pglf_ring *ring_b = pglf_ring_new(RING_CAP, cb, cb, pb);   /* "block" */
    pglf_ring *ring_c = pglf_ring_new(1 << 16, -1, -1, -1);    /* many channels */
    CHECK(ring_a && ring_b && ring_c, "pglf_ring_new failed");

    pglf_router *router = pglf_router_new();
    CHECK(router != NULL, "pglf_router_new failed");
    CHECK(pglf_sub_new(router, ring_a, 0, 0, RESERVE) == NULL,
          "a subscription without channels was accepted");
    pglf_sub *sa = pglf_sub_new(router, ring_a, 2, 0, RESERVE);
    pglf_sub *sb = pglf_sub_new(router, ring_b, 1, 1, RESERVE);
    CHECK(sa && sb, "pglf_sub_new failed");

    /* -- attach ------------------------------------------------------- */
    CHECK(pglf_sub_attach(router, sa, 0, "alpha", 5) == PGLF_OK, "attach alpha");
    CHECK(pglf_sub_attach(router, sa, 1, "beta", 4) == PGLF_OK, "attach beta");
    CHECK(pglf_sub_attach(router, sb, 0, "alpha", 5) == PGLF_OK, "attach alpha (b)");
    CHECK(pglf_sub_attach(router, sa, 1, "gamma", 5) == PGLF_EINVAL,
          "index attached twice");
    CHECK(pglf_sub_attach(router, sa, 2, "gamma", 5) == PGLF_EINVAL,
          "index out of range");
    /* Names are byte strings: embedded NULs and prefixes are distinct. */
    pglf_sub *sc = pglf_sub_new(router, ring_c, MANY_CHANNELS + 2, 0, RESERVE);
    CHECK(sc != NULL, "pglf_sub_new (many)");
    char name[32];
    for (unsigned i = 0; i < MANY_CHANNELS; i++) {
        int len = snprintf(name, sizeof(name), "chan-%u", i);
        CHECK(pglf_sub_attach(router, sc, i, name, (size_t)len) == PGLF_OK,
              "attach %s", name);
    }
    CHECK(pglf_sub_attach(router, sc, MANY_CHANNELS, "a\0b", 3) == PGLF_OK, "attach a\\0b");
    CHECK(pglf_sub_attach(router, sc, MANY_CHANNELS + 1, "chan-1", 6) == PGLF_OK,
          "attach chan-1 twice");
    step("attach", "%u channels over 3 subscriptions", MANY_CHANNELS + 5);

    /* -- inactive targets get nothing -------------------------------- */
    CHECK(route(router, "alpha", 0, 20) == PGLF_OK, "route to inactive");
    CHECK(route(router, "nobody", 0, 20) == PGLF_OK, "route to unknown channel");
    CHECK(pglf_ring_used(ring_a) == 0 && pglf_ring_used(ring_b) == 0,
          "inactive targets received records");
    CHECK(pglf_sub_state(sa, 0) == 0 && pglf_sub_state(sa, 7) == 0, "state before activate");
    CHECK(pglf_router_received(router) == 2, "received %" PRIu64,
          pglf_router_received(router));
    step("inactive", "2 notifications routed, none written");

    /* -- activation writes "listen" markers -------------------------- */
    CHECK(pglf_sub_activate(router, sa, 0, PGLF_REASON_RECONNECT) == 0,
          "activate a/0 left a marker owed");
    CHECK(pglf_sub_activate(router, sa, 1, PGLF_REASON_LISTEN) == 0, "activate a/1");
    CHECK(pglf_sub_activate(router, sb, 0, PGLF_REASON_LISTEN) == 0, "activate b/0");
    CHECK(pglf_sub_activate(router, sa, 2, PGLF_REASON_LISTEN) == PGLF_EINVAL,
          "activate out of range");
    CHECK(pglf_sub_activate(router, sa, 0, PGLF_REASON_OVERFLOW) == PGLF_EINVAL,
          "activate with reason overflow");
    CHECK(pglf_sub_state(sa, 0) == 2 && pglf_sub_state(sa, 1) == 2 &&
              pglf_sub_state(sb, 0) == 2,
          "state after activate");
    drain(ring_a, &ba);
    drain(ring_b, &bb);
    CHECK(ba.n == 2 && bb.n == 1, "markers: %zu in a, %zu in b", ba.n, bb.n);
    /* The first marker of a channel is always "listen". */
    expect_marker(ba.rec[0], PGLF_REASON_LISTEN, 0);
    expect_marker(ba.rec[1], PGLF_REASON_LISTEN, 1);
    expect_marker(bb.rec[0], PGLF_REASON_LISTEN, 0);
    CHECK(pglf_router_markers(router) == 3 && pglf_ring_stat_markers(ring_a) == 2,
          "marker counters");
    step("activate", "3 listen markers");

    /* -- routing and consumer wake-ups ------------------------------- */
    CHECK(pglf_ring_consumer_wait_arm(ring_a) == 0, "arm on an empty ring");
    CHECK(route(router, "alpha", 1, 40) == PGLF_OK, "route alpha");
    CHECK(route(router, "beta", 2, 8) == PGLF_OK, "route beta");
    CHECK(take_signal(ca) == 0, "consumer woken before pglf_router_wake");
    pglf_router_wake(router);
    CHECK(take_signal(ca) == 1, "sleeping consumer of a not woken");
    CHECK(take_signal(cb) == 0, "consumer of b woken although it did not sleep");
    drain(ring_a, &ba);
    drain(ring_b, &bb);
    CHECK(ba.n == 2 && bb.n == 1, "routed: %zu in a, %zu in b", ba.n, bb.n);
    CHECK(seq_of(ba.rec[0], 0) == 1 && seq_of(ba.rec[1], 1) == 2 &&
              seq_of(bb.rec[0], 0) == 1,
          "routed records");
    step("route", "fan-out to 2 rings, consumer woken");

    /* -- many channels: hash buckets grew; duplicates fan out -------- */
    for (unsigned i = 0; i < MANY_CHANNELS + 2; i++)
        CHECK(pglf_sub_activate(router, sc, i, PGLF_REASON_LISTEN) == 0, "activate c/%u", i);
    for (unsigned i = 0; i < MANY_CHANNELS; i++) {
        int len = snprintf(name, sizeof(name), "chan-%u", i);
        char buf[16];
        size_t plen = make_payload(i, 8, buf);
        CHECK(pglf_route(router, name, (size_t)len, (int32_t)i, buf, plen) == PGLF_OK,
              "route %s", name);
    }
    {
        char buf[16];
        size_t plen = make_payload(7, 8, buf);
        CHECK(pglf_route(router, "a\0b", 3, 7, buf, plen) == PGLF_OK, "route a\\0b");
        CHECK(pglf_route(router, "a", 1, 7, buf, plen) == PGLF_OK, "route a");
    }
    {
        size_t used = 0;
        static _Alignas(8) unsigned char big[1 << 16];
        size_t n = pglf_ring_drain(ring_c, big, sizeof(big), 100000, &used);
        size_t expect = (MANY_CHANNELS + 2) + MANY_CHANNELS + 1 + 1;
        CHECK(n == expect, "ring c holds %zu records, expected %zu", n, expect);
        size_t off = 0;
        for (unsigned k = 0; k < MANY_CHANNELS + 2; k++) {
            const pglf_rec *h = (const pglf_rec *)(big + off);
            expect_marker(h, PGLF_REASON_LISTEN, k);
            off += (size_t)pglf_rec_size(h->len);
        }
        for (unsigned i = 0; i < MANY_CHANNELS; i++) {
            const pglf_rec *h = (const pglf_rec *)(big + off);
            CHECK(seq_of(h, i) == i, "chan-%u", i);
            off += (size_t)pglf_rec_size(h->len);
            if (i == 1) {   /* "chan-1" is attached twice: two targets */
                h = (const pglf_rec *)(big + off);
                CHECK(seq_of(h, MANY_CHANNELS + 1) == 1, "chan-1, second target");
                off += (size_t)pglf_rec_size(h->len);
            }
        }
        CHECK(seq_of((const pglf_rec *)(big + off), MANY_CHANNELS) == 7, "a\\0b");
        off += (size_t)pglf_rec_size(((const pglf_rec *)(big + off))->len);
        CHECK(off == used, "ring c: %zu bytes, records span %zu", used, off);
    }
    step("channels", "%u channels routed by name", MANY_CHANNELS + 2);

    /* -- drop ring overflows, block ring blocks ---------------------- */
    drain(ring_a, &ba);
    drain(ring_b, &bb);
    take_signal(pa);
    take_signal(pb);
    uint64_t dropped0 = pglf_router_dropped(router);
    unsigned next_b = 100, blocked = 0, flushes = 0, a_notes = 0;
    uint64_t a_overflow = 0;
    unsigned next_a = 100, a_markers = 0;
    for (unsigned seq = 100; seq < 100 + NUM_ROUTED; seq++) {
        size_t len = 8 + (seq * 37) % 300;
        int rc = route(router, "alpha", seq, len);
        if (rc == PGLF_OK)
            continue;
        CHECK(rc == PGLF_BLOCKED, "route returned %d", rc);
        blocked++;
        CHECK(pglf_router_blocked(router) == 1, "blocked flag not set");
        /* Nothing is routed while a notification is kept aside. */
        CHECK(route(router, "alpha", 999999, 8) == PGLF_BLOCKED, "route while blocked");
        CHECK(pglf_router_flush(router) == PGLF_BLOCKED, "flush without space");
        CHECK(take_signal(pb) == 0, "producer of b signalled without space");
        drain(ring_b, &bb);
        CHECK(bb.n > 0, "block ring was empty");
        for (size_t i = 0; i < bb.n; i++)
            CHECK(seq_of(bb.rec[i], 0) == next_b++, "b out of order");
        CHECK(take_signal(pb) == 1, "draining b did not wake the producer");
        int frc;
        do {
            frc = pglf_router_flush(router);
            flushes++;
            CHECK(flushes < 10 * NUM_ROUTED, "flush never returns OK");
        } while (frc != PGLF_OK);
        CHECK(pglf_router_blocked(router) == 0, "still blocked after flush OK");
    }
    drain(ring_b, &bb);
    for (size_t i = 0; i < bb.n; i++)
        CHECK(seq_of(bb.rec[i], 0) == next_b++, "b out of order");
    CHECK(next_b == 100 + NUM_ROUTED, "b received up to %u", next_b);
    CHECK(blocked > 0, "the block ring never filled");

    drain(ring_a, &ba);
    CHECK(take_signal(pa) == 1, "draining a did not wake the producer (markers owed)");
    /* Every gap in the sequence is announced, before the next notification,
     * by overflow markers whose counts add up to the gap. */
    uint64_t pending = 0;
    for (size_t i = 0; i < ba.n; i++) {
        const pglf_rec *h = ba.rec[i];
        if (h->kind == PGLF_KIND_MARKER) {
            uint64_t n = overflow_count(h, 0);
            pending += n;
            a_overflow += n;
            a_markers++;
            continue;
        }
        unsigned seq = seq_of(h, 0);
        CHECK(seq >= next_a && seq - next_a == pending,
              "a: seq %u after %u with %" PRIu64 " announced drops", seq, next_a,
              pending);
        next_a = seq + 1;
        pending = 0;
        a_notes++;
    }
    uint64_t dropped = pglf_router_dropped(router) - dropped0;
    CHECK(dropped > 0, "the drop ring never overflowed");
    /* Ring a was never drained during the burst: one gap, so at most one
     * overflow marker was written (owed markers wait for real space). */
    CHECK(a_markers <= 1, "%u overflow markers for one gap", a_markers);
    CHECK(a_notes + dropped == NUM_ROUTED, "a: %u delivered + %" PRIu64 " dropped",
          a_notes, dropped);
    CHECK(pglf_ring_stat_dropped(ring_a) == dropped && pglf_ring_stat_dropped(ring_b) == 0,
          "ring drop counters");
    CHECK(pglf_router_owing(router) == 1, "overflow marker not owed");
    /* The next notification brings the rest of the count first. */
    CHECK(route(router, "alpha", 5000, 16) == PGLF_OK, "route after drain");
    drain(ring_a, &ba);
    drain(ring_b, &bb);
    CHECK(ba.n == 2 && bb.n == 1, "after overflow: %zu in a, %zu in b", ba.n, bb.n);
    a_overflow += overflow_count(ba.rec[0], 0);
    CHECK(seq_of(ba.rec[1], 0) == 5000 && seq_of(bb.rec[0], 0) == 5000, "after overflow");
    CHECK(a_overflow == dropped, "overflow markers count %" PRIu64 ", dropped %" PRIu64,
          a_overflow, dropped);
    CHECK(pglf_router_owing(router) == 0, "still owing");
    step("overflow", "drop: %u delivered, %" PRIu64 " dropped, %u overflow markers; "
         "block: %u blocked, %u delivered", a_notes, dropped, a_markers + 1, blocked,
         NUM_ROUTED);

    /* -- payloads that can never fit are dropped (both policies) ---- */
    dropped0 = pglf_router_dropped(router);
    CHECK(route(router, "alpha", 6000, RING_CAP) == PGLF_OK, "route too big");
    CHECK(pglf_router_blocked(router) == 0, "too big blocked the router");
    CHECK(pglf_router_dropped(router) - dropped0 == 2, "too big: %" PRIu64 " dropped",
          pglf_router_dropped(router) - dropped0);
    CHECK(pglf_router_flush(router) == PGLF_OK, "flush after too big");
    drain(ring_a, &ba);
    drain(ring_b, &bb);
    CHECK(ba.n == 1 && bb.n == 1, "too big: %zu in a, %zu in b", ba.n, bb.n);
    CHECK(overflow_count(ba.rec[0], 0) == 1 && overflow_count(bb.rec[0], 0) == 1,
          "too big markers");
    step("too-big", "dropped by both policies, overflow markers written");

    /* -- a marker owed while its ring is full ----------------------- */
    pglf_router_deactivate_all(router);
    CHECK(pglf_sub_state(sa, 0) == 1 && pglf_sub_state(sb, 0) == 1, "state after deactivate");
    CHECK(route(router, "alpha", 7000, 8) == PGLF_OK, "route to deactivated");
    CHECK(pglf_ring_used(ring_a) == 0 && pglf_ring_used(ring_b) == 0,
          "deactivated targets received records");
    /* The test is the producer of ring a here: fill it to the last byte. */
    while (pglf_ring_write(ring_a, PGLF_KIND_NOTIFY, 0, 1, 7001, "n0007001", 8, 0) ==
           PGLF_OK)
        ;
    while (pglf_ring_write(ring_a, PGLF_KIND_NOTIFY, 0, 1, 7001, "", 0, 0) == PGLF_OK)
        ;
    /* A 16-byte record no longer fits: neither does a reason marker. */
    take_signal(pa);
    CHECK(pglf_sub_activate(router, sa, 0, PGLF_REASON_RECONNECT) == 1,
          "marker not owed on a full ring");
    CHECK(pglf_sub_activate(router, sb, 0, PGLF_REASON_RECONNECT) == 0, "activate b");
    CHECK(pglf_router_owing(router) == 1, "owing flag");
    CHECK(pglf_router_flush(router) == PGLF_OK, "flush with a marker owed");
    CHECK(pglf_router_owing(router) == 1, "marker paid without space");
    drain(ring_a, &ba);
    CHECK(take_signal(pa) == 1, "draining a did not wake the producer");
    for (size_t i = 0; i < ba.n; i++)
        CHECK(ba.rec[i]->kind == PGLF_KIND_NOTIFY && ba.rec[i]->chan == 1, "filler");
    CHECK(pglf_router_flush(router) == PGLF_OK, "flush");
    CHECK(pglf_router_owing(router) == 0, "marker still owed after flush");
    drain(ring_a, &ba);
    drain(ring_b, &bb);
    CHECK(ba.n == 1 && bb.n == 1, "reconnect: %zu in a, %zu in b", ba.n, bb.n);
    expect_marker(ba.rec[0], PGLF_REASON_RECONNECT, 0);
    expect_marker(bb.rec[0], PGLF_REASON_RECONNECT, 0);
    CHECK(pglf_sub_state(sa, 1) == 1, "a/1 must stay inactive");
    CHECK(route(router, "beta", 7002, 8) == PGLF_OK && pglf_ring_used(ring_a) == 0,
          "inactive a/1 received a record");
    step("owed", "reconnect marker owed while full, paid by flush");

    /* -- freeing subscriptions -------------------------------------- */
    pglf_sub_free(router, sc);
    CHECK(route(router, "chan-1", 8000, 8) == PGLF_OK && pglf_ring_used(ring_c) == 0,
          "freed subscription received a record");
    CHECK(route(router, "alpha", 8001, 8) == PGLF_OK, "route alpha");
    pglf_sub_free(router, sa);   /* dirty: its consumer gets a last wake-up */
    CHECK(route(router, "alpha", 8002, 8) == PGLF_OK, "route alpha");
    pglf_router_wake(router);
    drain(ring_a, &ba);
    drain(ring_b, &bb);
    CHECK(ba.n == 1 && seq_of(ba.rec[0], 0) == 8001, "a after free");
    CHECK(bb.n == 2 && seq_of(bb.rec[0], 0) == 8001 && seq_of(bb.rec[1], 0) == 8002,
          "b after free");
    pglf_sub_free(router, NULL);
    uint64_t received = pglf_router_received(router);
    pglf_router_free(router);   /* frees sb too */
    pglf_router_free(NULL);
    step("free", "%" PRIu64 " notifications routed in total", received);

    CHECK(pglf_ring_stat_written(ring_b) == pglf_ring_stat_delivered(ring_b),
          "ring b counters");
    pglf_ring_free(ring_a);
    pglf_ring_free(ring_b);
    pglf_ring_free(ring_c);
    close(ca);
    close(pa);
    close(cb);
    close(pb);
    printf("router_smoke: ok\n");
    return 0;
}
