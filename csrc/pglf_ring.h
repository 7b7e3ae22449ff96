/*
 * pglf_ring.h - lock-free single-producer / single-consumer ring of
 * variable-length records.
 *
 * Thread roles (the whole contract of this file):
 *
 *   producer  - exactly one thread at a time: pglf_ring_write(),
 *               pglf_ring_free_bytes(), pglf_ring_wake_consumer(),
 *               pglf_ring_producer_wait_arm().  In pglisten_fast this is
 *               the Listener's selector thread.
 *   consumer  - exactly one thread at a time: pglf_ring_drain(),
 *               pglf_ring_peek(), pglf_ring_consume(), pglf_ring_wait(),
 *               pglf_ring_consumer_wait_arm().  pglisten_fast serialises
 *               concurrent consumers of one subscription with a lock.
 *   any       - pglf_ring_used(), pglf_ring_capacity(), pglf_ring_close(),
 *               pglf_ring_closed(), the statistics getters.
 *
 * Layout: capacity is a power of two in bytes; head and tail are
 * free-running 64-bit byte positions (used = tail - head, never reset).
 * Every record starts on an 8-byte boundary with a 16-byte header.  A
 * record never wraps: when it does not fit before the end of the buffer
 * the producer fills the rest with a PAD record (or leaves fewer than
 * PGLF_REC_HDR bytes, which readers skip implicitly) and writes at 0.
 *
 * There is one producer, so a record is written completely and then
 * published with a single release store of `tail`; no per-record busy bit
 * is needed (those exist for multi-producer rings).
 */
#ifndef PGLF_RING_H
#define PGLF_RING_H

#include <stddef.h>
#include <stdint.h>

#define PGLF_OK 0
#define PGLF_FULL 1     /* not enough free space now; try again later */
#define PGLF_E2BIG 2    /* record can never fit in this ring */
#define PGLF_EINVAL 3   /* bad argument */
#define PGLF_ENOMEM 4
#define PGLF_CLOSED 5   /* ring closed (wait) */
#define PGLF_TIMEOUT 6  /* nothing arrived within the timeout (wait) */
#define PGLF_READY 7    /* records are available (wait) */
#define PGLF_EINTR 8    /* wait interrupted by a signal */

/* record kinds */
#define PGLF_KIND_NOTIFY 1
#define PGLF_KIND_PAD 2
#define PGLF_KIND_MARKER 3

/* marker reasons (PGLF_KIND_MARKER records) */
#define PGLF_REASON_NONE 0
#define PGLF_REASON_LISTEN 1
#define PGLF_REASON_RECONNECT 2
#define PGLF_REASON_OVERFLOW 3

#define PGLF_REC_HDR 16
#define PGLF_REC_ALIGN 8
#define PGLF_MIN_CAPACITY 4096
#define PGLF_MAX_CAPACITY ((size_t)1 << 34)

typedef struct pglf_ring pglf_ring;

/*
 * Ring layout ABI.  A ring created by one extension module
 * (pglisten_fast._pglf) is drained by another (pglisten_fast._records)
 * through its address, and each module compiles its own copy of
 * pglf_ring.c: both copies must agree on the layout of struct pglf_ring and
 * of the records.  PGLF_RING_ABI is an integer constant expression that
 * fingerprints that layout: PGLF_RING_LAYOUT_VERSION in bits 24-30 (bump it
 * whenever a field or a record changes meaning without the sizes below
 * moving), and in bits 0-23 a mix of the sizes of the ring and of the record
 * header and of the offsets of fields both sides use.  It is below 2^31, so
 * it fits a C long.
 *
 * It names private fields, so it can only be evaluated where struct
 * pglf_ring is complete (pglf_ring.c); elsewhere call pglf_ring_abi(), which
 * returns the value of the copy of pglf_ring.c linked into the caller.
 * Both modules report theirs (_pglf: pglf_ring_abi(); _records: the
 * constant RING_ABI) so that the Python side can refuse a mismatch at
 * import.
 */
#define PGLF_RING_LAYOUT_VERSION 2u
#define PGLF_RING_ABI                                                       \
    ((uint32_t)(PGLF_RING_LAYOUT_VERSION << 24) |                           \
     (((uint32_t)sizeof(struct pglf_ring) * 29791u /* 31^3 */ +             \
       (uint32_t)offsetof(struct pglf_ring, head) * 961u /* 31^2 */ +       \
       (uint32_t)offsetof(struct pglf_ring, data) * 31u +                   \
       (uint32_t)sizeof(pglf_rec)) & 0xffffffu))

/* PGLF_RING_ABI of this copy of pglf_ring.c. */
uint32_t pglf_ring_abi(void);

/* The header every record starts with; the payload follows it directly. */
typedef struct pglf_rec {
    uint32_t len;     /* payload bytes (PAD: bytes skipped after the header) */
    uint8_t kind;     /* PGLF_KIND_* */
    uint8_t reason;   /* PGLF_REASON_* for markers, else 0 */
    uint16_t flags;   /* reserved, 0 */
    uint32_t chan;    /* channel index within the subscription */
    int32_t pid;      /* sender backend pid (0 for markers) */
} pglf_rec;

/* Bytes a record with a `len`-byte payload occupies in the ring. */
static inline uint64_t pglf_rec_size(uint64_t len)
{
    return (PGLF_REC_HDR + len + (PGLF_REC_ALIGN - 1)) & ~(uint64_t)(PGLF_REC_ALIGN - 1);
}

