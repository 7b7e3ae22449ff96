/*
 * pglf_ring.c - lock-free SPSC ring of variable-length records.
 *
 * See pglf_ring.h for the thread roles.  Memory-ordering summary:
 *
 *   tail  written by the producer with release after the record bytes;
 *         read by the consumer with acquire before it reads them.
 *   head  written by the consumer with release after it finished reading;
 *         read by the producer with acquire before it overwrites them.
 *   Each side keeps a private cached copy of the other side's index and
 *   refreshes it only when the cache says "full" (producer) or "empty"
 *   (consumer), so in steady state neither side touches the other's line.
 *
 *   consumer_waiting / producer_waiting are Dekker-style handshakes: the
 *   sleeper stores its flag, issues a seq_cst fence, and re-checks the
 *   index; the waker stores the index, issues a seq_cst fence, and reads
 *   the flag.  At least one of the two sees the other's store, so a wake-up
 *   is never lost.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L   /* posix_memalign, clock_gettime */
#endif
#include "pglf_ring.h"
#include "pglf_platform.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct pglf_ring {
    /* producer-written line */
    alignas(PGLF_LINE) _Atomic uint64_t tail;
    _Atomic uint64_t stat_written;
    _Atomic uint64_t stat_markers;
    _Atomic uint64_t stat_dropped;

    /* producer-private line */
    alignas(PGLF_LINE) uint64_t cached_head;

    /* consumer-written line */
    alignas(PGLF_LINE) _Atomic uint64_t head;
    _Atomic uint64_t stat_delivered;

    /* consumer-private line */
    alignas(PGLF_LINE) uint64_t cached_tail;

    /* handshake flags, touched only around sleeping */
    alignas(PGLF_LINE) _Atomic uint32_t consumer_waiting;
    _Atomic uint32_t producer_waiting;
    _Atomic uint64_t producer_need;
    _Atomic uint32_t closed;
    /* detaching the producer: see pglf_ring_detach_producer() */
    _Atomic uint32_t producer_detached;
    _Atomic uint32_t producer_signalling;

    /* read-only after creation */
    alignas(PGLF_LINE) uint64_t capacity;
    uint64_t mask;
    int consumer_wfd;
    int consumer_rfd;
    int producer_wfd;
    unsigned char *data;
};

_Static_assert(offsetof(struct pglf_ring, cached_head) -
                       offsetof(struct pglf_ring, tail) >= PGLF_LINE,
               "producer fields share a line");
_Static_assert(offsetof(struct pglf_ring, head) -
                       offsetof(struct pglf_ring, cached_head) >= PGLF_LINE,
               "producer and consumer fields share a line");
_Static_assert(offsetof(struct pglf_ring, cached_tail) -
                       offsetof(struct pglf_ring, head) >= PGLF_LINE,
               "consumer fields share a line");
_Static_assert(sizeof(pglf_rec) == PGLF_REC_HDR, "record header size");
_Static_assert(PGLF_RING_LAYOUT_VERSION < 128 && PGLF_RING_ABI <= 0x7fffffffu,
               "PGLF_RING_ABI must fit in 31 bits");

#define RELAXED memory_order_relaxed
#define ACQUIRE memory_order_acquire
#define RELEASE memory_order_release
#define SEQ_CST memory_order_seq_cst

static uint64_t round_pow2(uint64_t v)
{
    uint64_t p = PGLF_MIN_CAPACITY;
    while (p < v)
        p <<= 1;
    return p;
}

uint32_t pglf_ring_abi(void) { return PGLF_RING_ABI; }

pglf_ring *pglf_ring_new(size_t capacity, int consumer_wfd, int consumer_rfd,
                         int producer_wfd)
{
    if (capacity > PGLF_MAX_CAPACITY)
        return NULL;
    uint64_t cap = round_pow2(capacity);
    pglf_ring *r = aligned_alloc(PGLF_LINE, sizeof(*r));
    if (r == NULL)
        return NULL;
    memset(r, 0, sizeof(*r));
    void *data = NULL;
    /* Not zeroed: pages are committed only when the producer reaches them,
     * so a large, mostly idle ring costs little resident memory. */
    if (posix_memalign(&data, PGLF_LINE, cap) != 0) {
        free(r);
        return NULL;
    }
    r->data = data;
    r->capacity = cap;
    r->mask = cap - 1;
    r->consumer_wfd = consumer_wfd;
    r->consumer_rfd = consumer_rfd;
    r->producer_wfd = producer_wfd;
    atomic_init(&r->tail, 0);
    atomic_init(&r->head, 0);
    return r;
}

void pglf_ring_free(pglf_ring *r)
{
    if (r == NULL)
        return;
    free(r->data);
    free(r);
}

