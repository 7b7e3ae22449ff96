/*
 * pglf_router.c - subscriptions, owed markers, routing over the channel
 * map (pglf_chanmap.c), the block stash and the counters.  No libpq here:
 * the read loop (pglf_readloop.c) feeds pglf_route().
 *
 * Single-threaded by contract: every function runs on the selector thread,
 * which is the only producer of every ring it writes.  See pglf_router.h.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L   /* clock_gettime (pglf_platform.h) */
#endif
#include "pglf_router.h"
#include "pglf_chanmap.h"
#include "pglf_platform.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define ST_ACTIVE 1      /* notifications are routed to this channel */
#define ST_ANNOUNCED 2   /* its "listen" marker was owed or written */

/* Bytes of an owed pair of markers (overflow + reason), used for waits. */
#define MARKER_PAIR ((size_t)(2 * pglf_rec_size(8)))

struct pglf_sub {
    pglf_ring *ring;
    uint32_t n;
    int block;
    size_t reserve;
    uint8_t *state;          /* ST_* per channel */
    uint8_t *owed_reason;    /* PGLF_REASON_LISTEN/RECONNECT owed, or 0 */
    uint64_t *owed_dropped;  /* notifications dropped since the last marker */
    pglf_chanmap_entry **entries;   /* routing entry of each attached channel */
    uint32_t owing;          /* channels with something owed */
    int dirty;               /* written since the last wake-up */
    pglf_sub *prev, *next;
};

struct pglf_router {
    pglf_chanmap map;        /* channel name -> targets */
    pglf_sub *subs;
    pglf_sub **dirty;
    size_t ndirty, capdirty;
    size_t owing_subs;
    int busy;
    int wake_fd;         /* the selector's wake-up fd while in pglf_run */
    pglf_pace pace;      /* the read loop's, see pglf_router_pace() */

    /* the notification kept aside while a "block" ring is full */
    int stashed;
    uint64_t stash_seq;
    int32_t stash_pid;
    char *stash_buf;         /* channel, NUL, payload */
    size_t stash_chan_len, stash_payload_len, stash_cap;

    uint64_t seq;
    /* written by the selector thread, read by any (statistics) */
    _Atomic uint64_t received, dropped, markers;
};

pglf_router *pglf_router_new(void)
{
    pglf_router *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->wake_fd = -1;
    r->pace.window_us = -1;
    if (pglf_chanmap_init(&r->map) != PGLF_OK) {
        free(r);
        return NULL;
    }
    return r;
}

static void sub_release(pglf_sub *s)
{
    free(s->state);
    free(s->owed_reason);
    free(s->owed_dropped);
    free(s->entries);
    free(s);
}

void pglf_router_free(pglf_router *r)
{
    if (r == NULL)
        return;
    pglf_chanmap_destroy(&r->map);
    pglf_sub *s = r->subs;
    while (s) {
        pglf_sub *next = s->next;
        sub_release(s);
        s = next;
    }
    free(r->dirty);
    free(r->stash_buf);
    free(r);
}

/* ------------------------------------------------------------------ */
/* subscriptions                                                        */

pglf_sub *pglf_sub_new(pglf_router *r, pglf_ring *ring, uint32_t nchannels,
                       int block, size_t reserve)
{
    if (nchannels == 0)
        return NULL;
    pglf_sub *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->ring = ring;
    s->n = nchannels;
    s->block = block != 0;
    s->reserve = reserve;
    s->state = calloc(nchannels, 1);
    s->owed_reason = calloc(nchannels, 1);
    s->owed_dropped = calloc(nchannels, sizeof(uint64_t));
    s->entries = calloc(nchannels, sizeof(pglf_chanmap_entry *));
    if (!s->state || !s->owed_reason || !s->owed_dropped || !s->entries) {
        sub_release(s);
        return NULL;
    }
    s->next = r->subs;
    if (r->subs)
        r->subs->prev = s;
    r->subs = s;
    return s;
}

int pglf_sub_attach(pglf_router *r, pglf_sub *s, uint32_t idx, const char *name,
                    size_t len)
{
    if (idx >= s->n || s->entries[idx] != NULL)
        return PGLF_EINVAL;
    return pglf_chanmap_attach(&r->map, name, len, s, idx, &s->entries[idx]);
}

void pglf_sub_free(pglf_router *r, pglf_sub *s)
{
    if (s == NULL)
        return;
    for (uint32_t i = 0; i < s->n; i++)
        if (s->entries[i] != NULL)
            pglf_chanmap_detach(&r->map, s->entries[i], s, i);
    if (s->dirty) {
        pglf_ring_wake_consumer(s->ring);
        for (size_t k = 0; k < r->ndirty; k++)
            if (r->dirty[k] == s)
                r->dirty[k] = r->dirty[--r->ndirty];
    }
    if (s->owing)
        r->owing_subs--;
    pglf_ring_producer_wait_disarm(s->ring);
    if (s->prev)
        s->prev->next = s->next;
    else
        r->subs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    sub_release(s);
}