/*
 * Create a ring of `capacity` bytes (rounded up to a power of two, at least
 * PGLF_MIN_CAPACITY).  `consumer_wfd` is signalled (8-byte write of 1, as
 * for an eventfd) when a sleeping consumer must wake, and pglf_ring_wait()
 * polls `consumer_rfd` (the same fd for an eventfd, the read end of a
 * pipe); `producer_wfd` is signalled when a producer waiting for space must
 * wake.  Any may be -1.  The fds must be non-blocking and outlive the ring.
 * Returns NULL when out of memory or the capacity is out of range.
 */
pglf_ring *pglf_ring_new(size_t capacity, int consumer_wfd, int consumer_rfd,
                         int producer_wfd);
void pglf_ring_free(pglf_ring *r);

size_t pglf_ring_capacity(const pglf_ring *r);
/* Largest payload this ring accepts: a record of at most capacity / 2. */
size_t pglf_ring_max_payload(const pglf_ring *r);
/* Bytes in use (approximate when called from a third thread). */
size_t pglf_ring_used(const pglf_ring *r);

/*
 * Producer: append one record of `kind` PGLF_KIND_NOTIFY or
 * PGLF_KIND_MARKER unless doing so would leave fewer than `reserve` free
 * bytes (markers pass reserve = 0, notifications keep room for markers).
 * Returns PGLF_OK, PGLF_FULL, PGLF_E2BIG, or PGLF_EINVAL for another kind.
 * The record is visible to the consumer when this returns PGLF_OK.
 */
int pglf_ring_write(pglf_ring *r, uint8_t kind, uint8_t reason, uint32_t chan,
                    int32_t pid, const void *payload, uint32_t len,
                    size_t reserve);

/* Producer: free bytes as seen now (refreshes the cached head). */
size_t pglf_ring_free_bytes(pglf_ring *r);

/*
 * Producer: wake the consumer if it announced that it sleeps.  Returns 1
 * when a wake-up was sent.  Call after a batch of writes (coalescing).
 */
int pglf_ring_wake_consumer(pglf_ring *r);

/*
 * Producer: announce that the producer waits for `need` free bytes.
 * Returns 1 if that much space is already free (do not wait), else 0: the
 * consumer will signal producer_fd once it frees space.
 */
int pglf_ring_producer_wait_arm(pglf_ring *r, size_t need);
/* Producer: withdraw the announcement (e.g. when giving up). */
void pglf_ring_producer_wait_disarm(pglf_ring *r);
/*
 * Producer: leave the ring for good.  When this returns, no consumer will
 * signal producer_wfd any more, so the producer may close that fd while
 * consumers go on draining.  Idempotent.
 */
void pglf_ring_detach_producer(pglf_ring *r);

/*
 * Consumer: copy whole records (headers included, PAD records skipped) into
 * `out` until `max_records` were copied, the next record does not fit in
 * the remaining `out_cap` bytes or the ring is empty.  The head advances
 * once, with a single release store.  Returns the number of records and
 * stores the bytes written to `out` in *out_used.
 */
size_t pglf_ring_drain(pglf_ring *r, void *out, size_t out_cap,
                       size_t max_records, size_t *out_used);

/*
 * Consumer, zero-copy: return the next non-PAD record at or after *pos
 * (initialise *pos with pglf_ring_consumer_pos()), or NULL when none is
 * published.  *pos is advanced past the returned record.  Nothing is
 * released to the producer until pglf_ring_consume(r, *pos).
 */
uint64_t pglf_ring_consumer_pos(const pglf_ring *r);
const pglf_rec *pglf_ring_peek(pglf_ring *r, uint64_t *pos);
void pglf_ring_consume(pglf_ring *r, uint64_t pos, uint64_t notifications);

/*
 * Consumer: announce that the consumer is about to sleep.  Returns 1 if
 * records are already available or the ring is closed (do not sleep), else
 * 0: the producer will signal consumer_fd after its next publication.
 */
int pglf_ring_consumer_wait_arm(pglf_ring *r);
/*
 * Consumer: withdraw the announcement.  A signal the producer already sent
 * stays pending on the fd (clearing it could steal another sleeper's
 * wake-up); the next wait then returns at once and re-checks.
 */
void pglf_ring_consumer_wait_disarm(pglf_ring *r);

/*
 * Consumer: sleep until a record is available, the ring is closed, or
 * `timeout_ms` passes (< 0: no limit).  Returns PGLF_READY, PGLF_CLOSED,
 * PGLF_TIMEOUT, PGLF_EINTR, or PGLF_EINVAL when the fd cannot be polled
 * (closed: the fds must outlive the ring).
 */
int pglf_ring_wait(pglf_ring *r, int timeout_ms);

/* Any thread: mark closed and wake every sleeping consumer.  Idempotent. */
void pglf_ring_close(pglf_ring *r);
int pglf_ring_closed(const pglf_ring *r);

/* Statistics, any thread (relaxed, monotonic counters). */
uint64_t pglf_ring_stat_written(const pglf_ring *r);   /* notifications */
uint64_t pglf_ring_stat_markers(const pglf_ring *r);   /* marker records */
uint64_t pglf_ring_stat_delivered(const pglf_ring *r); /* notifications consumed */
uint64_t pglf_ring_stat_dropped(const pglf_ring *r);
/* Producer: count notifications it dropped for this ring. */
void pglf_ring_count_dropped(pglf_ring *r, uint64_t n);

/* Signal an eventfd or pipe (8-byte counter write); used by the router. */
void pglf_fd_signal(int fd);
/* Clear an eventfd or pipe without blocking. */
void pglf_fd_clear(int fd);

#endif /* PGLF_RING_H */
