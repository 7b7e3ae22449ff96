/*
 * pglf_router.h - the selector thread's hot path: channel routing and
 * marker bookkeeping.
 *
 * Everything here is called on the Listener's selector thread only (the
 * single producer of every subscription ring), with the GIL released; the
 * counters are the exception: readable from any thread.  The router maps a
 * channel name to the subscriptions listening on it (pglf_chanmap.h); a
 * subscription (pglf_sub) is the producer-side state of one ring: which of
 * its channels are live, and the markers it still owes its consumer.  The
 * router knows nothing of libpq: the read loop (pglf_readloop.h) feeds it
 * with pglf_route() and the Python read path does the same.
 *
 * Delivery rules implemented here (DESIGN.md "Ordering and marker rules"):
 *   - a target stays inactive, so nothing is written for it, until the
 *     control path activates it with a "listen" or "reconnect" marker;
 *   - "drop" subscriptions that are full lose the notification, count it,
 *     and owe an "overflow" marker, written before anything else for that
 *     subscription once there is room;
 *   - "block" subscriptions that are full stop the router: the notification
 *     is kept aside and the socket is not read until the consumer frees
 *     space (pglf_router_flush);
 *   - markers never fail: notifications leave `reserve` bytes free for
 *     them, and a marker that still does not fit stays owed.
 */
#ifndef PGLF_ROUTER_H
#define PGLF_ROUTER_H

#include <stddef.h>
#include <stdint.h>

#include "pglf_ring.h"

#define PGLF_BLOCKED 9      /* a "block" ring is full; see pglf_router_flush */

/*
 * pglf_sub_state() results.  A channel of a subscription is "announced"
 * from its first activation on (its "listen" marker owed or written) and
 * "active" while notifications are routed to it.  Activation sets both;
 * pglf_router_deactivate_all() (connection lost) clears only "active".
 * The result is the number of the two that hold:
 *   PGLF_SUB_NEW     never activated: no marker yet, nothing routed;
 *   PGLF_SUB_LAPSED  announced, but not routed since the connection was
 *                    lost: it needs a "reconnect" activation (activation
 *                    sets both flags, so "active but not announced" never
 *                    happens);
 *   PGLF_SUB_LIVE    active and announced: routed, nothing to redo.
 */
#define PGLF_SUB_NEW 0
#define PGLF_SUB_LAPSED 1
#define PGLF_SUB_LIVE 2

typedef struct pglf_router pglf_router;
typedef struct pglf_sub pglf_sub;

pglf_router *pglf_router_new(void);
/* Frees the router and every subscription still registered. */
void pglf_router_free(pglf_router *r);

/*
 * Register a subscription over `ring` with `nchannels` channels (indices
 * 0..nchannels-1, names given with pglf_sub_attach).  `block` selects the
 * overflow policy; `reserve` is the number of bytes notifications leave
 * free for markers.  The ring must outlive the subscription.
 */
pglf_sub *pglf_sub_new(pglf_router *r, pglf_ring *ring, uint32_t nchannels,
                       int block, size_t reserve);
/* Map channel `name` (len bytes) to index `idx` of `s`; inactive. */
int pglf_sub_attach(pglf_router *r, pglf_sub *s, uint32_t idx,
                    const char *name, size_t len);
/* Unregister and free `s` (its ring is left alone). */
void pglf_sub_free(pglf_router *r, pglf_sub *s);

/*
 * Activate channel `idx` of `s`, owing its consumer a marker of `reason`
 * (PGLF_REASON_LISTEN or PGLF_REASON_RECONNECT).  The marker is written now
 * when it fits, else as soon as space frees.  Returns 1 if the marker is
 * still owed.
 */
int pglf_sub_activate(pglf_router *r, pglf_sub *s, uint32_t idx, uint8_t reason);
/* PGLF_SUB_NEW, _LAPSED or _LIVE (see above); PGLF_SUB_NEW for a bad idx. */
int pglf_sub_state(const pglf_sub *s, uint32_t idx);
/* Deactivate every channel of every subscription (connection lost). */
void pglf_router_deactivate_all(pglf_router *r);

/*
 * Route one notification to every active target of `channel`.  Returns
 * PGLF_OK, or PGLF_BLOCKED when a "block" ring is full: the notification is
 * kept aside (targets already served are remembered) and routing must not
 * be called again until pglf_router_flush() returns PGLF_OK.
 */
int pglf_route(pglf_router *r, const char *channel, size_t chan_len, int32_t pid,
               const char *payload, size_t payload_len);

/*
 * Write owed markers that now fit and retry a kept-aside notification.
 * Returns PGLF_OK or PGLF_BLOCKED.  Call when the producer wake-up fd fired.
 */
int pglf_router_flush(pglf_router *r);
/* 1 while a notification is kept aside (routing must wait). */
int pglf_router_blocked(const pglf_router *r);
/* 1 while any subscription is owed a marker. */
int pglf_router_owing(const pglf_router *r);

/* Wake the consumers of rings written since the last call. */
void pglf_router_wake(pglf_router *r);

/* Tell the pump that a query is outstanding (results must be collected). */
void pglf_router_set_busy(pglf_router *r, int busy);

/* For the read loop (pglf_readloop.c), on the selector thread: */
/* 1 while a query is outstanding (pglf_router_set_busy). */
int pglf_router_busy(const pglf_router *r);
/* The wake-up fd of the current pglf_run (-1 before the first): a burst is
 * read on only while it is quiet. */
void pglf_router_set_wake_fd(pglf_router *r, int fd);
/*
 * Arrival pacing, kept here for the read loop (pglf_readloop.c) across its
 * calls: when the last socket read routed notifications, the smoothed time
 * per notification between such reads (microseconds), and the batch window
 * (pglf_set_batch_window(); < 0 until set: the default).
 */
typedef struct pglf_pace {
    int64_t last_us;
    int64_t gap_us;
    int32_t window_us;
} pglf_pace;
pglf_pace *pglf_router_pace(pglf_router *r);
int pglf_router_wake_fd(const pglf_router *r);

/* Counters: written by the selector thread, readable from any thread. */
uint64_t pglf_router_received(const pglf_router *r);
uint64_t pglf_router_dropped(const pglf_router *r);
uint64_t pglf_router_markers(const pglf_router *r);

#endif /* PGLF_ROUTER_H */