static void mark_dirty(pglf_router *r, pglf_sub *s)
{
    if (s->dirty)
        return;
    if (r->ndirty == r->capdirty) {
        size_t cap = r->capdirty ? r->capdirty * 2 : 16;
        pglf_sub **d = realloc(r->dirty, cap * sizeof(pglf_sub *));
        if (d == NULL) {
            /* Cannot remember it: wake now instead of later. */
            pglf_ring_wake_consumer(s->ring);
            return;
        }
        r->dirty = d;
        r->capdirty = cap;
    }
    s->dirty = 1;
    r->dirty[r->ndirty++] = s;
}

void pglf_router_wake(pglf_router *r)
{
    for (size_t k = 0; k < r->ndirty; k++) {
        r->dirty[k]->dirty = 0;
        pglf_ring_wake_consumer(r->dirty[k]->ring);
    }
    r->ndirty = 0;
}

static void owe(pglf_router *r, pglf_sub *s, uint32_t idx)
{
    if (s->owed_reason[idx] == 0 && s->owed_dropped[idx] == 0) {
        if (s->owing++ == 0)
            r->owing_subs++;
    }
}

static void settle(pglf_router *r, pglf_sub *s, uint32_t idx)
{
    if (s->owed_reason[idx] == 0 && s->owed_dropped[idx] == 0) {
        if (--s->owing == 0)
            r->owing_subs--;
    }
}

/*
 * Free space a full subscription needs before its owed markers are written
 * on the notification path: room for the markers, the reserve, and some
 * slack.  Paying as soon as one marker fits would, while the consumer is
 * stalled, produce a run of adjacent overflow markers of one drop each;
 * waiting for the slack gives one marker per gap, carrying its whole size.
 */
static size_t pay_threshold(const pglf_sub *s)
{
    size_t cap = pglf_ring_capacity(s->ring);
    size_t slack = cap / 8 < 16384 ? cap / 8 : 16384;
    size_t t = s->reserve + MARKER_PAIR + slack;
    return t < cap ? t : cap;
}

/*
 * Write what `s` owes its consumer if at least `min_free` bytes are free.
 * Returns 1 if something is still owed (the consumer will then wake the
 * selector once that much space is free).
 */
static int pay_debts(pglf_router *r, pglf_sub *s, size_t min_free)
{
    if (pglf_ring_closed(s->ring)) {
        /* Closed by its consumer (unlisten): nothing new may appear in it,
         * markers included, and what it was owed no longer matters. */
        for (uint32_t i = 0; i < s->n && s->owing; i++) {
            if (s->owed_reason[i] || s->owed_dropped[i]) {
                s->owed_reason[i] = 0;
                s->owed_dropped[i] = 0;
                settle(r, s, i);
            }
        }
        return 0;
    }
    if (min_free && pglf_ring_free_bytes(s->ring) < min_free &&
        !pglf_ring_producer_wait_arm(s->ring, min_free))
        return 1;
    for (uint32_t i = 0; i < s->n && s->owing; i++) {
        /* The "listen"/"reconnect" marker first: a channel's first item is
         * always its "listen" marker, and drops counted while a reason
         * marker was owed happened before the consumer could see it. */
        if (s->owed_reason[i]) {
            if (pglf_ring_write(s->ring, PGLF_KIND_MARKER, s->owed_reason[i], i,
                                0, NULL, 0, 0) != PGLF_OK)
                goto full;
            PGLF_BUMP(r->markers, 1);
            s->owed_reason[i] = 0;
            mark_dirty(r, s);
            settle(r, s, i);
        }
        if (s->owed_dropped[i]) {
            uint64_t n = s->owed_dropped[i];
            if (pglf_ring_write(s->ring, PGLF_KIND_MARKER, PGLF_REASON_OVERFLOW,
                                i, 0, &n, sizeof(n), 0) != PGLF_OK)
                goto full;
            PGLF_BUMP(r->markers, 1);
            s->owed_dropped[i] = 0;
            mark_dirty(r, s);
            settle(r, s, i);
        }
    }
    return s->owing != 0;
full:
    /* Ask the consumer to wake the selector once markers fit again. */
    if (pglf_ring_producer_wait_arm(s->ring, MARKER_PAIR))
        return pay_debts(r, s, 0);
    return 1;
}