size_t pglf_ring_capacity(const pglf_ring *r) { return (size_t)r->capacity; }

size_t pglf_ring_max_payload(const pglf_ring *r)
{
    return (size_t)(r->capacity / 2 - PGLF_REC_HDR);
}

size_t pglf_ring_used(const pglf_ring *r)
{
    /* Load head first: tail only grows, so used never appears negative. */
    uint64_t head = atomic_load_explicit(&((pglf_ring *)r)->head, ACQUIRE);
    uint64_t tail = atomic_load_explicit(&((pglf_ring *)r)->tail, ACQUIRE);
    return (size_t)(tail - head);
}

/* ------------------------------------------------------------------ */
/* producer                                                             */

int pglf_ring_write(pglf_ring *r, uint8_t kind, uint8_t reason, uint32_t chan,
                    int32_t pid, const void *payload, uint32_t len,
                    size_t reserve)
{
    if (kind != PGLF_KIND_NOTIFY && kind != PGLF_KIND_MARKER)
        return PGLF_EINVAL;   /* PAD records are the ring's own business */
    uint64_t size = pglf_rec_size(len);
    if (size > r->capacity / 2)
        return PGLF_E2BIG;
    if (reserve > r->capacity / 2)
        reserve = r->capacity / 2;

    /* Only the producer stores tail, so relaxed is enough here. */
    uint64_t tail = atomic_load_explicit(&r->tail, RELAXED);
    uint64_t off = tail & r->mask;
    uint64_t to_end = r->capacity - off;
    uint64_t pad = to_end < size ? to_end : 0;
    uint64_t limit = r->capacity - reserve;

    if (tail + pad + size - r->cached_head > limit) {
        /* Pairs with the release store of head in pglf_ring_consume() /
         * pglf_ring_drain(): the consumer is done with those bytes. */
        r->cached_head = atomic_load_explicit(&r->head, ACQUIRE);
        if (tail + pad + size - r->cached_head > limit)
            return PGLF_FULL;
    }

    if (pad >= PGLF_REC_HDR) {
        pglf_rec *p = (pglf_rec *)(r->data + off);
        p->len = (uint32_t)(pad - PGLF_REC_HDR);
        p->kind = PGLF_KIND_PAD;
        p->reason = 0;
        p->flags = 0;
        p->chan = 0;
        p->pid = 0;
    }
    /* pad < PGLF_REC_HDR: readers skip such a tail fragment implicitly. */

    unsigned char *dst = r->data + ((tail + pad) & r->mask);
    pglf_rec *h = (pglf_rec *)dst;
    h->len = len;
    h->kind = kind;
    h->reason = reason;
    h->flags = 0;
    h->chan = chan;
    h->pid = pid;
    if (len)
        memcpy(dst + PGLF_REC_HDR, payload, len);

    /* The producer is the only writer of these counters. */
    if (kind == PGLF_KIND_NOTIFY)
        PGLF_BUMP(r->stat_written, 1);
    else if (kind == PGLF_KIND_MARKER)
        PGLF_BUMP(r->stat_markers, 1);

    /* Publish.  Pairs with the acquire load of tail in the consumer. */
    atomic_store_explicit(&r->tail, tail + pad + size, RELEASE);
    return PGLF_OK;
}

size_t pglf_ring_free_bytes(pglf_ring *r)
{
    /* Pairs with the release store of head by the consumer. */
    r->cached_head = atomic_load_explicit(&r->head, ACQUIRE);
    return (size_t)(r->capacity -
                    (atomic_load_explicit(&r->tail, RELAXED) - r->cached_head));
}

int pglf_ring_wake_consumer(pglf_ring *r)
{
    /* Dekker handshake, waker side: tail was stored (release) by the writes
     * before; this fence orders it before the flag load.  Pairs with the
     * fence in pglf_ring_consumer_wait_arm(). */
    atomic_thread_fence(SEQ_CST);
    if (atomic_load_explicit(&r->consumer_waiting, RELAXED) == 0)
        return 0;
    if (atomic_exchange_explicit(&r->consumer_waiting, 0, RELAXED) == 0)
        return 0;
    pglf_fd_signal(r->consumer_wfd);
    return 1;
}

int pglf_ring_producer_wait_arm(pglf_ring *r, size_t need)
{
    atomic_store_explicit(&r->producer_need, need, RELAXED);
    /* Release: a consumer that sees the flag (acquire) also sees `need`. */
    atomic_store_explicit(&r->producer_waiting, 1, RELEASE);
    /* Dekker handshake, sleeper side.  Pairs with the fence in
     * release_to_producer(). */
    atomic_thread_fence(SEQ_CST);
    if (pglf_ring_free_bytes(r) >= need) {
        atomic_store_explicit(&r->producer_waiting, 0, RELAXED);
        return 1;
    }
    return 0;
}

