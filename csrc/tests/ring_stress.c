/*
 * ring_stress.c - two-thread stress test of the SPSC record ring
 * (csrc/pglf_ring.c).
 *
 * A producer thread writes N records (argv[1], default 10,000,000) into a
 * 64 KiB ring: payloads of 0..300 bytes with occasional large ones up to the
 * ring's maximum payload, so wrap-around (PAD records and implicit tail
 * fragments) and FULL happen constantly.  Every record is derived from its
 * sequence number: kind, reason, chan, pid and length come from a hash of
 * the sequence number, and the payload carries the sequence number and a
 * CRC-32 of the rest, so the consumer can check each record independently
 * and against a regenerated copy.
 *
 * Neither side spins: the producer uses the fd wake-up protocol
 * (pglf_ring_producer_wait_arm + poll on its eventfd) when the ring is full,
 * the consumer sleeps in pglf_ring_wait() and the producer calls
 * pglf_ring_wake_consumer() after each batch.  The consumer alternates
 * between pglf_ring_drain() (random record limits and output sizes,
 * including ones too small for the next record) and zero-copy
 * pglf_ring_peek() / pglf_ring_consume().  At the end the producer closes
 * the ring and the consumer must see PGLF_CLOSED once it has drained.
 *
 * Usage: ring_stress [N [SEED]].  Prints "ok N records ..." and exits 0, or
 * prints what went wrong and exits 1.
 *
 * Build: gcc -std=c11 -D_GNU_SOURCE -O2 -pthread -I csrc \
 *            csrc/tests/ring_stress.c csrc/pglf_ring.c -o ring_stress
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "pglf_ring.h"

#define RING_CAP ((size_t)64 * 1024)
#define NOTIFY_RESERVE 64     /* small notifications keep room, like the router */
#define MAX_SMALL 300
#define PREFIX 12             /* u64 sequence number + u32 CRC-32 */
#define POOL_SIZE ((size_t)1 << 17)
#define WAIT_MS 10000         /* a wake-up that takes this long was lost */
#define OUT_CAP (RING_CAP / 2 + 64)
#define CLOSE_LIMIT_S 60     /* consumer's time to drain after close */

static unsigned char pool[POOL_SIZE];
static uint32_t crc_table[256];
static uint64_t seed = 0x9e3779b97f4a7c15ULL;
static size_t max_payload;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ring_stress: FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stdout);
    fflush(stderr);
    exit(1);
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* Everything about record `seq`, derived from the sequence number alone. */
typedef struct spec {
    uint8_t kind, reason;
    uint32_t chan, len;
    int32_t pid;
    size_t body_off;      /* where the bytes after the prefix come from */
} spec;

static void make_spec(uint64_t seq, spec *s)
{
    uint64_t h = splitmix64(seq ^ seed);
    uint64_t h2 = splitmix64(h);
    s->kind = (h & 0xff) < 3 ? PGLF_KIND_MARKER : PGLF_KIND_NOTIFY;
    s->reason = s->kind == PGLF_KIND_MARKER ? (uint8_t)(1 + (h >> 8) % 3) : 0;
    unsigned sel = (unsigned)((h >> 16) & 4095);
    if (sel == 0)
        s->len = (uint32_t)max_payload;                         /* largest */
    else if (sel < 6)
        s->len = (uint32_t)(h2 % (max_payload + 1));            /* large */
    else
        s->len = (uint32_t)(h2 % (MAX_SMALL + 1));              /* 0..300 */
    s->chan = (uint32_t)seq;
    s->pid = (int32_t)(uint32_t)(h >> 32);
    s->body_off = (size_t)((h2 >> 32) % (POOL_SIZE - max_payload));
}

/* The payload of `seq`: prefix (seq, CRC of seq + body), then body bytes;
 * payloads shorter than the prefix hold its first `len` bytes. */
static void make_payload(uint64_t seq, const spec *s, unsigned char *out)
{
    unsigned char prefix[PREFIX];
    const unsigned char *body = pool + s->body_off;
    size_t body_len = s->len > PREFIX ? s->len - PREFIX : 0;
    put_u64(prefix, seq);
    uint32_t crc = crc32_update(0, prefix, 8);
    crc = crc32_update(crc, body, body_len);
    put_u32(prefix + 8, crc);
    memcpy(out, prefix, s->len < PREFIX ? s->len : PREFIX);
    if (body_len)
        memcpy(out + PREFIX, body, body_len);
}

