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

Where the parts live: one connection's queries, health checks and probes
in :mod:`._session`, channel bookkeeping in :mod:`._channels`, queries and
their answers in :mod:`._queries`, connection sources and backoff in
:mod:`._connect`, routing in :mod:`._router`, the subscriptions in
:mod:`._subs`.  This module holds the thread, the commands, connecting and
reconnecting, and the teardown.
"""

from __future__ import annotations

import select
import signal
import time
from collections import deque
from typing import Any

import psycopg

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
from ._ring import Ring, WakeFd
from ._router import Router, RouterCounters
from ._session import Context, Session, error_class
from ._state import ListenerState
from ._subs import Registry

__all__ = ["Engine"]


class Engine:
    """State and loop of the selector thread (private to the Listener).

    :param state: where the selector thread publishes what API threads
        read (connection state, counters, the first attempt's outcome).
    :param delivery_probes: prove delivery with probes from a second
        session: None behind a pooler only, True always, False never.
    :param queue_warning: server queue usage (0-1) that logs a warning.
    :param batch_window_us: the C read loop's batch window in microseconds
        (0: off; < 0: its default).
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
        batch_window_us: int = -1,
    ) -> None:
        self._source = source
        self._backoff = Backoff(reconnect_delay, max_reconnect_delay)
        self._state = state
        self._publish = state.publish
        self._first_attempt_reported = False

        self.wake = WakeFd()
        self._router = Router(batch_window_us)
        self._commands: deque[Command] = deque()
        self._stopping = False

        self._book = ChannelBook()
        self._subs = Registry(self._router, self._book)

        self._check = DeliveryCheck(source, self.wake, delivery_probes,
                                    health_check_timeout)
        self._ctx = Context(
            router=self._router, book=self._book, subs=self._subs,
            check=self._check, wake=self.wake, state=state,
            hc_interval=health_check_interval, hc_timeout=health_check_timeout,
            queue_warning=queue_warning,
            process_commands=self._process_commands, on_usable=self._usable,
        )
        self._session: Session | None = None
        self._attempt: ConnectAttempt | None = None
        self._next_connect = 0.0
        self._ever_connected = False

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
                                     extra=self._fields("internal_error", e))
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
        if self._process_commands():
            return
        if self._session is None:
            self._step_disconnected()
        else:
            self._session.step()

    def _process_commands(self) -> bool:
        """Run the queued commands; True when the thread must stop."""
        changed = False
        while self._commands:
            cmd = self._commands.popleft()
            if isinstance(cmd, AddSub):
                self._add(cmd.spec)
            else:
                self._subs.remove(cmd.spec)
            changed = True
        if changed and self._session is not None:
            self._session.sync()
        return self._stopping

    def _add(self, spec: SubSpec) -> None:
        session = self._session
        self._subs.add(spec, lambda ch: session is not None and session.usable
                       and self._book.in_effect(ch))

    def _fields(self, event: str, error: BaseException | None = None,
                **values: object) -> dict[str, object]:
        if self._session is not None:
            return self._session.fields(event, error, **values)
        return fields(event, error_class=error_class(error), **values)

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
                       extra=self._fields("connect_failed", err, retry_delay=delay))

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
            conn.pgconn.nonblocking = 1
        except Exception as e:
            self._source.release(conn)
            self._connect_failed(e)
            return
        try:
            self._session = Session(self._ctx, conn)
        except BaseException:
            self._source.release(conn)
            raise

    def _usable(self, pid: int) -> None:
        """The session is ready (and proven, behind a pooler)."""
        self._publish(connected=True, backend_pid=pid,
                      connect=True, reconnect=self._ever_connected)
        self._ever_connected = True
        logger.info("connected (backend pid %d)", pid,
                    extra=self._fields("connected"))
        self._report_first(None)

    # ------------------------------------------------------------------
    # connected
    # ------------------------------------------------------------------
    # loss
    def _close_conn(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()
            self._source.release(session.conn)

    def _lost(self, reason: str, error: BaseException | None = None) -> None:
        reason = " ".join(reason.split())  # libpq's messages span lines
        session = self._session
        pid = session.server_pid if session is not None and session.ready else None
        lived = time.monotonic() - session.opened_at if session is not None else 0.0
        ready = session is not None and session.usable
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
                                    retry_delay=delay, error_class=error_class(error)))