void pglf_ring_producer_wait_disarm(pglf_ring *r)
{
    atomic_store_explicit(&r->producer_waiting, 0, RELAXED);
}

void pglf_ring_detach_producer(pglf_ring *r)
{
    /* Pairs with the seq_cst fetch_add in release_to_producer(): a consumer
     * either sees the flag and leaves the fd alone, or is counted in
     * producer_signalling, which is waited out below. */
    atomic_store_explicit(&r->producer_detached, 1, SEQ_CST);
    atomic_store_explicit(&r->producer_waiting, 0, RELAXED);
    /* Acquire pairs with the release fetch_sub there.  The wait covers a
     * consumer inside a handful of instructions and one write(2). */
    while (atomic_load_explicit(&r->producer_signalling, ACQUIRE))
        sched_yield();
}

void pglf_ring_count_dropped(pglf_ring *r, uint64_t n)
{
    PGLF_BUMP(r->stat_dropped, n);   /* producer-only counter */
}

/* ------------------------------------------------------------------ */
/* consumer                                                             */

uint64_t pglf_ring_consumer_pos(const pglf_ring *r)
{
    /* Only the consumer stores head. */
    return atomic_load_explicit(&((pglf_ring *)r)->head, RELAXED);
}

const pglf_rec *pglf_ring_peek(pglf_ring *r, uint64_t *pos)
{
    uint64_t p = *pos;
    for (;;) {
        if (p == r->cached_tail) {
            /* Pairs with the release store of tail in pglf_ring_write(): the
             * record bytes before it are visible after this load. */
            r->cached_tail = atomic_load_explicit(&r->tail, ACQUIRE);
            if (p == r->cached_tail) {
                *pos = p;
                return NULL;
            }
        }
        uint64_t off = p & r->mask;
        uint64_t to_end = r->capacity - off;
        if (to_end < PGLF_REC_HDR) {
            p += to_end;
            continue;
        }
        const pglf_rec *h = (const pglf_rec *)(r->data + off);
        if (h->kind == PGLF_KIND_PAD) {
            p += to_end;
            continue;
        }
        *pos = p + pglf_rec_size(h->len);
        return h;
    }
}

static void release_to_producer(pglf_ring *r, uint64_t pos)
{
    /* Pairs with the acquire load of head in pglf_ring_write(). */
    atomic_store_explicit(&r->head, pos, RELEASE);
    /* Dekker handshake, waker side.  Pairs with the fence in
     * pglf_ring_producer_wait_arm(). */
    atomic_thread_fence(SEQ_CST);
    /* Acquire pairs with the release store in pglf_ring_producer_wait_arm():
     * producer_need below is the one stored with this flag. */
    if (atomic_load_explicit(&r->producer_waiting, ACQUIRE)) {
        /* Announce the signal before looking at producer_detached: Dekker
         * handshake with pglf_ring_detach_producer(), so that the producer
         * never closes producer_wfd while it is being written.  The seq_cst
         * RMW pairs with the seq_cst store of producer_detached there. */
        atomic_fetch_add_explicit(&r->producer_signalling, 1, SEQ_CST);
        if (!atomic_load_explicit(&r->producer_detached, SEQ_CST)) {
            uint64_t tail = atomic_load_explicit(&r->tail, RELAXED);
            uint64_t need = atomic_load_explicit(&r->producer_need, RELAXED);
            if (r->capacity - (tail - pos) >= need &&
                atomic_exchange_explicit(&r->producer_waiting, 0, RELAXED))
                pglf_fd_signal(r->producer_wfd);
        }
        /* Release pairs with the acquire loads in the detach loop: the fd
         * write above happens before the producer may close the fd. */
        atomic_fetch_sub_explicit(&r->producer_signalling, 1, RELEASE);
    }
}

void pglf_ring_consume(pglf_ring *r, uint64_t pos, uint64_t notifications)
{
    if (notifications)
        PGLF_BUMP(r->stat_delivered, notifications);   /* consumer-only counter */
    release_to_producer(r, pos);
}

size_t pglf_ring_drain(pglf_ring *r, void *out, size_t out_cap,
                       size_t max_records, size_t *out_used)
{
    uint64_t pos = pglf_ring_consumer_pos(r);
    uint64_t start = pos;
    unsigned char *o = out;
    size_t used = 0, n = 0, notifies = 0;
    while (n < max_records) {
        uint64_t before = pos;
        const pglf_rec *h = pglf_ring_peek(r, &pos);
        if (h == NULL)
            break;
        size_t size = (size_t)pglf_rec_size(h->len);
        if (used + size > out_cap) {
            pos = before;
            break;
        }
        memcpy(o + used, h, PGLF_REC_HDR + h->len);
        used += size;
        n++;
        if (h->kind == PGLF_KIND_NOTIFY)
            notifies++;
    }
    if (pos != start)
        pglf_ring_consume(r, pos, notifies);
    if (out_used)
        *out_used = used;
    return n;
}

