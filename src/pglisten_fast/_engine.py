"""The selector thread: owns the connection, runs the control path.

One :class:`Engine` per Listener, running on the thread
``pglisten-fast-selector``, the only thread that ever touches the
connection.  API threads talk to it through a command queue and a wake-up
fd.  In steady state the thread sits in C (``pglf_run``: poll, read,
route, write rings, wake consumers) without the GIL, and comes back to
Python only for control events: commands, query results (LISTEN, pings),
health-check timers, errors, and full "block" rings.

Connection life cycle::

    disconnected --(connect thread)--> connected: "init" query
        (backend pid, recovery check) --> sync: one query with every
        pending UNLISTEN/LISTEN --> markers, targets active --> steady state
    any failure --> deactivate every target, close, back off, reconnect
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq

from . import _hotpath
from ._hotpath import (
    BLOCKED,
    RUN_BLOCKED,
    RUN_EINTR,
    RUN_ERROR,
    RUN_RESULT,
    RUN_TIMEOUT,
    RUN_WAKE,
)
from ._pglf import ffi, lib
from ._ring import REASON_RECONNECT, WakeFd

if TYPE_CHECKING:
    from .subscription import Subscription

logger = logging.getLogger("pglisten_fast")

#: A connection that stayed up this long resets the reconnect backoff.
HEALTHY_AFTER = 10.0

_ACTIVE_STATE = 2  # pglf_sub_state: active and announced

Connector = Callable[[], "psycopg.Connection[Any]"]


class _Lost(Exception):
    """The connection is unusable; the message says why."""


@dataclass(slots=True)
class _SubRec:
    sub: Subscription
    csub: Any
    channels: tuple[str, ...]


@dataclass(slots=True)
class _Query:
    kind: str                      # "init", "sync" or "ping"
    deadline: float | None
    listen: list[str] = field(default_factory=list)
    unlisten: list[str] = field(default_factory=list)
    results: list[pq.abc.PGresult] = field(default_factory=list)


class _ConnectAttempt:
    """A connection being opened on a helper thread (so stop never waits)."""

    def __init__(self, connector: Connector, release: Callable[[Any], None],
                 wake: WakeFd) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        self.error: BaseException | None = None
        self.done = False
        self._abandoned = False
        self._lock = threading.Lock()
        self._connector = connector
        self._release = release
        self._wake = wake
        self.started = time.monotonic()
        self.thread = threading.Thread(
            target=self._run, name="pglisten-fast-connect", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        conn = None
        err: BaseException | None = None
        try:
            conn = self._connector()
        except BaseException as e:  # reported to the selector thread
            err = e
        with self._lock:
            abandoned = self._abandoned
            self.conn, self.error, self.done = conn, err, True
        if abandoned:
            if conn is not None:
                self._release(conn)
        else:
            self._wake.signal()

    def abandon(self) -> None:
        """Give up on the attempt; a late connection is closed by the helper."""
        with self._lock:
            self._abandoned = True
            conn, self.conn = self.conn, None
        if conn is not None:
            self._release(conn)


class Engine:
    """State and loop of the selector thread (private to :class:`Listener`)."""

    def __init__(
        self,
        *,
        connector: Connector,
        release: Callable[[Any], None],
        connect_timeout: float | None,
        reconnect_delay: float,
        max_reconnect_delay: float,
        health_check_interval: float,
        health_check_timeout: float,
        wake: WakeFd,
        publish: Callable[..., None],
        on_first_attempt: Callable[[BaseException | None], bool],
    ) -> None:
        self.connector = connector
        self.release = _guarded(release)
        self.connect_timeout = connect_timeout
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.hc_interval = health_check_interval
        self.hc_timeout = health_check_timeout
        self.wake = wake
        self.publish = publish              # pushes state to the Listener
        self.on_first_attempt = on_first_attempt
        self.first_attempt_reported = False

        router = lib.pglf_router_new()
        if router == ffi.NULL:
            raise MemoryError("cannot allocate the notification router")
        self.router = ffi.gc(router, lib.pglf_router_free)

        self.commands: deque[tuple[str, Subscription]] = deque()
        self.stopping = False

        self.subs: dict[Subscription, _SubRec] = {}
        self.attached: dict[str, list[tuple[_SubRec, int]]] = {}
        self.desired: dict[str, int] = {}
        self.server: set[str] = set()
        # Channels to LISTEN one per query: a batch containing them failed.
        self.isolate: set[str] = set()

        self.conn: psycopg.Connection[Any] | None = None
        self.pgconn: pq.abc.PGconn | None = None
        self.conn_ptr: Any = None
        self.poller: Any = None
        self.sock = -1
        self.sock_events: int | None = None   # registered events of sock
        self.ready = False                  # init query done
        self.query: _Query | None = None
        self.attempt: _ConnectAttempt | None = None
        self.next_connect = 0.0
        self.failures = 0
        self.connected_at = 0.0
        self.server_pid: int | None = None
        self.ever_connected = False
        self.blocked_logged = False

        self.use_c = _hotpath.IMPL == "c"

    # ------------------------------------------------------------------
    # thread entry
    def run(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            # Leave SIGINT/SIGTERM to the application's threads: a signal
            # landing here would only interrupt a poll for nothing.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            while not self.stopping:
                try:
                    self._step()
                except _Lost as e:
                    self._lost(str(e))
                except Exception as e:
                    logger.exception("unexpected error in the selector "
                                     "thread; resetting the connection")
                    self._lost(f"internal error: {e!r}")
        finally:
            self._teardown()

    def _step(self) -> None:
        self._process_commands()
        if self.stopping:
            return
        if self.conn is None:
            self._step_disconnected()
        else:
            self._step_connected()

    # ------------------------------------------------------------------
    # commands from API threads
    def _process_commands(self) -> None:
        changed = False
        while self.commands:
            op, sub = self.commands.popleft()
            if op == "add":
                self._add(sub)
            else:
                self._remove(sub)
            changed = True
        if changed and self.ready and self.query is None:
            self._sync()

    @staticmethod
    def _encode(name: str) -> bytes:
        # The connection is switched to UTF-8 (see _connected): every name
        # is representable and arrives back from the server byte-identical.
        # (listen() refused names that are not valid Unicode.)
        return name.encode("utf-8")

    def _add(self, sub: Subscription) -> None:
        if sub in self.subs or sub.closed:
            return
        ring = sub._ring
        n = len(sub.channels)
        reserve = min(ring.capacity // 4, 64 * n + 64)
        csub = lib.pglf_sub_new(
            self.router, ring.ptr, n, 1 if sub.overflow == "block" else 0, reserve
        )
        if csub == ffi.NULL:
            raise MemoryError("cannot allocate a subscription")
        rec = _SubRec(sub, csub, sub.channels)
        self.subs[sub] = rec
        inflight_unlisten = set(self.query.unlisten) if self.query else set()
        for idx, ch in enumerate(sub.channels):
            raw = self._encode(ch)
            if lib.pglf_sub_attach(self.router, csub, idx, raw, len(raw)) != 0:
                raise MemoryError("cannot register a channel")
            self.attached.setdefault(ch, []).append((rec, idx))
            self.desired[ch] = self.desired.get(ch, 0) + 1
            if self.ready and ch in self.server and ch not in inflight_unlisten:
                # Already LISTENed on this connection: in effect right now.
                lib.pglf_sub_activate(self.router, csub, idx, REASON_RECONNECT)
        lib.pglf_router_wake(self.router)

    def _remove(self, sub: Subscription) -> None:
        rec = self.subs.pop(sub, None)
        if rec is None:
            return
        lib.pglf_sub_free(self.router, rec.csub)
        rec.csub = None
        for idx, ch in enumerate(rec.channels):
            targets = self.attached.get(ch, [])
            targets[:] = [t for t in targets if not (t[0] is rec and t[1] == idx)]
            if not targets:
                self.attached.pop(ch, None)
            left = self.desired.get(ch, 0) - 1
            if left > 0:
                self.desired[ch] = left
            else:
                self.desired.pop(ch, None)
        sub._closed_by_listener()

    # ------------------------------------------------------------------
    # disconnected
    def _wait_wake(self, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        # poll, not select: the fd may be numbered above FD_SETSIZE.
        p = select.poll()
        p.register(self.wake.rfd, select.POLLIN)
        p.poll(None if timeout is None else timeout * 1000)
        self.wake.clear()

    def _step_disconnected(self) -> None:
        att = self.attempt
        if att is not None:
            if not att.done:
                if self.connect_timeout is None:
                    self._wait_wake(1.0)
                    return
                left = att.started + self.connect_timeout + 1.0 - time.monotonic()
                if left > 0:
                    self._wait_wake(min(left, 1.0))
                    return
                # A user connect callable or a pool that ignores the timeout.
                att.abandon()
                self.attempt = None
                self._connect_failed(TimeoutError(
                    f"connection attempt took over {self.connect_timeout:g} s"))
                return
            self.attempt = None
            if att.error is not None or att.conn is None:
                self._connect_failed(att.error)
            else:
                self._connected(att.conn)
            return
        now = time.monotonic()
        if now < self.next_connect:
            self._wait_wake(self.next_connect - now)
            return
        self.attempt = _ConnectAttempt(self.connector, self.release, self.wake)

    def _backoff(self) -> float:
        base = min(self.max_reconnect_delay,
                   self.reconnect_delay * (2 ** min(self.failures, 30)))
        self.failures += 1
        return float(min(self.max_reconnect_delay, base * random.uniform(0.8, 1.2)))

    def _connect_failed(self, err: BaseException | None) -> None:
        msg = _describe(err)
        self.publish(last_error=msg)
        if not self._report_first(err if err is not None else RuntimeError(msg)):
            return  # start(wait=True) raises it; no retry
        delay = self._backoff()
        self.next_connect = time.monotonic() + delay
        logger.warning("connection attempt failed (%s); "
                       "retrying in %.2f s", msg, delay)

    def _report_first(self, err: BaseException | None) -> bool:
        """Report the outcome of the first attempt; False: stop retrying."""
        if self.first_attempt_reported:
            return True
        self.first_attempt_reported = True
        if self.on_first_attempt(err):
            return True
        self.stopping = True
        return False

    def _connected(self, conn: psycopg.Connection[Any]) -> None:
        try:
            if not conn.autocommit:
                conn.autocommit = True
            pgconn = conn.pgconn
            pgconn.nonblocking = 1
            sock = pgconn.socket
        except Exception as e:
            self.release(conn)
            self._connect_failed(e)
            return
        self.conn = conn
        self.pgconn = pgconn
        ptr = getattr(pgconn, "pgconn_ptr", None)
        self.conn_ptr = ffi.cast("PGconn *", ptr) if ptr else None
        if self.conn_ptr is None:
            self.use_c = False
        self.poller = select.poll()
        self.poller.register(self.wake.rfd, select.POLLIN)
        self.poller.register(sock, select.POLLIN)
        self.sock = sock
        self.sock_events = select.POLLIN
        self.connected_at = time.monotonic()
        self.ready = False
        self.server = set()
        self.blocked_logged = False
        # UTF-8 on this connection whatever the user's default: channel names
        # in any script can be LISTENed, and payloads decode in C on the
        # fast path.  The server converts from the database encoding, except
        # from SQL_ASCII, which has no conversions (and would end the session
        # on a byte that is not UTF-8): there the bytes come through as they
        # are, and undecodable ones become U+FFFD.
        server_enc = pgconn.parameter_status(b"server_encoding")
        client_enc = b"SQL_ASCII" if server_enc == b"SQL_ASCII" else b"UTF8"
        self._send(b"SET client_encoding TO '" + client_enc + b"'; "
                   b"SELECT pg_backend_pid(), pg_is_in_recovery()",
                   _Query("init", self._query_deadline()))

    # ------------------------------------------------------------------
    # connected
    def _query_deadline(self) -> float | None:
        return time.monotonic() + self.hc_timeout if self.hc_timeout > 0 else None

    def _send(self, sql: bytes, q: _Query) -> None:
        assert self.pgconn is not None
        try:
            self.pgconn.send_query(sql)
        except psycopg.Error as e:
            raise _Lost(f"cannot send a query: {e}") from e
        self.query = q
        lib.pglf_router_set_busy(self.router, 1)

    def _step_connected(self) -> None:
        # A consumer may have freed space (or a full "block" subscription may
        # have left) since the last look: settle that before sleeping, since
        # what libpq already buffered would not wake the poll.
        flags = self._flush_router()
        if flags:
            self._handle(flags)
            return
        now = time.monotonic()
        q = self.query
        if lib.pglf_router_blocked(self.router):
            # The socket is not read while blocked: no pings, and no answer to
            # an outstanding query can arrive, so no deadline either.
            timeout = -1.0
        elif q is not None:
            timeout = -1.0 if q.deadline is None else max(0.0, q.deadline - now)
        elif self.hc_interval > 0:
            timeout = self.hc_interval
        else:
            timeout = -1.0
        if self.use_c:
            ms = -1 if timeout < 0 else int(timeout * 1000 + 0.999)
            flags = lib.pglf_run(self.router, self.conn_ptr, self.wake.rfd, ms)
        else:
            flags = self._run_python(timeout)
        self._handle(flags)

    def _pump(self) -> int:
        if self.use_c:
            return int(lib.pglf_pump(self.router, self.conn_ptr))
        assert self.pgconn is not None
        return _hotpath.python_pump(self.router, self.pgconn, self.query is not None)

    def _run_python(self, timeout: float) -> int:
        """Python twin of pglf_run: wait, read, route until a control event."""
        assert self.pgconn is not None
        pgconn = self.pgconn
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            try:
                pending = pgconn.flush()
            except psycopg.OperationalError:
                return RUN_ERROR
            blocked = lib.pglf_router_blocked(self.router)
            events = (0 if blocked else select.POLLIN) | (
                select.POLLOUT if pending else 0
            )
            # While blocked the socket is left out entirely, like pglf_run
            # does: poll would report a hang-up even with no events asked.
            self._watch_socket(events)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready = self.poller.poll(None if left is None else left * 1000)
            except InterruptedError:
                return RUN_EINTR
            if not ready:
                return RUN_TIMEOUT
            flags = 0
            for fd, ev in ready:
                if fd == self.wake.rfd:
                    flags |= RUN_WAKE
                elif ev & ~select.POLLOUT and not blocked:
                    flags |= self._pump()
                    if deadline is not None:
                        deadline = time.monotonic() + timeout
            if flags:
                return flags

    def _watch_socket(self, events: int) -> None:
        if events:
            if self.sock_events is None:
                self.poller.register(self.sock, events)
            elif self.sock_events != events:
                self.poller.modify(self.sock, events)
        elif self.sock_events is not None:
            self.poller.unregister(self.sock)
        self.sock_events = events or None

    def _handle(self, flags: int) -> None:
        while flags:
            if flags & RUN_ERROR:
                assert self.pgconn is not None
                raise _Lost(_text(self.pgconn.error_message) or "connection lost")
            nxt = 0
            if flags & RUN_WAKE:
                self.wake.clear()
                self._process_commands()
                if self.stopping:
                    return
                nxt |= self._flush_router()
            if flags & RUN_BLOCKED and not self.blocked_logged:
                self.blocked_logged = True
                logger.info("a subscription with overflow='block' is "
                            "full; reading paused until its consumer catches up")
            if flags & RUN_RESULT:
                nxt |= self._collect()
            if flags & RUN_TIMEOUT:
                self._timeout()
            flags = nxt

    def _flush_router(self) -> int:
        """Pay owed markers and retry a kept-aside notification after a wake-up.

        Returns pump flags: once unblocked, what libpq already holds is read.
        """
        router = self.router
        if not (lib.pglf_router_blocked(router) or lib.pglf_router_owing(router)):
            return 0
        was_blocked = lib.pglf_router_blocked(router)
        if lib.pglf_router_flush(router) == BLOCKED:
            return 0
        if was_blocked:
            self.blocked_logged = False
            q = self.query
            if q is not None and q.deadline is not None:
                # Its answer could not be read while blocked: the clock
                # starts again now.
                q.deadline = max(q.deadline, self._query_deadline() or 0.0)
            self._sync()  # LISTENs requested while blocked
            return self._pump()
        return 0

    def _timeout(self) -> None:
        if lib.pglf_router_blocked(self.router):
            return
        q = self.query
        if q is not None:
            if q.deadline is not None and time.monotonic() >= q.deadline:
                what = "health check" if q.kind == "ping" else f"{q.kind} query"
                raise _Lost(f"no answer to the {what} within {self.hc_timeout:g} s")
            return
        if self.hc_interval > 0 and not lib.pglf_router_blocked(self.router):
            self._send(b"", _Query("ping", self._query_deadline()))

    def _collect(self) -> int:
        """Collect results of the outstanding query; returns pump flags."""
        pgconn = self.pgconn
        q = self.query
        assert pgconn is not None
        if q is None:
            return 0
        while True:
            if pgconn.is_busy():
                return 0      # the rest has not arrived yet
            res = pgconn.get_result()
            if res is None:
                break
            q.results.append(res)
        self.query = None
        lib.pglf_router_set_busy(self.router, 0)
        self._query_done(q)
        # Parsing results may have queued notifications inside libpq.
        return self._pump()

    def _query_done(self, q: _Query) -> None:
        errors = [r for r in q.results if r.status == pq.ExecStatus.FATAL_ERROR]
        if errors:
            msg = _text(errors[0].error_message)
            if "recovery" in msg:
                raise _Lost(f"the server is a hot standby and refuses LISTEN ({msg}); "
                            "point the listener at the primary (e.g. "
                            "target_session_attrs=read-write)")
            state = errors[0].error_field(pq.DiagnosticField.SQLSTATE) or b""
            if q.kind == "sync" and q.listen and _refusal(state):
                self._sync_failed(q, msg)
                return
            # Anything else (cancelled, out of resources, ...) may pass: the
            # connection is reset and the whole state replayed.
            raise _Lost(f"{q.kind} query failed: {msg}")
        if q.kind == "init":
            row = q.results[-1]
            pid = int(row.get_value(0, 0) or b"0")
            in_recovery = (row.get_value(0, 1) or b"f") == b"t"
            if in_recovery:
                raise _Lost("the server is a hot standby (in recovery) where LISTEN "
                            "is refused; point the listener at the primary (e.g. "
                            "target_session_attrs=read-write)")
            self.server_pid = pid
            self.ready = True
            assert self.pgconn is not None
            if self.pgconn.backend_pid != pid:
                # The key data came from something other than the backend.
                logger.warning(
                    "connected through a connection pooler (client-side pid %d, "
                    "server backend pid %d): LISTEN only works with session "
                    "pooling; a LISTEN moved to another session is detected and "
                    "reported", self.pgconn.backend_pid, pid)
            self.publish(connected=True, backend_pid=pid,
                         connect=True, reconnect=self.ever_connected)
            self.ever_connected = True
            logger.info("connected (backend pid %d)", pid)
            self._report_first(None)
            self._sync()
        elif q.kind == "sync":
            pid = int(q.results[-1].get_value(0, 0) or b"0")
            if pid != self.server_pid:
                raise _Lost(
                    "LISTEN ran in a different server session than the one this "
                    f"connection started with (backend pid {pid} != "
                    f"{self.server_pid}): the connection goes through a "
                    "transaction-pooling proxy (e.g. PgBouncer pool_mode="
                    "transaction), which cannot keep LISTEN; connect directly or "
                    "use session pooling")
            self.server.difference_update(q.unlisten)
            self.server.update(q.listen)
            self.isolate.difference_update(q.listen)
            # Published before the markers are queued: a consumer that sees
            # the "listen" marker also sees the channel in listener.channels.
            self.publish(channels=frozenset(self.server))
            for ch in q.listen:
                for rec, idx in self.attached.get(ch, ()):
                    if lib.pglf_sub_state(rec.csub, idx) != _ACTIVE_STATE:
                        lib.pglf_sub_activate(self.router, rec.csub, idx,
                                              REASON_RECONNECT)
            lib.pglf_router_wake(self.router)
            if q.listen or q.unlisten:
                logger.debug("LISTEN %d, UNLISTEN %d channel(s)",
                             len(q.listen), len(q.unlisten))
            self._sync()

    def _sync_failed(self, q: _Query, msg: str) -> None:
        """The server refused a LISTEN/UNLISTEN batch; nothing of it took effect.

        One refused channel must not cost the others their connection: the
        channels are retried one per query, and the subscriptions of a
        channel refused on its own are closed (their consumers get Closed
        once drained) with the reason logged and kept in ``last_error``.
        """
        if len(q.listen) == 1 and not q.unlisten:
            ch = q.listen[0]
            self.isolate.discard(ch)
            reason = f"LISTEN {ch!r} refused by the server: {msg}"
            logger.error("%s; closing its subscriptions", reason)
            self.publish(last_error=reason)
            for rec, _idx in list(self.attached.get(ch, ())):
                self._remove(rec.sub)
        else:
            logger.warning("LISTEN/UNLISTEN batch refused by the server (%s); "
                           "retrying channel by channel", msg)
            self.isolate.update(q.listen)
        self._sync()

    def _sync(self) -> None:
        """Send every pending LISTEN/UNLISTEN in one round trip."""
        if not self.ready or self.query is not None or self.pgconn is None:
            return
        if lib.pglf_router_blocked(self.router):
            # Its answer could not be read until a "block" consumer catches
            # up; send it then (see _flush_router).
            return
        unlisten = [ch for ch in self.server if ch not in self.desired]
        listen = [ch for ch in self.desired if ch not in self.server]
        if not unlisten and not listen:
            return
        suspects = [ch for ch in listen if ch in self.isolate]
        if suspects:
            unlisten, listen = [], suspects[:1]
        esc = pq.Escaping(self.pgconn)
        parts = [b"UNLISTEN " + esc.escape_identifier(self._encode(ch))
                 for ch in unlisten]
        parts += [b"LISTEN " + esc.escape_identifier(self._encode(ch)) for ch in listen]
        parts.append(b"SELECT pg_backend_pid()")
        q = _Query("sync", self._query_deadline(), listen=listen, unlisten=unlisten)
        if q.deadline is not None:
            # Allow for very large channel sets (thousands of statements).
            q.deadline += len(parts) / 10000.0
        self._send(b";".join(parts), q)

    # ------------------------------------------------------------------
    # loss and shutdown
    def _close_conn(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.poller is not None:
            # Unregister before the fd is closed (a closed fd can hang epoll).
            if self.sock_events is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.poller.unregister(self.sock)
            self.sock_events = None
            self.poller = None
        self.conn = None
        self.pgconn = None
        self.conn_ptr = None
        self.query = None
        self.ready = False
        self.use_c = _hotpath.IMPL == "c"
        lib.pglf_router_set_busy(self.router, 0)
        lib.pglf_router_deactivate_all(self.router)
        # A notification kept aside for a full "block" ring belongs to the
        # old connection: with every target inactive, flushing discards it.
        lib.pglf_router_flush(self.router)
        self.server = set()
        self.release(conn)

    def _lost(self, reason: str) -> None:
        reason = " ".join(reason.split())  # libpq's messages span lines
        was_connected = self.conn is not None
        lived = time.monotonic() - self.connected_at if was_connected else 0.0
        ready = self.ready
        self._close_conn()
        self.publish(connected=False, channels=frozenset(), last_error=reason)
        if self.stopping:
            return
        if not ready and not self._report_first(_Lost(reason)):
            # Failed before it was usable: the first attempt, under
            # start(wait=True), which raises it.
            return
        if lived >= HEALTHY_AFTER:
            self.failures = 0
        delay = self._backoff()
        self.next_connect = time.monotonic() + delay
        logger.warning("connection lost (%s); reconnecting in %.2f s",
                       reason, delay)

    def run_teardown_only(self) -> None:
        """Close what a never-started listener holds (called by stop())."""
        self._teardown()

    def _teardown(self) -> None:
        if self.attempt is not None:
            self.attempt.abandon()
            self.attempt = None
        try:
            self._close_conn()
        finally:
            # State first, then wake the consumers: whoever sees Closed also
            # sees a disconnected listener.
            self.publish(connected=False, channels=frozenset())
            for rec in list(self.subs.values()):
                rec.sub._closed_by_listener()
            for _op, sub in list(self.commands):
                sub._closed_by_listener()
            self.commands.clear()


def _refusal(sqlstate: bytes) -> bool:
    """Whether an error refuses the statement itself (retrying won't help).

    Data exceptions (22: e.g. a name with no equivalent in the database
    encoding), syntax or access rule violations (42), unsupported features
    (0A), program limits (54).  Cancellations, timeouts and resource errors
    are transient instead.
    """
    return sqlstate[:2] in (b"22", b"42", b"0A", b"54")


def _guarded(release: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a connection release so that its failure never ends a thread."""

    def release_quietly(conn: Any) -> None:
        try:
            release(conn)
        except Exception:
            logger.warning("error while closing a connection", exc_info=True)

    return release_quietly


def _text(msg: bytes | str | None) -> str:
    if msg is None:
        return ""
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return msg.strip()


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "unknown error"
    text = str(err).strip().replace("\n", " ")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


__all__ = ["Engine"]
