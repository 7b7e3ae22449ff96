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

/*
 * Read and route what the socket has, without the final wake-up of the
 * consumers (the caller decides when).  *routed counts the notifications.
 * During a burst consumers are still woken every PGLF_WAKE_EVERY
 * notifications and at least once per batch window.
 */
static int pump_core(pglf_router *r, const pglf_libpq *pq, PGconn *conn,
                     int64_t window_us, unsigned *routed)
{
    /* Loaded once: the calls below (routing, waking) could otherwise make
     * the compiler reload them from the table on every notification. */
    pglf_PQconsumeInput_fn consume_input = pq->PQconsumeInput;
    pglf_PQnotifies_fn notifies = pq->PQnotifies;
    pglf_PQfreemem_fn freemem = pq->PQfreemem;
    pglf_PQisBusy_fn is_busy = pq->PQisBusy;
    int flags = 0;
    *routed = 0;
    if (pglf_router_blocked(r) && pglf_router_flush(r) == PGLF_BLOCKED)
        return PGLF_RUN_BLOCKED;
    int busy = pglf_router_busy(r);   /* set by the control path, not here */
    unsigned since_wake = 0;
    int64_t woken_at = 0;
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
        *routed += k;
        /* During a burst, read on while the socket has more, so consumers
         * are woken once per PGLF_WAKE_EVERY notifications instead of once
         * per socket read (each wake-up of a sleeping thread costs
         * microseconds), but never later than the batch window after the
         * first notification they have not been woken for. */
        if (flags || (busy && !is_busy(conn)) || k < PGLF_BURST_READ ||
            !readable_now(pq->PQsocket(conn), pglf_router_wake_fd(r)))
            break;
        int64_t now = pglf_mono_us();
        if (woken_at == 0)
            woken_at = now;
        else if (now - woken_at >= window_us) {
            since_wake = 0;
            woken_at = now;
            pglf_router_wake(r);
        }
    }
    if (busy && !is_busy(conn))
        flags |= PGLF_RUN_RESULT;
    return flags;
}

/* The batch window in effect (see pglf_set_batch_window()). */
static int64_t window_of(const pglf_pace *pace)
{
    return pace->window_us < 0 ? PGLF_HOLD_US : pace->window_us;
}

void pglf_set_batch_window(pglf_router *r, int window_us)
{
    pglf_router_pace(r)->window_us = window_us < 0 ? -1 : window_us;
}

int pglf_pump(pglf_router *r, const pglf_libpq *pq, PGconn *conn)
{
    unsigned routed;
    int flags = pump_core(r, pq, conn, window_of(pglf_router_pace(r)), &routed);
    pglf_router_wake(r);
    return flags;
}

/*
 * Record the pace of a read that routed `routed` (> 0) notifications at
 * `now`, and say whether to batch the next window (never with batching
 * off: a batch window of 0).  The pace is the smoothed time per
 * notification between reads; under PGLF_STREAM_GAP_US (a stream of over
 * ~10,000 a second) the consumers and this thread are both better off
 * batching: the thread sleeps through a window without watching the
 * socket, then reads what arrived meanwhile in one go and wakes each
 * consumer once, and goes on window after window while the stream lasts.
 * A trickle, or the first notification after a quiet spell, wakes them at
 * once.
 */
static int hold_wakeup(pglf_pace *pace, int64_t now, unsigned routed)
{
    if (pace->last_us != 0) {
        int64_t per = (now - pace->last_us) / (int64_t)routed;
        /* Smoothed over about four reads; one long gap resets it. */
        pace->gap_us = per > PGLF_HOLD_US * 4 ? per
                                              : pace->gap_us + (per - pace->gap_us) / 4;
    } else {
        pace->gap_us = PGLF_HOLD_US * 4;
    }
    pace->last_us = now;
    return pace->window_us != 0 && pace->gap_us < PGLF_STREAM_GAP_US;
}

