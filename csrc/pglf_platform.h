/*
 * pglf_platform.h - what the ring, the router and the read loop share:
 * the cache-line size, the single-writer counter bump, and the monotonic
 * clock.  Header only, internal to the C code (nothing here is in the cdef).
 *
 * Include it after the feature-test macros: clock_gettime() needs
 * _POSIX_C_SOURCE >= 199309L, which strict -std=c11 does not give (the
 * package build defines _GNU_SOURCE; pglf_ring.c defines _POSIX_C_SOURCE
 * itself when nothing else did).
 */
#ifndef PGLF_PLATFORM_H
#define PGLF_PLATFORM_H

#include <limits.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

/* Two cache lines per hot field: defeats adjacent-line prefetch sharing. */
#define PGLF_LINE 128

_Static_assert(PGLF_LINE >= 64 && (PGLF_LINE & (PGLF_LINE - 1)) == 0,
               "PGLF_LINE must be a power of two of at least one cache line");

/*
 * Counters and ring indices are 64-bit atomics read by other threads (and,
 * for rings, by a second extension module through the ring's address): they
 * must be lock-free, never emulated with a lock.
 */
#if ULONG_MAX == UINT64_MAX
_Static_assert(ATOMIC_LONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");
#else
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");
#endif
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free");

/*
 * Single-writer counter bump: a relaxed load and store, no locked RMW.
 * Only for counters that exactly one thread writes (readers on other
 * threads load them relaxed and may see a slightly old value, never a torn
 * one).  `field` is an _Atomic lvalue, `n` is added to it.
 */
#define PGLF_BUMP(field, n)                                                    \
    atomic_store_explicit(&(field),                                            \
                          atomic_load_explicit(&(field), memory_order_relaxed) \
                              + (n),                                           \
                          memory_order_relaxed)

/* Microseconds on the monotonic clock. */
static inline int64_t pglf_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Milliseconds on the monotonic clock (deadlines of poll-based waits). */
static inline int64_t pglf_mono_ms(void)
{
    return pglf_mono_us() / 1000;
}

#endif /* PGLF_PLATFORM_H */
