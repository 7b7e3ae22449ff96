"""One live connection of the selector thread: its queries and health.

A :class:`Session` exists from the moment a connection is opened until it
is lost or the listener stops.  It runs the read path (:mod:`._readpath`)
until a control event, and handles what comes back: the INIT query (UTF-8,
backend pid, no hot standby), LISTEN/UNLISTEN batches and their markers,
health checks (which also sample the server's queue usage), delivery
probes behind a pooler, and "block" rings that hold reading up.  Any
failure raises :class:`~._connect.SessionLost`; the engine then closes the
session and reconnects.

What outlives a session (router, channel book, subscriptions, probes, the
listener's shared state) comes in a :class:`Context` from the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from . import _queries as queries
from ._channels import ChannelBook
from ._connect import SessionLost
from ._log import fields, logger
from ._probe import DeliveryCheck
from ._queries import Query, QueryKind
from ._readpath import ReadPath, open_read_path
from ._ring import WakeFd
from ._router import Router, RunFlag
from ._state import ListenerState
from ._subs import Registry

__all__ = ["Context", "Session", "error_class"]

#: Deadline allowance for very large LISTEN batches, per statement.
_SECONDS_PER_STATEMENT = 1e-4


@dataclass(eq=False)
class Context:
    """What sessions share with the selector thread, and what outlives them."""

    router: Router
    book: ChannelBook
    subs: Registry
    check: DeliveryCheck
    wake: WakeFd
    state: ListenerState
    hc_interval: float
    hc_timeout: float
    queue_warning: float
    #: Runs the queued commands; returns True when the thread must stop.
    process_commands: Callable[[], bool]
    #: The session is ready (and proven, behind a pooler): backend pid.
    on_usable: Callable[[int], None]
    queue_high: bool = False


class Session:
    """One connection, from its INIT query to its loss (selector thread)."""

    def __init__(self, ctx: Context, conn: psycopg.Connection[Any]) -> None:
        self._ctx = ctx
        self._router = ctx.router
        self._book = ctx.book
        self._subs = ctx.subs
        self._check = ctx.check
        self._publish = ctx.state.publish
        self._hc_interval = ctx.hc_interval
        self._hc_timeout = ctx.hc_timeout
        self.conn = conn
        pgconn = conn.pgconn
        self._reader: ReadPath = open_read_path(
            ctx.router, pgconn, ctx.wake.rfd, lambda: self._query is not None)
        self._query: Query | None = None
        self.ready = False              # INIT query done
        self.usable = False             # and delivery proven if needed
        self.server_pid: int | None = None
        self._blocked_logged = False
        self.opened_at = time.monotonic()
        # Health checks run on a fixed schedule, busy or not: each also
        # samples the server's notification queue.
        self._next_check = self.opened_at + ctx.hc_interval
        self._send(queries.init_sql(pgconn.parameter_status(b"server_encoding")),
                   QueryKind.INIT)

    def close(self) -> None:
        """Forget this connection's state (the engine releases ``conn``)."""
        self._reader.close()
        self._query = None
        self.ready = self.usable = False
        self._check.begin(pooled=False)
        self._router.set_busy(False)
        self._router.deactivate_all()
        # A notification kept aside for a full "block" ring belongs to the
        # old connection: with every target inactive, flushing discards it.
        self._router.flush()
        self._book.reset()

    def fields(self, event: str, error: BaseException | None = None,
               **values: object) -> dict[str, object]:
        """Structured log fields, with the backend pid once known."""
        return fields(event, backend_pid=self.server_pid if self.ready else None,
                      error_class=error_class(error), **values)

    def _deadline(self) -> float | None:
        return time.monotonic() + self._hc_timeout if self._hc_timeout > 0 else None

    def _send(self, sql: bytes, kind: QueryKind, **kw: Any) -> Query:
        try:
            self.conn.pgconn.send_query(sql)
        except psycopg.Error as e:
            raise SessionLost(f"cannot send a query: {e}") from e
        self._query = q = Query(kind, self._deadline(), **kw)
        self._router.set_busy(True)
        return q

    def step(self) -> None:
        """Wait, read and route until a control event, then handle it."""
        # A consumer may have freed space (or a full "block" subscription may
        # have left) since the last look: settle that before sleeping, since
        # what libpq already buffered would not wake the poll.
        flags = self._flush_router()
        if flags:
            self._handle(flags)
            return
        q = self._query
        if self._router.blocked:
            # The socket is not read while blocked: no pings, and no answer to
            # an outstanding query can arrive, so no deadline either.
            timeout = -1.0
        elif q is not None:
            timeout = -1.0 if q.deadline is None else \
                max(0.0, q.deadline - time.monotonic())
        elif self._hc_interval > 0:
            timeout = max(0.0, self._next_check - time.monotonic())
        else:
            timeout = -1.0
        if self._check.deadline is not None and not self._router.blocked:
            left = max(0.0, self._check.deadline - time.monotonic())
            timeout = left if timeout < 0 else min(timeout, left)
        self._handle(self._reader.run(timeout))

    def _handle(self, flags: RunFlag) -> None:
        while flags:
            if flags & RunFlag.ERROR:
                raise SessionLost(queries.text(self.conn.pgconn.error_message)
                                  or "connection lost")
            nxt = RunFlag.NONE
            if flags & RunFlag.WAKE:
                self._ctx.wake.clear()
                if self._ctx.process_commands():
                    return
                if self._check.pending:
                    self._probe_arrived()
                nxt |= self._flush_router()
            if flags & RunFlag.BLOCKED and not self._blocked_logged:
                self._blocked_logged = True
                logger.info("a subscription with overflow='block' is "
                            "full; reading paused until its consumer catches up",
                            extra=self.fields("block_paused"))
            if flags & RunFlag.RESULT:
                nxt |= self._collect()
            if flags & RunFlag.TIMEOUT:
                self._timeout()
            flags = nxt

    def _flush_router(self) -> RunFlag:
        """Pay owed markers and retry a kept-aside notification after a wake-up.

        Returns read-path flags: once unblocked, what libpq holds is read.
        """
        router = self._router
        was_blocked = router.blocked
        if not (was_blocked or router.owing) or router.flush():
            return RunFlag.NONE
        if not was_blocked:
            return RunFlag.NONE
        self._blocked_logged = False
        q = self._query
        if q is not None and q.deadline is not None:
            # Its answer could not be read while blocked: the clock starts
            # again now.
            q.deadline = max(q.deadline, self._deadline() or 0.0)
        self.sync()  # LISTENs requested while blocked
        return self._reader.pump()

    def _timeout(self) -> None:
        if self._router.blocked:
            return
        now = time.monotonic()
        if self._check.overdue(now) and not self._probe_arrived():
            raise SessionLost(
                "notifications committed by another session did not reach "
                f"the listener within {self._check.timeout:g} s: the "
                "connection goes through a pooler that does not keep the "
                "session (e.g. PgBouncer pool_mode=transaction), where LISTEN "
                "cannot work; connect directly or use session pooling")
        q = self._query
        if q is not None:
            if q.deadline is not None and now >= q.deadline:
                raise SessionLost(f"no answer to the {q.kind.value} within "
                                  f"{self._hc_timeout:g} s")
            return
        if self._hc_interval > 0 and now >= self._next_check:
            self._next_check = now + self._hc_interval
            if self._check.active and not self._check.pending:
                # Behind a pooler, a live connection is not enough: prove
                # that notifications still reach this session.  No query of
                # ours runs meanwhile (a transaction pooler would link the
                # session to us for it, and the probe could slip through);
                # the ping follows the probe.
                self._check.send(now)
            elif not self._check.pending:
                self._send(queries.PING_SQL, QueryKind.PING)

    def _collect(self) -> RunFlag:
        """Collect results of the outstanding query; returns read-path flags."""
        q = self._query
        if q is None:
            return RunFlag.NONE
        pgconn = self.conn.pgconn
        while True:
            if pgconn.is_busy():
                return RunFlag.NONE      # the rest has not arrived yet
            res = pgconn.get_result()
            if res is None:
                break
            q.results.append(res)
        self._query = None
        self._router.set_busy(False)
        self._query_done(q)
        # Parsing results may have queued notifications inside libpq.
        return self._reader.pump()

    def _query_done(self, q: Query) -> None:
        try:
            error = queries.first_error(q.results)
            pid = queries.check_init(q.results) \
                if error is None and q.kind is QueryKind.INIT else 0
        except queries.StandbyError as e:
            raise SessionLost(str(e)) from None
        if error is not None:
            msg, sqlstate = error
            if q.kind is QueryKind.SYNC and q.batch.listen and \
                    queries.is_refusal(sqlstate):
                self._sync_refused(msg)
                return
            # Anything else (cancelled, out of resources, ...) may pass: the
            # connection is reset and the whole state replayed.
            raise SessionLost(f"{q.kind.value} failed: {msg}")
        if q.kind is QueryKind.PING:
            self._queue_sampled(queries.queue_usage(q.results))
            # LISTENs requested while the ping was out go now.
            self.sync()
        elif q.kind is QueryKind.INIT:
            self._session_ready(pid)
        elif q.kind is QueryKind.SYNC:
            self._sync_done(queries.sync_pid(q.results))

    def _session_ready(self, pid: int) -> None:
        self.server_pid = pid
        self.ready = True
        client_pid = self.conn.pgconn.backend_pid
        # The key data came from something other than the backend: a pooler.
        pooled = client_pid != pid
        self._check.begin(pooled)
        if self._check.active:
            if pooled:
                logger.info(
                    "connected through a connection pooler (client-side pid "
                    "%d, server backend pid %d); proving delivery before "
                    "queueing markers", client_pid, pid,
                    extra=self.fields("pooler_detected"))
            if not self._check.registered:
                self._check.registered = True
                self._subs.add(self._check.spec, lambda ch: False)
        else:
            self._session_usable()
        self.sync()

    def _queue_sampled(self, usage: float | None) -> None:
        """Publish the server's queue usage; warn while it is high."""
        if usage is None:
            return
        self._publish(queue_usage=usage)
        ctx = self._ctx
        high = usage >= ctx.queue_warning
        if high and not ctx.queue_high:
            logger.warning(
                "the server's notification queue is %.1f%% full (warning at "
                "%g%%): a listener that does not read (a full 'block' "
                "subscription, a session in a long transaction) holds it back; "
                "when it is full every NOTIFY in the cluster fails",
                usage * 100, ctx.queue_warning * 100,
                extra=self.fields("queue_high", queue_usage=usage))
        elif not high and ctx.queue_high:
            logger.info("the server's notification queue is back to %.1f%%",
                        usage * 100,
                        extra=self.fields("queue_normal", queue_usage=usage))
        ctx.queue_high = high

    def _session_usable(self) -> None:
        """The session is ready and, if it needed proving, proven."""
        assert self.server_pid is not None
        self.usable = True
        self._ctx.on_usable(self.server_pid)

    def _probe_arrived(self) -> bool:
        """Check for the pending probe; on the first proof of a connection,
        queue the markers held back until now."""
        if not self._check.arrived():
            return False
        if not self._check.proven:
            self._check.proven = True
            logger.info("delivery from other sessions proven (backend pid %s)",
                        self.server_pid, extra=self.fields("delivery_proven"))
            # State first (connected, counters), then the markers: whoever
            # sees a marker also sees the listener connected.
            self._session_usable()
            self._subs.listened(self._book.confirmed)
        # Queries held back while the probe was out.
        self.sync()
        if self._query is None and self._hc_interval > 0:
            self._send(queries.PING_SQL, QueryKind.PING)
        return True

    def _sync_done(self, pid: int) -> None:
        if pid != self.server_pid:
            raise SessionLost(
                "LISTEN ran in a different server session than the one this "
                f"connection started with (backend pid {pid} != "
                f"{self.server_pid}): the connection goes through a "
                "transaction-pooling proxy (e.g. PgBouncer pool_mode="
                "transaction), which cannot keep LISTEN; connect directly or "
                "use session pooling")
        batch = self._book.confirm()
        # Published before the markers are queued: a consumer that sees the
        # "listen" marker also sees the channel in listener.channels.
        # The private probe channel is not the user's business.
        self._publish(channels=self._book.confirmed - set(self._check.spec.channels))
        check = self._check
        if check.proven:
            self._subs.listened(batch.listen)
        elif check.spec.channels[0] in batch.listen:
            # Only the probe channel goes live before the proof: the others'
            # markers wait until a probe from another session has arrived.
            self._subs.listened(check.spec.channels)
            check.send(time.monotonic())
        if batch.listen or batch.unlisten:
            logger.debug("LISTEN %d, UNLISTEN %d channel(s)",
                         len(batch.listen), len(batch.unlisten),
                         extra=self.fields("listen_synced"))
        self.sync()

    def _sync_refused(self, msg: str) -> None:
        """The server refused a LISTEN/UNLISTEN batch; nothing of it took effect.

        One refused channel must not cost the others their connection: the
        channels are retried one per query, and the subscriptions of a
        channel refused on its own are closed (their consumers get Closed
        once drained) with the reason logged and kept in ``last_error``.
        """
        ch = self._book.refuse()
        if ch is not None:
            reason = f"LISTEN {ch!r} refused by the server: {msg}"
            logger.error("%s; closing its subscriptions", reason,
                         extra=self.fields("listen_refused", channel=ch))
            self._publish(last_error=reason)
            for spec in self._subs.on_channel(ch):
                self._subs.remove(spec)
        else:
            logger.warning("LISTEN/UNLISTEN batch refused by the server (%s); "
                           "retrying channel by channel", msg,
                           extra=self.fields("listen_batch_refused"))
        self.sync()

    def sync(self) -> None:
        """Send every pending LISTEN/UNLISTEN in one round trip."""
        if not self.ready or self._query is not None:
            return
        if self._check.pending:
            # No query while a probe is out (see _timeout); sent when it
            # arrives.
            return
        if self._router.blocked:
            # Its answer could not be read until a "block" consumer catches
            # up; sent then (see _flush_router).
            return
        batch = self._book.next_batch()
        if batch is None:
            return
        q = self._send(queries.sync_sql(self.conn.pgconn, batch), QueryKind.SYNC,
                       batch=batch)
        if q.deadline is not None:
            # Allow for very large channel sets (thousands of statements).
            n = len(batch.listen) + len(batch.unlisten)
            q.deadline += n * _SECONDS_PER_STATEMENT


def error_class(error: BaseException | None) -> str | None:
    """The class name of ``error`` for log fields."""
    return None if error is None else type(error).__name__