typedef struct shared {
    pglf_ring *ring;
    uint64_t n;
    int producer_fd;
    /* results, read after join */
    uint64_t notifies, markers, bytes, full_waits, producer_sleeps;
    uint64_t consumer_sleeps, drained_by_drain, drained_by_peek, zero_drains;
} shared;

/* ------------------------------------------------------------------ */
/* producer                                                             */

static void *producer_main(void *arg)
{
    shared *sh = arg;
    pglf_ring *r = sh->ring;
    unsigned char *buf = malloc(max_payload + 1);
    if (buf == NULL)
        die("out of memory");
    uint64_t rng = splitmix64(seed ^ 0x1234);
    unsigned batch = 0, batch_len = 1;
    for (uint64_t seq = 0; seq < sh->n; seq++) {
        spec s;
        make_spec(seq, &s);
        make_payload(seq, &s, buf);
        size_t reserve =
            s.kind == PGLF_KIND_NOTIFY && s.len <= MAX_SMALL ? NOTIFY_RESERVE : 0;
        unsigned spurious = 0;
        for (;;) {
            int rc = pglf_ring_write(r, s.kind, s.reason, s.chan, s.pid, buf,
                                     s.len, reserve);
            if (rc == PGLF_OK)
                break;
            if (rc != PGLF_FULL)
                die("producer: write of seq %" PRIu64 " (len %u) returned %d",
                    seq, s.len, rc);
            sh->full_waits++;
            /* Let the consumer see what is already published. */
            pglf_ring_wake_consumer(r);
            /* A padded record takes less than twice its size. */
            size_t need = 2 * (size_t)pglf_rec_size(s.len) + reserve;
            if (need > RING_CAP)
                die("producer: need %zu exceeds the ring", need);
            if (pglf_ring_producer_wait_arm(r, need)) {
                if (++spurious > 1000)
                    die("producer: seq %" PRIu64 " stays FULL although "
                        "producer_wait_arm reports %zu free bytes", seq, need);
                continue;
            }
            sh->producer_sleeps++;
            struct pollfd p = {.fd = sh->producer_fd, .events = POLLIN};
            int prc;
            do {
                prc = poll(&p, 1, WAIT_MS);
            } while (prc < 0 && errno == EINTR);
            if (prc == 0)
                die("producer: no wake-up within %d ms (seq %" PRIu64
                    ", used %zu of %zu)", WAIT_MS, seq, pglf_ring_used(r),
                    pglf_ring_capacity(r));
            if (prc < 0)
                die("producer: poll: %s", strerror(errno));
            pglf_fd_clear(sh->producer_fd);
        }
        if (s.kind == PGLF_KIND_NOTIFY)
            sh->notifies++;
        else
            sh->markers++;
        sh->bytes += s.len;
        if (++batch >= batch_len) {
            pglf_ring_wake_consumer(r);
            batch = 0;
            rng = splitmix64(rng);
            batch_len = 1 + (unsigned)(rng % 64);
        }
    }
    pglf_ring_wake_consumer(r);
    pglf_ring_close(r);
    free(buf);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* consumer                                                             */

typedef struct consumer {
    shared *sh;
    uint64_t next;          /* sequence number expected next */
    uint64_t rng;
    unsigned char *expect;  /* scratch: the regenerated payload */
} consumer;

static void check_record(consumer *c, const pglf_rec *h, const char *how)
{
    uint64_t seq = c->next;
    if (seq >= c->sh->n)
        die("consumer (%s): record after the last one (len %u kind %u)", how,
            h->len, h->kind);
    if (((uintptr_t)h & (PGLF_REC_ALIGN - 1)) != 0)
        die("consumer (%s): seq %" PRIu64 " header misaligned", how, seq);
    spec s;
    make_spec(seq, &s);
    if (h->kind != s.kind || h->reason != s.reason || h->chan != s.chan ||
        h->pid != s.pid || h->len != s.len || h->flags != 0)
        die("consumer (%s): seq %" PRIu64 " header mismatch: got kind %u reason "
            "%u chan %u pid %d len %u flags %u, expected kind %u reason %u chan "
            "%u pid %d len %u", how, seq, h->kind, h->reason, h->chan, h->pid,
            h->len, h->flags, s.kind, s.reason, s.chan, s.pid, s.len);
    const unsigned char *p = (const unsigned char *)h + PGLF_REC_HDR;
    if (h->len >= PREFIX) {
        uint64_t got_seq = get_u64(p);
        if (got_seq != seq)
            die("consumer (%s): out of order: got seq %" PRIu64 ", expected %"
                PRIu64, how, got_seq, seq);
        uint32_t crc = crc32_update(0, p, 8);
        crc = crc32_update(crc, p + PREFIX, h->len - PREFIX);
        if (crc != get_u32(p + 8))
            die("consumer (%s): seq %" PRIu64 " checksum mismatch: stored %08x, "
                "computed %08x (len %u)", how, seq, get_u32(p + 8), crc, h->len);
    }
    make_payload(seq, &s, c->expect);
    if (memcmp(p, c->expect, h->len) != 0)
        die("consumer (%s): seq %" PRIu64 " payload differs (len %u)", how, seq,
            h->len);
    c->next++;
}

static size_t consume_with_drain(consumer *c, unsigned char *out)
{
    c->rng = splitmix64(c->rng);
    size_t max_records = 1 + (size_t)(c->rng % 128);
    /* One call in eight offers a small buffer, often too small. */
    size_t out_cap = (c->rng >> 32) % 8 == 0 ? (size_t)((c->rng >> 40) % 512) : OUT_CAP;
    size_t used = 12345;
    size_t n = pglf_ring_drain(c->sh->ring, out, out_cap, max_records, &used);
    if (n > max_records || used > out_cap)
        die("consumer: drain returned %zu records / %zu bytes for max %zu / cap %zu",
            n, used, max_records, out_cap);
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const pglf_rec *h = (const pglf_rec *)(out + off);
        if (h->kind == PGLF_KIND_PAD)
            die("consumer: drain copied a PAD record");
        check_record(c, h, "drain");
        off += (size_t)pglf_rec_size(h->len);
    }
    if (off != used)
        die("consumer: drain reported %zu bytes, records span %zu", used, off);
    if (n == 0)
        c->sh->zero_drains++;
    c->sh->drained_by_drain += n;
    return n;
}