int pglf_sub_activate(pglf_router *r, pglf_sub *s, uint32_t idx, uint8_t reason)
{
    if (idx >= s->n)
        return PGLF_EINVAL;
    if (!(s->state[idx] & ST_ANNOUNCED))
        reason = PGLF_REASON_LISTEN;   /* the first marker is always "listen" */
    else if (reason != PGLF_REASON_LISTEN && reason != PGLF_REASON_RECONNECT)
        return PGLF_EINVAL;
    if (pglf_ring_closed(s->ring)) {
        /* Closed by its consumer: no marker; the subscription is leaving. */
        s->state[idx] |= ST_ACTIVE | ST_ANNOUNCED;
        return 0;
    }
    /* Drops counted before this activation belong before its marker: write
     * their overflow marker first if it fits (else it follows the reason
     * marker, which resets the consumer's state anyway). */
    if (s->owed_dropped[idx] && !s->owed_reason[idx]) {
        uint64_t n = s->owed_dropped[idx];
        if (pglf_ring_write(s->ring, PGLF_KIND_MARKER, PGLF_REASON_OVERFLOW, idx,
                            0, &n, sizeof(n), 0) == PGLF_OK) {
            PGLF_BUMP(r->markers, 1);
            s->owed_dropped[idx] = 0;
            mark_dirty(r, s);
            settle(r, s, idx);
        }
    }
    owe(r, s, idx);
    /* A still-owed "listen" marker stays "listen"; owed reconnects merge. */
    if (s->owed_reason[idx] != PGLF_REASON_LISTEN)
        s->owed_reason[idx] = reason;
    s->state[idx] |= ST_ACTIVE | ST_ANNOUNCED;
    /* Markers have their reserve: write them as soon as they fit. */
    pay_debts(r, s, 0);
    return s->owed_reason[idx] != 0;
}

int pglf_sub_state(const pglf_sub *s, uint32_t idx)
{
    if (idx >= s->n)
        return 0;
    /* How many of the two hold: PGLF_SUB_NEW, _LAPSED or _LIVE. */
    return (s->state[idx] & ST_ACTIVE ? 1 : 0) +
           (s->state[idx] & ST_ANNOUNCED ? 1 : 0);
}

void pglf_router_deactivate_all(pglf_router *r)
{
    for (pglf_sub *s = r->subs; s; s = s->next)
        for (uint32_t i = 0; i < s->n; i++)
            s->state[i] &= (uint8_t)~ST_ACTIVE;
}

/* ------------------------------------------------------------------ */
/* routing                                                              */

/* Attempts before giving up on a "block" ring that keeps reporting space
 * it then cannot use (only possible through odd reserve settings). */
#define DELIVER_TRIES 8

static int deliver(pglf_router *r, pglf_sub *s, uint32_t idx, int32_t pid,
                   const char *payload, size_t len)
{
    int rc = PGLF_E2BIG;
    /* Closed by its consumer (unlisten): nothing new may appear in it, even
     * before the selector has processed the removal. */
    if (pglf_ring_closed(s->ring))
        return PGLF_OK;
    /* A record that can never fit is dropped at once: waiting for space
     * (a "block" ring) could not help. */
    if (len <= pglf_ring_max_payload(s->ring)) {
        /* Owed markers are paid only with room for them, the reserve and
         * this record (and some slack): see pay_threshold(). */
        size_t min_free = pay_threshold(s);
        size_t with_rec = s->reserve + MARKER_PAIR + (size_t)pglf_rec_size(len);
        if (with_rec > min_free)
            min_free = with_rec;
        if (min_free > pglf_ring_capacity(s->ring))
            min_free = pglf_ring_capacity(s->ring);
        for (int tries = 0; tries < DELIVER_TRIES; tries++) {
            rc = PGLF_FULL;
            if (!(s->owing && pay_debts(r, s, min_free))) {
                rc = pglf_ring_write(s->ring, PGLF_KIND_NOTIFY, 0, idx, pid,
                                     payload, (uint32_t)len, s->reserve);
                /* An empty ring takes any record it can hold at all: the
                 * reserve protects markers, and there are none to protect. */
                if (rc == PGLF_FULL && pglf_ring_used(s->ring) == 0)
                    rc = pglf_ring_write(s->ring, PGLF_KIND_NOTIFY, 0, idx, pid,
                                         payload, (uint32_t)len, 0);
                if (rc == PGLF_OK) {
                    mark_dirty(r, s);
                    return PGLF_OK;
                }
            }
            if (rc == PGLF_E2BIG || !s->block)
                break;
            size_t need = (size_t)pglf_rec_size(len) * 2 + s->reserve;
            if (need < MARKER_PAIR)
                need = MARKER_PAIR;
            if (s->owing && need < min_free)
                need = min_free;
            if (need > pglf_ring_capacity(s->ring))
                need = pglf_ring_capacity(s->ring);
            if (!pglf_ring_producer_wait_arm(s->ring, need))
                return PGLF_BLOCKED;
            /* Space freed meanwhile: try again. */
        }
    }
    /* Dropped: "drop" policy, a record that can never fit, or a "block"
     * ring that cannot take it even with space free. */
    owe(r, s, idx);
    s->owed_dropped[idx]++;
    PGLF_BUMP(r->dropped, 1);
    pglf_ring_count_dropped(s->ring, 1);
    /* Ask the consumer to wake the selector once the markers can be paid;
     * if that much space freed meanwhile, pay now (no wake-up would come). */
    if (pglf_ring_producer_wait_arm(s->ring, pay_threshold(s)))
        pay_debts(r, s, pay_threshold(s));
    return PGLF_OK;
}

