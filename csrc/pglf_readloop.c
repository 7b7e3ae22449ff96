/*
 * pglf_readloop.c - the libpq read loop: socket waits, PQconsumeInput /
 * PQnotifies into the router, and the burst and wake-up heuristics.
 *
 * libpq is called only through the table bound at run time (pglf_libpq.h):
 * no libpq header, no link with libpq.  Single-threaded by contract: every
 * function runs on the selector thread.  See pglf_readloop.h.
 */
#include "pglf_readloop.h"
#include "pglf_platform.h"

#include <errno.h>
#include <poll.h>
#include <string.h>

/*
 * libpq allocates a PGnotify and its two strings in one block: the channel
 * name right after the struct, the payload right after the name's NUL.
 * When that layout is recognised the name's length is known without a
 * strlen; otherwise measure it.
 */
static size_t relname_len(const pglf_notify *n)
{
    /* Names are shorter than NAMEDATALEN (64) bytes. */
    if (n->relname == (char *)(n + 1) && n->extra > n->relname &&
        n->extra - n->relname <= 64) {
        size_t len = (size_t)(n->extra - n->relname) - 1;
        if (n->relname[len] == '\0')
            return len;
    }
    return strlen(n->relname);
}

/* More bytes are waiting on the socket, and no control event is. */
static int readable_now(int sock, int wake_fd)
{
    struct pollfd p[2] = {{.fd = sock, .events = POLLIN},
                          {.fd = wake_fd, .events = POLLIN}};
    if (sock < 0 || poll(p, 2, 0) <= 0)
        return 0;
    return (p[0].revents & POLLIN) && !p[1].revents;
}

int pglf_pump(pglf_router *r, const pglf_libpq *pq, PGconn *conn)
{
    /* Loaded once: the calls below (routing, waking) could otherwise make
     * the compiler reload them from the table on every notification. */
    pglf_PQconsumeInput_fn consume_input = pq->PQconsumeInput;
    pglf_PQnotifies_fn notifies = pq->PQnotifies;
    pglf_PQfreemem_fn freemem = pq->PQfreemem;
    pglf_PQisBusy_fn is_busy = pq->PQisBusy;
    int flags = 0;
    if (pglf_router_blocked(r) && pglf_router_flush(r) == PGLF_BLOCKED)
        return PGLF_RUN_BLOCKED;
    int busy = pglf_router_busy(r);   /* set by the control path, not here */
    unsigned since_wake = 0;
    for (;;) {
        if (!consume_input(conn))
            flags |= PGLF_RUN_ERROR;
        pglf_notify *n;
        unsigned k = 0;
        while ((n = notifies(conn)) != NULL) {
            int rc = pglf_route(r, n->relname, relname_len(n), n->be_pid,
                                n->extra, strlen(n->extra));
            freemem(n);
            if (rc == PGLF_BLOCKED) {
                flags |= PGLF_RUN_BLOCKED;
                break;
            }
            k++;
            if (++since_wake == PGLF_WAKE_EVERY) {
                since_wake = 0;
                pglf_router_wake(r);
            }
        }
        /* During a burst, read on while the socket has more, so consumers
         * are woken once per PGLF_WAKE_EVERY notifications instead of once
         * per socket read (each wake-up of a sleeping thread costs
         * microseconds).  A trickle wakes them at once: no latency is added
         * there. */
        if (flags || (busy && !is_busy(conn)) || k < PGLF_BURST_READ ||
            !readable_now(pq->PQsocket(conn), pglf_router_wake_fd(r)))
            break;
    }
    pglf_router_wake(r);
    if (busy && !is_busy(conn))
        flags |= PGLF_RUN_RESULT;
    return flags;
}

int pglf_run(pglf_router *r, const pglf_libpq *pq, PGconn *conn, int wake_fd,
             int timeout_ms)
{
    int sock = pq->PQsocket(conn);
    if (sock < 0)
        return PGLF_RUN_ERROR;
    /* A long burst is read on in pglf_pump until this fd (commands, stop,
     * consumers that freed space) asks for attention. */
    pglf_router_set_wake_fd(r, wake_fd);
    int64_t deadline = timeout_ms >= 0 ? pglf_mono_ms() + timeout_ms : -1;
    for (;;) {
        /* Queries are sent in non-blocking mode: push what is left of them
         * while reading, so neither side can block the other on a full
         * socket buffer. */
        int pending = pq->PQflush(conn);
        if (pending < 0)
            return PGLF_RUN_ERROR;
        int blocked = pglf_router_blocked(r);
        struct pollfd p[2] = {
            {.fd = wake_fd, .events = POLLIN},
            /* While blocked the socket is not read: the backlog stays in the
             * server's notification queue, not in this process. */
            {.fd = blocked && !pending ? -1 : sock,
             .events = (short)((blocked ? 0 : POLLIN) | (pending ? POLLOUT : 0))},
        };
        int left = -1;
        if (deadline >= 0) {
            int64_t d = deadline - pglf_mono_ms();
            left = d > 0 ? (int)(d < 0x7fffffff ? d : 0x7fffffff) : 0;
        }
        int rc = poll(p, 2, left);
        if (rc < 0)
            return errno == EINTR ? PGLF_RUN_EINTR : PGLF_RUN_ERROR;
        if (rc == 0)
            return PGLF_RUN_TIMEOUT;
        int flags = 0;
        if (p[0].revents)
            flags |= PGLF_RUN_WAKE;
        if (p[1].revents & ~POLLOUT) {
            flags |= pglf_pump(r, pq, conn);
            if (deadline >= 0)
                deadline = pglf_mono_ms() + timeout_ms;
        }
        if (flags)
            return flags;
    }
}