static size_t consume_with_peek(consumer *c)
{
    pglf_ring *r = c->sh->ring;
    c->rng = splitmix64(c->rng);
    size_t limit = 1 + (size_t)(c->rng % 128);
    uint64_t pos = pglf_ring_consumer_pos(r), start = pos;
    size_t n = 0;
    uint64_t notifies = 0;
    while (n < limit) {
        uint64_t before = pos;
        const pglf_rec *h = pglf_ring_peek(r, &pos);
        if (h == NULL) {
            if (pos != before)
                die("consumer: peek moved pos without a record");
            break;
        }
        if (h->kind == PGLF_KIND_PAD)
            die("consumer: peek returned a PAD record");
        check_record(c, h, "peek");
        if (h->kind == PGLF_KIND_NOTIFY)
            notifies++;
        n++;
    }
    if (pos != start)
        pglf_ring_consume(r, pos, notifies);
    c->sh->drained_by_peek += n;
    return n;
}

static void *consumer_main(void *arg)
{
    shared *sh = arg;
    consumer c = {.sh = sh, .next = 0, .rng = splitmix64(seed ^ 0x5678)};
    unsigned char *out = malloc(OUT_CAP);
    c.expect = malloc(max_payload + 1);
    if (out == NULL || c.expect == NULL)
        die("out of memory");
    unsigned idle = 0;   /* READY without progress, in a row */
    for (uint64_t iter = 0;; iter++) {
        size_t got = iter & 1 ? consume_with_peek(&c) : consume_with_drain(&c, out);
        if (got) {
            idle = 0;
            continue;
        }
        sh->consumer_sleeps++;
        int rc = pglf_ring_wait(sh->ring, WAIT_MS);
        if (rc == PGLF_READY || rc == PGLF_EINTR) {
            /* drain may have been offered too small a buffer, never twice
             * in a row with peek in between */
            if (++idle > 1000)
                die("consumer: wait keeps returning %d but nothing drains "
                    "(seq %" PRIu64 " next, used %zu)", rc, c.next,
                    pglf_ring_used(sh->ring));
            continue;
        }
        if (rc == PGLF_CLOSED)
            break;
        die("consumer: wait returned %d with seq %" PRIu64 " next (used %zu)", rc,
            c.next, pglf_ring_used(sh->ring));
    }
    if (c.next != sh->n)
        die("consumer: ring CLOSED after %" PRIu64 " of %" PRIu64 " records",
            c.next, sh->n);
    free(out);
    free(c.expect);
    return NULL;
}