static int route_seq(pglf_router *r, const char *channel, size_t chan_len,
                     int32_t pid, const char *payload, size_t payload_len,
                     uint64_t seq)
{
    pglf_chanmap_entry *e = pglf_chanmap_lookup(&r->map, channel, chan_len);
    if (e == NULL)
        return PGLF_OK;
    for (size_t k = 0; k < e->ntargets; k++) {
        pglf_target *t = &e->targets[k];
        if (t->last_seq == seq || !(t->sub->state[t->idx] & ST_ACTIVE))
            continue;
        if (deliver(r, t->sub, t->idx, pid, payload, payload_len) == PGLF_BLOCKED)
            return PGLF_BLOCKED;
        t->last_seq = seq;
    }
    return PGLF_OK;
}

static int stash(pglf_router *r, const char *channel, size_t chan_len,
                 int32_t pid, const char *payload, size_t payload_len)
{
    size_t need = chan_len + 1 + payload_len;
    if (need > r->stash_cap) {
        char *b = realloc(r->stash_buf, need);
        if (b == NULL)
            return PGLF_ENOMEM;
        r->stash_buf = b;
        r->stash_cap = need;
    }
    memcpy(r->stash_buf, channel, chan_len);
    r->stash_buf[chan_len] = '\0';
    memcpy(r->stash_buf + chan_len + 1, payload, payload_len);
    r->stash_chan_len = chan_len;
    r->stash_payload_len = payload_len;
    r->stash_pid = pid;
    r->stash_seq = r->seq;
    r->stashed = 1;
    return PGLF_OK;
}

int pglf_route(pglf_router *r, const char *channel, size_t chan_len, int32_t pid,
               const char *payload, size_t payload_len)
{
    if (r->stashed)
        return PGLF_BLOCKED;
    PGLF_BUMP(r->received, 1);
    uint64_t seq = ++r->seq;
    if (route_seq(r, channel, chan_len, pid, payload, payload_len, seq) ==
        PGLF_OK)
        return PGLF_OK;
    if (stash(r, channel, chan_len, pid, payload, payload_len) != PGLF_OK) {
        /* Out of memory: nothing can hold it.  Count it as dropped. */
        PGLF_BUMP(r->dropped, 1);
        return PGLF_OK;
    }
    return PGLF_BLOCKED;
}

int pglf_router_flush(pglf_router *r)
{
    if (r->owing_subs)
        for (pglf_sub *s = r->subs; s; s = s->next)
            if (s->owing)
                pay_debts(r, s, pay_threshold(s));
    if (r->stashed) {
        if (route_seq(r, r->stash_buf, r->stash_chan_len, r->stash_pid,
                      r->stash_buf + r->stash_chan_len + 1, r->stash_payload_len,
                      r->stash_seq) == PGLF_BLOCKED) {
            pglf_router_wake(r);
            return PGLF_BLOCKED;
        }
        r->stashed = 0;
    }
    pglf_router_wake(r);
    return PGLF_OK;
}

int pglf_router_blocked(const pglf_router *r) { return r->stashed; }
int pglf_router_owing(const pglf_router *r) { return r->owing_subs != 0; }
void pglf_router_set_busy(pglf_router *r, int busy) { r->busy = busy; }
int pglf_router_busy(const pglf_router *r) { return r->busy; }
void pglf_router_set_wake_fd(pglf_router *r, int fd) { r->wake_fd = fd; }
int pglf_router_wake_fd(const pglf_router *r) { return r->wake_fd; }
pglf_pace *pglf_router_pace(pglf_router *r) { return &r->pace; }
uint64_t pglf_router_received(const pglf_router *r)
{
    return atomic_load_explicit(&((pglf_router *)r)->received, memory_order_relaxed);
}
uint64_t pglf_router_dropped(const pglf_router *r)
{
    return atomic_load_explicit(&((pglf_router *)r)->dropped, memory_order_relaxed);
}
uint64_t pglf_router_markers(const pglf_router *r)
{
    return atomic_load_explicit(&((pglf_router *)r)->markers, memory_order_relaxed);
}