/* poll() with a microsecond timeout (< 0: none). */
static int poll_us(struct pollfd *p, nfds_t n, int64_t timeout_us)
{
#ifdef __linux__
    if (timeout_us >= 0) {
        struct timespec ts = {.tv_sec = (time_t)(timeout_us / 1000000),
                              .tv_nsec = (long)(timeout_us % 1000000) * 1000};
        return ppoll(p, n, &ts, NULL);
    }
    return ppoll(p, n, NULL, NULL);
#else
    int ms = -1;
    if (timeout_us >= 0) {
        int64_t t = (timeout_us + 999) / 1000;
        ms = t < 0x7fffffff ? (int)t : 0x7fffffff;
    }
    return poll(p, n, ms);
#endif
}

int pglf_run(pglf_router *r, const pglf_libpq *pq, PGconn *conn, int wake_fd,
             int timeout_ms)
{
    int sock = pq->PQsocket(conn);
    if (sock < 0)
        return PGLF_RUN_ERROR;
    /* A long burst is read on in pump_core until this fd (commands, stop,
     * consumers that freed space) asks for attention. */
    pglf_router_set_wake_fd(r, wake_fd);
    pglf_pace *pace = pglf_router_pace(r);
    int64_t window = window_of(pace);
    int64_t deadline = timeout_ms >= 0 ? pglf_mono_us() + (int64_t)timeout_ms * 1000
                                       : -1;
    int64_t hold_until = -1;   /* consumers owed a wake-up by then */
    for (;;) {
        /* Queries are sent in non-blocking mode: push what is left of them
         * while reading, so neither side can block the other on a full
         * socket buffer. */
        int pending = pq->PQflush(conn);
        if (pending < 0)
            return PGLF_RUN_ERROR;
        int blocked = pglf_router_blocked(r);
        int64_t now = pglf_mono_us();
        int timed_out = deadline >= 0 && now >= deadline;
        if (hold_until >= 0 && (now >= hold_until || blocked || timed_out)) {
            /* The batch window is over: take in what arrived meanwhile,
             * then wake the consumers of everything routed. */
            unsigned routed = 0;
            int flags = blocked ? 0 : pump_core(r, pq, conn, window, &routed);
            pglf_router_wake(r);
            hold_until = -1;
            /* Every read counts towards the pace, even one that returns. */
            int fast = routed && hold_wakeup(pace, pglf_mono_us(), routed);
            if (flags)
                return flags;
            if (timed_out)
                return PGLF_RUN_TIMEOUT;
            /* While the stream keeps its pace, the next window starts at
             * once: the socket is not watched in between, so this thread
             * wakes once per window, not once per read. */
            if (fast && !pglf_router_busy(r))
                hold_until = pace->last_us + window;
            continue;
        }
        /* While holding, the socket is not watched for input: what arrives
         * is read at the end of the window, in one go.  While blocked it is
         * not read at all: the backlog stays in the server's notification
         * queue, not in this process. */
        int watch_in = !blocked && hold_until < 0;
        struct pollfd p[2] = {
            {.fd = wake_fd, .events = POLLIN},
            {.fd = watch_in || pending ? sock : -1,
             .events = (short)((watch_in ? POLLIN : 0) | (pending ? POLLOUT : 0))},
        };
        int64_t until = deadline;
        if (hold_until >= 0 && (until < 0 || hold_until < until))
            until = hold_until;
        int rc = poll_us(p, 2, until < 0 ? -1 : (until > now ? until - now : 0));
        if (rc < 0) {
            if (hold_until >= 0)
                pglf_router_wake(r);
            return errno == EINTR ? PGLF_RUN_EINTR : PGLF_RUN_ERROR;
        }
        if (rc == 0) {
            if (hold_until >= 0)
                continue;   /* the window closed: handled at the top */
            return PGLF_RUN_TIMEOUT;
        }
        int flags = 0;
        if (p[0].revents)
            flags |= PGLF_RUN_WAKE;
        if (watch_in && (p[1].revents & ~POLLOUT)) {
            unsigned routed;
            flags |= pump_core(r, pq, conn, window, &routed);
            now = pglf_mono_us();
            int fast = routed && hold_wakeup(pace, now, routed);
            if (fast && !flags && !pglf_router_busy(r))
                hold_until = now + window;
            else
                pglf_router_wake(r);
        }
        if (flags) {
            /* Back to the control path: nobody waits for a wake-up. */
            if (hold_until >= 0)
                pglf_router_wake(r);
            return flags;
        }
    }
}