/* ------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    uint64_t n = 10000000;
    if (argc > 1) {
        char *end;
        errno = 0;
        n = strtoull(argv[1], &end, 10);
        if (errno || *end || end == argv[1])
            die("bad record count %s", argv[1]);
    }
    if (argc > 2) {
        char *end;
        seed = strtoull(argv[2], &end, 0);
        if (*end || end == argv[2])
            die("bad seed %s", argv[2]);
    }
    crc_init();
    uint64_t x = seed;
    for (size_t i = 0; i < POOL_SIZE; i += 8) {
        x = splitmix64(x);
        put_u64(pool + i, x);
    }

    int cfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int pfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (cfd < 0 || pfd < 0)
        die("eventfd: %s", strerror(errno));
    pglf_ring *r = pglf_ring_new(RING_CAP, cfd, cfd, pfd);
    if (r == NULL)
        die("pglf_ring_new failed");
    if (pglf_ring_capacity(r) != RING_CAP)
        die("capacity %zu, expected %zu", pglf_ring_capacity(r), RING_CAP);
    max_payload = pglf_ring_max_payload(r);
    if (pglf_rec_size(max_payload) != RING_CAP / 2 ||
        pglf_ring_write(r, PGLF_KIND_NOTIFY, 0, 0, 0, pool, (uint32_t)max_payload + 1,
                        0) != PGLF_E2BIG)
        die("max payload %zu is not the largest accepted payload", max_payload);
    if (pglf_ring_wait(r, 0) != PGLF_TIMEOUT)
        die("wait on an empty open ring did not time out");

    shared sh = {.ring = r, .n = n, .producer_fd = pfd};
    pthread_t prod, cons;
    double t0 = now_s();
    if (pthread_create(&cons, NULL, consumer_main, &sh) != 0 ||
        pthread_create(&prod, NULL, producer_main, &sh) != 0)
        die("pthread_create failed");
    pthread_join(prod, NULL);
    /* The producer closed the ring: the consumer must finish on its own. */
    struct timespec limit;
    clock_gettime(CLOCK_REALTIME, &limit);
    limit.tv_sec += CLOSE_LIMIT_S;
    int jrc = pthread_timedjoin_np(cons, NULL, &limit);
    if (jrc != 0)
        die("consumer did not finish within %d s after the producer closed the "
            "ring (%s)", CLOSE_LIMIT_S, strerror(jrc));
    double elapsed = now_s() - t0;

    if (pglf_ring_used(r) != 0)
        die("%zu bytes left in the ring after CLOSED", pglf_ring_used(r));
    if (!pglf_ring_closed(r))
        die("ring not marked closed");
    pglf_ring_close(r);   /* idempotent */
    if (pglf_ring_wait(r, 0) != PGLF_CLOSED || pglf_ring_wait(r, -1) != PGLF_CLOSED)
        die("wait on a closed, drained ring did not return CLOSED");
    if (pglf_ring_stat_written(r) != sh.notifies ||
        pglf_ring_stat_delivered(r) != sh.notifies ||
        pglf_ring_stat_markers(r) != sh.markers || pglf_ring_stat_dropped(r) != 0)
        die("stats: written %" PRIu64 " delivered %" PRIu64 " markers %" PRIu64
            " dropped %" PRIu64 "; expected %" PRIu64 " notifications and %" PRIu64
            " markers", pglf_ring_stat_written(r), pglf_ring_stat_delivered(r),
            pglf_ring_stat_markers(r), pglf_ring_stat_dropped(r), sh.notifies,
            sh.markers);
    if (sh.drained_by_drain + sh.drained_by_peek != n)
        die("drained %" PRIu64 " + %" PRIu64 " records, expected %" PRIu64,
            sh.drained_by_drain, sh.drained_by_peek, n);

    printf("ok %" PRIu64 " records (%" PRIu64 " notifications, %" PRIu64
           " markers, %.1f MiB of payload; %" PRIu64 " via drain, %" PRIu64
           " via peek, %" PRIu64 " empty drains; producer FULL %" PRIu64
           " times, slept %" PRIu64 "; consumer slept %" PRIu64 ") in %.2f s\n",
           n, sh.notifies, sh.markers, (double)sh.bytes / 1048576.0,
           sh.drained_by_drain, sh.drained_by_peek, sh.zero_drains, sh.full_waits,
           sh.producer_sleeps, sh.consumer_sleeps, elapsed);
    pglf_ring_free(r);
    close(cfd);
    close(pfd);
    return 0;
}
