/*
 * pglf_readloop.h - the selector thread's read loop: libpq socket reads,
 * the burst and wake-up heuristics, and which libpq the code is linked
 * with.
 *
 * Thread role: called on the Listener's selector thread only (the one
 * thread that uses the connection, and the single producer of every
 * subscription ring), with the GIL released.  This is the only part of the
 * C code that touches libpq: the router it feeds (pglf_router.h) knows
 * nothing of connections.  pglf_readloop.c is compiled with libpq-fe.h and
 * linked with libpq; this header only needs the PGconn type name.
 */
#ifndef PGLF_READLOOP_H
#define PGLF_READLOOP_H

#include "pglf_router.h"

/* libpq's connection type (libpq-fe.h declares the same typedef). */
typedef struct pg_conn PGconn;

/* Wake consumers at least every this many notifications during a burst. */
#define PGLF_WAKE_EVERY 4096
/* A socket read that yields at least this many notifications looks like a
 * burst: check for more bytes before waking consumers. */
#define PGLF_BURST_READ 16

/* pglf_run / pglf_pump result flags */
#define PGLF_RUN_WAKE 1      /* the wake-up fd is readable */
#define PGLF_RUN_TIMEOUT 2   /* no byte from the server for timeout_ms */
#define PGLF_RUN_RESULT 4    /* the outstanding query has results to collect */
#define PGLF_RUN_ERROR 8     /* libpq reported an error: see PQerrorMessage */
#define PGLF_RUN_BLOCKED 16  /* a "block" ring is full; the socket is not read */
#define PGLF_RUN_EINTR 32    /* the wait was interrupted by a signal */

/*
 * Read what the socket has: PQconsumeInput, then route every PQnotifies
 * record and PQfreemem it, then wake consumers.  Returns PGLF_RUN_* flags.
 * (A burst is read on while the socket has more bytes and the wake-up fd
 * of the enclosing pglf_run, if any, is quiet; consumers are woken at
 * least every PGLF_WAKE_EVERY notifications.)
 */
int pglf_pump(pglf_router *r, PGconn *conn);

/*
 * The selector's wait loop: poll the libpq socket (unless blocked) and
 * `wake_fd`, pump whenever the socket is readable, and return only for a
 * control event: the wake-up fd, `timeout_ms` without a byte from the
 * server (< 0: none), results of the outstanding query, an error, or a
 * newly blocked ring.  Returns PGLF_RUN_* flags.
 */
int pglf_run(pglf_router *r, PGconn *conn, int wake_fd, int timeout_ms);

/*
 * Path of the libpq shared object these functions were linked with, or
 * NULL when it cannot be told.  Used at import to prove that psycopg's
 * PGconn* belongs to the same libpq.
 */
const char *pglf_libpq_path(void);

#endif /* PGLF_READLOOP_H */
