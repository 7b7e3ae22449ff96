"""The selector thread: owns the connection, runs the control path.

One :class:`Engine` per Listener, running on the thread
``pglisten-fast-selector``, the only thread that ever touches the
connection.  API threads talk to it through :meth:`Engine.submit`,
:meth:`Engine.request_stop` and the wake-up fd.  In steady state the
thread sits in the read path (:mod:`._readpath`: poll, read, route, write
rings, wake consumers; in C without the GIL) and comes back here only for
control events: commands, query results, health-check timers, errors and
full "block" rings.

Connection life cycle::

    disconnected --(connect thread)--> connected: INIT query
        (backend pid, recovery check) --> SYNC: one query with every
        pending UNLISTEN/LISTEN --> markers, targets active --> steady state
    any failure --> deactivate every target, close, back off, reconnect

Where the parts live: channel bookkeeping in :mod:`._channels`, queries
and their answers in :mod:`._queries`, connection sources and backoff in
:mod:`._connect`, routing in :mod:`._router`, the subscriptions in :mod:`._subs`.
"""

from __future__ import annotations

import select
import signal
import time
from collections import deque
from typing import Any

import psycopg

from . import _queries as queries
from ._channels import ChannelBook
from ._commands import AddSub, Command, SubSpec
from ._connect import (
    HEALTHY_AFTER,
    Backoff,
    ConnectAttempt,
    SessionLost,
    Source,
    describe,
)
from ._log import fields, logger
from ._probe import DeliveryCheck
from ._queries import Query, QueryKind
from ._readpath import ReadPath, open_read_path
from ._ring import Ring, WakeFd
from ._router import Router, RouterCounters, RunFlag
from ._state import ListenerState
from ._subs import Registry

__all__ = ["Engine"]


#: Deadline allowance for very large LISTEN batches, per statement.
_SECONDS_PER_STATEMENT = 1e-4