int pglf_ring_consumer_wait_arm(pglf_ring *r)
{
    atomic_store_explicit(&r->consumer_waiting, 1, RELAXED);
    /* Dekker handshake, sleeper side.  Pairs with the fence in
     * pglf_ring_wake_consumer(). */
    atomic_thread_fence(SEQ_CST);
    uint64_t head = atomic_load_explicit(&r->head, RELAXED);
    /* Pairs with the release store of tail in pglf_ring_write(). */
    uint64_t tail = atomic_load_explicit(&r->tail, ACQUIRE);
    if (tail != head || atomic_load_explicit(&r->closed, ACQUIRE)) {
        atomic_store_explicit(&r->consumer_waiting, 0, RELAXED);
        return 1;
    }
    return 0;
}

void pglf_ring_consumer_wait_disarm(pglf_ring *r)
{
    atomic_store_explicit(&r->consumer_waiting, 0, RELAXED);
}

int pglf_ring_wait(pglf_ring *r, int timeout_ms)
{
    int64_t deadline = timeout_ms >= 0 ? pglf_mono_ms() + timeout_ms : -1;
    for (;;) {
        if (pglf_ring_consumer_wait_arm(r))
            return atomic_load_explicit(&r->closed, ACQUIRE) &&
                           pglf_ring_used(r) == 0
                       ? PGLF_CLOSED
                       : PGLF_READY;
        int left = -1;
        if (deadline >= 0) {
            int64_t d = deadline - pglf_mono_ms();
            left = d > 0 ? (int)d : 0;
        }
        struct pollfd pfd = {.fd = r->consumer_rfd, .events = POLLIN};
        int rc = poll(&pfd, 1, left);
        if (rc < 0 || (pfd.revents & (POLLNVAL | POLLERR))) {
            int eintr = rc < 0 && errno == EINTR;
            pglf_ring_consumer_wait_disarm(r);
            return eintr ? PGLF_EINTR : PGLF_EINVAL;  /* EINVAL: unusable fd */
        }
        if (rc == 0) {
            pglf_ring_consumer_wait_disarm(r);
            /* A record may have landed between the poll timeout and now. */
            if (pglf_ring_used(r) != 0)
                return PGLF_READY;
            return atomic_load_explicit(&r->closed, ACQUIRE) ? PGLF_CLOSED
                                                             : PGLF_TIMEOUT;
        }
        /* Woken.  Keep a close signal for the other sleepers; otherwise
         * reset the fd and re-check. */
        if (!atomic_load_explicit(&r->closed, ACQUIRE))
            pglf_fd_clear(r->consumer_rfd);
    }
}

/* ------------------------------------------------------------------ */
/* any thread                                                           */

void pglf_ring_close(pglf_ring *r)
{
    if (atomic_exchange_explicit(&r->closed, 1, SEQ_CST) == 0 &&
        r->consumer_wfd >= 0)
        pglf_fd_signal(r->consumer_wfd);
}

int pglf_ring_closed(const pglf_ring *r)
{
    return (int)atomic_load_explicit(&((pglf_ring *)r)->closed, ACQUIRE);
}

uint64_t pglf_ring_stat_written(const pglf_ring *r)
{
    return atomic_load_explicit(&((pglf_ring *)r)->stat_written, RELAXED);
}

uint64_t pglf_ring_stat_markers(const pglf_ring *r)
{
    return atomic_load_explicit(&((pglf_ring *)r)->stat_markers, RELAXED);
}

uint64_t pglf_ring_stat_delivered(const pglf_ring *r)
{
    return atomic_load_explicit(&((pglf_ring *)r)->stat_delivered, RELAXED);
}

uint64_t pglf_ring_stat_dropped(const pglf_ring *r)
{
    return atomic_load_explicit(&((pglf_ring *)r)->stat_dropped, RELAXED);
}

void pglf_fd_signal(int fd)
{
    if (fd < 0)
        return;
    uint64_t one = 1;
    ssize_t rc;
    do {
        rc = write(fd, &one, sizeof(one));
    } while (rc < 0 && errno == EINTR);
    /* EAGAIN: an eventfd at its limit or a full pipe is already readable. */
}

void pglf_fd_clear(int fd)
{
    if (fd < 0)
        return;
    unsigned char buf[64];
    for (;;) {
        ssize_t rc = read(fd, buf, sizeof(buf));
        if (rc > 0 && (size_t)rc == sizeof(buf))
            continue;  /* a pipe may hold more */
        if (rc < 0 && errno == EINTR)
            continue;
        break;
    }
}
