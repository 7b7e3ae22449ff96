/*
 * pglf_readloop.h - the selector thread's read loop: libpq socket reads
 * and the burst and wake-up heuristics.
 *
 * Thread role: called on the Listener's selector thread only (the one
 * thread that uses the connection, and the single producer of every
 * subscription ring), with the GIL released.  This is the only part of the
 * C code that calls libpq, always through the function table bound at run
 * time to psycopg's own libpq (pglf_libpq.h): the code is not linked with
 * libpq and includes no libpq header.  The router it feeds (pglf_router.h)
 * knows nothing of connections.
 *
 * The table is an argument of every call rather than a global set once:
 * no hidden state to initialise or get wrong (a call with an unbound table
 * cannot happen by accident), tests can bind several libraries side by
 * side, and the hot loop loads the few pointers it needs into locals once
 * per pglf_pump call, which costs what an indirect call through the PLT
 * costs.
 */
#ifndef PGLF_READLOOP_H
#define PGLF_READLOOP_H

#include "pglf_libpq.h"
#include "pglf_router.h"

/* Wake consumers at least every this many notifications during a burst. */
#define PGLF_WAKE_EVERY 4096
/*
 * The default batch window, in microseconds (pglf_set_batch_window()
 * changes it per router): the longest the read loop holds back a
 * sleeping consumer's wake-up.  During a long burst consumers are woken at
 * least this often.  A fast stream (over ~10,000 notifications a second:
 * less than PGLF_STREAM_GAP_US apart on average) is read in windows of
 * this length, window after window while it lasts: the selector sleeps
 * through each without watching the socket, then reads what arrived in one
 * go and wakes each consumer once.  So a notification of a fast stream
 * reaches a sleeping consumer within about one window of reaching the
 * socket (plus the time to read it), and both threads wake about once per
 * window instead of once per notification: at 20,000/s, 0.2 wake-ups per
 * notification instead of 2.
 */
#define PGLF_HOLD_US 500
#define PGLF_STREAM_GAP_US 100
/* A socket read that yields at least this many notifications looks like a
 * burst: check for more bytes before waking consumers. */
#define PGLF_BURST_READ 16

/* pglf_run / pglf_pump result flags */
#define PGLF_RUN_WAKE 1      /* the wake-up fd is readable */
#define PGLF_RUN_TIMEOUT 2   /* timeout_ms elapsed */
#define PGLF_RUN_RESULT 4    /* the outstanding query has results to collect */
#define PGLF_RUN_ERROR 8     /* libpq reported an error: see PQerrorMessage */
#define PGLF_RUN_BLOCKED 16  /* a "block" ring is full; the socket is not read */
#define PGLF_RUN_EINTR 32    /* the wait was interrupted by a signal */

/*
 * Set the batch window of the read loop fed by `r`, in microseconds: 0
 * turns the batching of fast streams off (a read wakes its consumers at
 * once, and a long burst wakes them on every further read), < 0 restores
 * the default, PGLF_HOLD_US.  Call it before the selector thread starts,
 * or on that thread between calls of pglf_run().
 */
void pglf_set_batch_window(pglf_router *r, int window_us);

/*
 * Read what the socket has: PQconsumeInput, then route every PQnotifies
 * record and PQfreemem it, then wake consumers.  `pq` is the libpq that
 * created `conn` (pglf_libpq_bind()).  Returns PGLF_RUN_* flags.
 * (A burst is read on while the socket has more bytes and the wake-up fd
 * of the enclosing pglf_run, if any, is quiet; consumers are woken at
 * least every PGLF_WAKE_EVERY notifications.)
 */
int pglf_pump(pglf_router *r, const pglf_libpq *pq, PGconn *conn);

/*
 * The selector's wait loop: poll the libpq socket (unless blocked) and
 * `wake_fd`, pump whenever the socket is readable, and return only for a
 * control event: the wake-up fd, `timeout_ms` elapsed (< 0: none; the
 * health-check schedule, kept whatever the traffic), results of the
 * outstanding query, an error, or a newly blocked ring.  Returns
 * PGLF_RUN_* flags.  Consumers are woken before it returns; within it,
 * about one batch window at most after a notification of theirs reached
 * the socket (see PGLF_HOLD_US and pglf_set_batch_window()).
 */
int pglf_run(pglf_router *r, const pglf_libpq *pq, PGconn *conn, int wake_fd,
             int timeout_ms);

#endif /* PGLF_READLOOP_H */