class Engine:
    """State and loop of the selector thread (private to the Listener).

    :param state: where the selector thread publishes what API threads
        read (connection state, counters, the first attempt's outcome).
    :param delivery_probes: prove delivery with probes from a second
        session: None behind a pooler only, True always, False never.
    :param queue_warning: server queue usage (0-1) that logs a warning.
    """

    def __init__(
        self,
        *,
        source: Source,
        reconnect_delay: float,
        max_reconnect_delay: float,
        health_check_interval: float,
        health_check_timeout: float,
        state: ListenerState,
        delivery_probes: bool | None = None,
        queue_warning: float = 0.5,
    ) -> None:
        self._source = source
        self._backoff = Backoff(reconnect_delay, max_reconnect_delay)
        self._hc_interval = health_check_interval
        self._hc_timeout = health_check_timeout
        self._state = state
        self._publish = state.publish
        self._first_attempt_reported = False

        self.wake = WakeFd()
        self._router = Router()
        self._commands: deque[Command] = deque()
        self._stopping = False

        self._book = ChannelBook()
        self._subs = Registry(self._router, self._book)

        self._queue_warning = queue_warning
        self._queue_high = False
        self._check = DeliveryCheck(source, self.wake, delivery_probes,
                                    health_check_timeout)

        self._conn: psycopg.Connection[Any] | None = None
        self._reader: ReadPath | None = None
        self._ready = False                 # INIT query done
        self._usable = False                # and delivery proven if needed
        self._query: Query | None = None
        self._attempt: ConnectAttempt | None = None
        self._next_connect = 0.0
        self._connected_at = 0.0
        self._server_pid: int | None = None
        self._ever_connected = False
        self._blocked_logged = False

    # ------------------------------------------------------------------
    # API threads
    def submit(self, cmd: Command) -> None:
        """Queue a command for the selector thread (any thread)."""
        self._commands.append(cmd)
        self.wake.signal()

    def request_stop(self) -> None:
        """Ask the selector thread to close everything and end (any thread)."""
        self._stopping = True
        self.wake.signal()

    def make_ring(self, capacity: int) -> Ring:
        """A ring whose consumer wakes this thread when it frees space."""
        return Ring(capacity, producer_wfd=self.wake.wfd)

    def counters(self) -> RouterCounters:
        """``(received, dropped, markers)`` (any thread)."""
        return self._router.counters()

    def run(self) -> None:
        """The selector thread's body."""
        if hasattr(signal, "pthread_sigmask"):
            # Leave SIGINT/SIGTERM to the application's threads: a signal
            # landing here would only interrupt a poll for nothing.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            while not self._stopping:
                try:
                    self._step()
                except SessionLost as e:
                    self._lost(str(e), e.__cause__)
                except Exception as e:
                    logger.exception("unexpected error in the selector "
                                     "thread; resetting the connection",
                                     extra=self._fields("internal_error", error=e))
                    self._lost(f"internal error: {e!r}", e)
        finally:
            self.teardown()

    def teardown(self) -> None:
        """Close the connection and every subscription (the thread's last
        act; also run by stop() on a listener that never started)."""
        if self._attempt is not None:
            self._attempt.abandon()
            self._attempt = None
        self._check.close()
        try:
            self._close_conn()
        finally:
            # State first, then wake the consumers: whoever sees Closed also
            # sees a disconnected listener.
            self._publish(connected=False, channels=frozenset())
            specs = self._subs.specs()
            while self._commands:
                specs.append(self._commands.popleft().spec)
            for spec in specs:
                self._subs.remove(spec)
                spec.ring.close()
                spec.ring.detach_producer()
            # No ring signals this fd any more (each detached above; a ring
            # made by make_ring() after this point is detached by its maker).
            self.wake.close()

    # ------------------------------------------------------------------
    def _step(self) -> None:
        self._process_commands()
        if self._stopping:
            return
        if self._conn is None:
            self._step_disconnected()
        else:
            self._step_connected()

    def _process_commands(self) -> None:
        changed = False
        while self._commands:
            cmd = self._commands.popleft()
            if isinstance(cmd, AddSub):
                self._add(cmd.spec)
            else:
                self._remove(cmd.spec)
            changed = True
        if changed:
            self._sync()

    def _add(self, spec: SubSpec) -> None:
        self._subs.add(spec, lambda ch: self._usable and self._book.in_effect(ch))

    def _remove(self, spec: SubSpec) -> None:
        self._subs.remove(spec)

    # ------------------------------------------------------------------
    # disconnected
    def _wait_wake(self, timeout: float) -> None:
        if timeout <= 0:
            return
        # poll, not select: the fd may be numbered above FD_SETSIZE.
        p = select.poll()
        p.register(self.wake.rfd, select.POLLIN)
        p.poll(timeout * 1000)
        self.wake.clear()

    def _step_disconnected(self) -> None:
        att = self._attempt
        if att is None:
            now = time.monotonic()
            if now < self._next_connect:
                self._wait_wake(self._next_connect - now)
            else:
                self._attempt = ConnectAttempt(self._source, self.wake.signal)
            return
        if not att.done:
            left = att.overdue(time.monotonic())
            if left is None or left > 0:
                self._wait_wake(1.0 if left is None else min(left, 1.0))
                return
            # A user connect callable or a pool that ignores the timeout.
            att.abandon()
            self._attempt = None
            self._connect_failed(TimeoutError(
                f"connection attempt took over {self._source.attempt_bound:g} s"))
            return
        self._attempt = None
        if att.error is not None or att.conn is None:
            self._connect_failed(att.error)
        else:
            self._connected(att.conn)

    def _connect_failed(self, err: BaseException | None) -> None:
        msg = describe(err)
        self._publish(last_error=msg)
        if not self._report_first(err if err is not None else RuntimeError(msg)):
            return  # start(wait=True) raises it; no retry
        delay = self._backoff.next()
        self._next_connect = time.monotonic() + delay
        logger.warning("connection attempt failed (%s); "
                       "retrying in %.2f s", msg, delay,
                       extra=self._fields("connect_failed", error=err,
                                          retry_delay=delay))

    def _report_first(self, err: BaseException | None) -> bool:
        """Report the outcome of the first attempt; False: stop retrying."""
        if self._first_attempt_reported:
            return True
        self._first_attempt_reported = True
        if self._state.first_attempt(err):
            return True
        self._stopping = True
        return False

    def _connected(self, conn: psycopg.Connection[Any]) -> None:
        try:
            if not conn.autocommit:
                conn.autocommit = True
            pgconn = conn.pgconn
            pgconn.nonblocking = 1
        except Exception as e:
            self._source.release(conn)
            self._connect_failed(e)
            return
        self._conn = conn
        self._reader = open_read_path(self._router, pgconn, self.wake.rfd,
                                      lambda: self._query is not None)
        self._connected_at = time.monotonic()
        self._ready = False
        self._blocked_logged = False
        self._send(queries.init_sql(pgconn.parameter_status(b"server_encoding")),
                   QueryKind.INIT)

    # ------------------------------------------------------------------
    # connected
    def _deadline(self) -> float | None:
        return time.monotonic() + self._hc_timeout if self._hc_timeout > 0 else None

    def _send(self, sql: bytes, kind: QueryKind, **kw: Any) -> Query:
        assert self._conn is not None
        try:
            self._conn.pgconn.send_query(sql)
        except psycopg.Error as e:
            raise SessionLost(f"cannot send a query: {e}") from e
        self._query = q = Query(kind, self._deadline(), **kw)
        self._router.set_busy(True)
        return q

    def _step_connected(self) -> None:
        assert self._reader is not None
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
            timeout = self._hc_interval
        else:
            timeout = -1.0
        if self._check.deadline is not None and not self._router.blocked:
            left = max(0.0, self._check.deadline - time.monotonic())
            timeout = left if timeout < 0 else min(timeout, left)
        self._handle(self._reader.run(timeout))

    def _handle(self, flags: RunFlag) -> None:
        while flags:
            if flags & RunFlag.ERROR:
                assert self._conn is not None
                raise SessionLost(queries.text(self._conn.pgconn.error_message)
                                  or "connection lost")
            nxt = RunFlag.NONE
            if flags & RunFlag.WAKE:
                self.wake.clear()
                self._process_commands()
                if self._stopping:
                    return
                if self._check.pending:
                    self._probe_arrived()
                nxt |= self._flush_router()
            if flags & RunFlag.BLOCKED and not self._blocked_logged:
                self._blocked_logged = True
                logger.info("a subscription with overflow='block' is "
                            "full; reading paused until its consumer catches up",
                            extra=self._fields("block_paused"))
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
        self._sync()  # LISTENs requested while blocked
        assert self._reader is not None
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
        if self._hc_interval > 0:
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
        if q is None or self._conn is None:
            return RunFlag.NONE
        pgconn = self._conn.pgconn
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
        assert self._reader is not None
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
            self._sync()
        elif q.kind is QueryKind.INIT:
            self._session_ready(pid)
        elif q.kind is QueryKind.SYNC:
            self._sync_done(queries.sync_pid(q.results))

    def _session_ready(self, pid: int) -> None:
        assert self._conn is not None
        self._server_pid = pid
        self._ready = True
        client_pid = self._conn.pgconn.backend_pid
        # The key data came from something other than the backend: a pooler.
        pooled = client_pid != pid
        self._check.begin(pooled)
        if self._check.active:
            if pooled:
                logger.info(
                    "connected through a connection pooler (client-side pid "
                    "%d, server backend pid %d); proving delivery before "
                    "queueing markers", client_pid, pid,
                    extra=self._fields("pooler_detected"))
            if not self._check.registered:
                self._check.registered = True
                self._subs.add(self._check.spec, lambda ch: False)
        else:
            self._session_usable()
        self._sync()

    def _queue_sampled(self, usage: float | None) -> None:
        """Publish the server's queue usage; warn while it is high."""
        if usage is None:
            return
        self._publish(queue_usage=usage)
        high = usage >= self._queue_warning
        if high and not self._queue_high:
            logger.warning(
                "the server's notification queue is %.1f%% full (warning at "
                "%g%%): a listener that does not read (a full 'block' "
                "subscription, a session in a long transaction) holds it back; "
                "when it is full every NOTIFY in the cluster fails",
                usage * 100, self._queue_warning * 100,
                extra=self._fields("queue_high", queue_usage=usage))
        elif not high and self._queue_high:
            logger.info("the server's notification queue is back to %.1f%%",
                        usage * 100,
                        extra=self._fields("queue_normal", queue_usage=usage))
        self._queue_high = high

    def _fields(self, event: str, error: BaseException | None = None,
                **values: object) -> dict[str, object]:
        """Structured log fields, with the backend pid while connected."""
        return fields(event, backend_pid=self._server_pid if self._ready else None,
                      error_class=_class(error), **values)

    def _session_usable(self) -> None:
        """The session is ready and, if it needed proving, proven."""
        pid = self._server_pid
        self._usable = True
        self._publish(connected=True, backend_pid=pid,
                      connect=True, reconnect=self._ever_connected)
        self._ever_connected = True
        logger.info("connected (backend pid %d)", pid,
                    extra=self._fields("connected"))
        self._report_first(None)

    def _probe_arrived(self) -> bool:
        """Check for the pending probe; on the first proof of a connection,
        queue the markers held back until now."""
        if not self._check.arrived():
            return False
        if not self._check.proven:
            self._check.proven = True
            logger.info("delivery from other sessions proven (backend pid %s)",
                        self._server_pid, extra=self._fields("delivery_proven"))
            self._subs.listened(self._book.confirmed)
            self._session_usable()
        # Queries held back while the probe was out.
        self._sync()
        if self._query is None and self._hc_interval > 0:
            self._send(queries.PING_SQL, QueryKind.PING)
        return True

    def _sync_done(self, pid: int) -> None:
        if pid != self._server_pid:
            raise SessionLost(
                "LISTEN ran in a different server session than the one this "
                f"connection started with (backend pid {pid} != "
                f"{self._server_pid}): the connection goes through a "
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
                         extra=self._fields("listen_synced"))
        self._sync()

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
                         extra=self._fields("listen_refused", channel=ch))
            self._publish(last_error=reason)
            for spec in self._subs.on_channel(ch):
                self._remove(spec)
        else:
            logger.warning("LISTEN/UNLISTEN batch refused by the server (%s); "
                           "retrying channel by channel", msg,
                           extra=self._fields("listen_batch_refused"))
        self._sync()

    def _sync(self) -> None:
        """Send every pending LISTEN/UNLISTEN in one round trip."""
        if not self._ready or self._query is not None or self._conn is None:
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
        q = self._send(queries.sync_sql(self._conn.pgconn, batch), QueryKind.SYNC,
                       batch=batch)
        if q.deadline is not None:
            # Allow for very large channel sets (thousands of statements).
            n = len(batch.listen) + len(batch.unlisten)
            q.deadline += n * _SECONDS_PER_STATEMENT

    # ------------------------------------------------------------------
    # loss
    def _close_conn(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._conn = None
        self._query = None
        self._ready = self._usable = False
        self._check.begin(pooled=False)
        self._router.set_busy(False)
        self._router.deactivate_all()
        # A notification kept aside for a full "block" ring belongs to the
        # old connection: with every target inactive, flushing discards it.
        self._router.flush()
        self._book.reset()
        self._source.release(conn)

    def _lost(self, reason: str, error: BaseException | None = None) -> None:
        reason = " ".join(reason.split())  # libpq's messages span lines
        pid = self._server_pid if self._ready else None
        was_connected = self._conn is not None
        lived = time.monotonic() - self._connected_at if was_connected else 0.0
        ready = self._usable
        self._close_conn()
        self._publish(connected=False, channels=frozenset(), last_error=reason)
        if self._stopping:
            return
        if not ready and not self._report_first(SessionLost(reason)):
            # Failed before it was usable: the first attempt, under
            # start(wait=True), which raises it.
            return
        if lived >= HEALTHY_AFTER:
            self._backoff.reset()
        delay = self._backoff.next()
        self._next_connect = time.monotonic() + delay
        logger.warning("connection lost (%s); reconnecting in %.2f s",
                       reason, delay,
                       extra=fields("connection_lost", backend_pid=pid,
                                    retry_delay=delay, error_class=_class(error)))


def _class(error: BaseException | None) -> str | None:
    return None if error is None else type(error).__name__
