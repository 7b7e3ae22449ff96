"""Listener: one dedicated PostgreSQL connection, many subscriptions.

A Listener owns one connection and one background thread (the selector
thread).  ``listen()`` returns a :class:`~pglisten_fast.Subscription` at
once; LISTEN takes effect asynchronously and each channel's first item is a
``reason="listen"`` marker saying so.  After a reconnect every channel gets
a ``reason="reconnect"`` marker before any new notification.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg

from ._commands import AddSub, RemoveSub, SubSpec
from ._connect import connection_source, describe
from ._engine import Engine
from ._handlers import start_handler
from ._names import check_channel
from ._records import Notification
from ._ring import round_capacity
from .errors import Closed, ConnectError
from .subscription import Overflow, Subscription

__all__ = ["Listener", "ListenerStats", "start_listener"]

logger = logging.getLogger("pglisten_fast")

_OVERFLOW_POLICIES = ("drop", "block")


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """Snapshot of a listener's counters."""

    #: Successful connections (the first one included).
    connects: int
    #: Connections re-established after a loss.
    reconnects: int
    #: Notifications read from the server.
    received: int
    #: Markers queued into subscriptions.
    markers: int
    #: Notifications dropped by full ``overflow="drop"`` subscriptions.
    dropped: int
    #: The last connection error, or None.
    last_error: str | None


def _positive(name: str, value: float, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {value}")
    return float(value)


def _check_overflow(value: object) -> Overflow:
    if value not in _OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be 'drop' or 'block', got {value!r}")
    return value  # type: ignore[return-value]


class Listener:
    """LISTEN on a dedicated connection and hand notifications to subscriptions.

    :param conninfo: libpq connection string or URL; ``""`` uses the libpq
        environment defaults (``PGHOST``, ``PGDATABASE``...).
    :param pool: a ``psycopg_pool.ConnectionPool`` to take the connection
        from (it is closed and given back when lost or on stop).
    :param connect: a callable returning a new ``psycopg.Connection``.
    :param connect_timeout: seconds allowed for each connection attempt
        (libpq's own ``connect_timeout`` in ``conninfo`` takes precedence).
    :param reconnect_delay: first retry delay in seconds; doubles on each
        failure up to ``max_reconnect_delay``, with +/-20 % jitter.
    :param health_check_interval: idle seconds before a ping; 0 disables.
    :param health_check_timeout: a ping (or LISTEN) unanswered for this long
        means the connection is dead.
    :param buffer_size: default ring size in bytes of each subscription
        (rounded up to a power of two, at least 64 KiB).
    :param overflow: default policy for full buffers: ``"drop"`` loses new
        notifications and queues an ``"overflow"`` marker with the count;
        ``"block"`` stops reading the socket until the consumer catches up
        (which stalls every subscription of this listener and lets the
        backlog grow in the server's notification queue).

    ``conninfo``, ``pool`` and ``connect`` are mutually exclusive.
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        pool: Any = None,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
        connect_timeout: float = 10.0,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 30.0,
        health_check_interval: float = 10.0,
        health_check_timeout: float = 5.0,
        buffer_size: int = 16 * 2**20,
        overflow: Overflow = "drop",
    ) -> None:
        if not isinstance(conninfo, str):
            raise TypeError(f"conninfo must be a str, got {type(conninfo).__name__}")
        sources = sum(1 for s in (conninfo, pool, connect) if s)
        if sources > 1:
            raise TypeError("conninfo, pool and connect are mutually exclusive")
        if connect is not None and not callable(connect):
            raise TypeError("connect must be a callable returning a psycopg.Connection")
        if pool is not None and (
            not hasattr(pool, "getconn")
            or inspect.iscoroutinefunction(pool.getconn)
        ):
            raise TypeError(
                "pool must be a psycopg_pool.ConnectionPool (not an async pool)"
            )
        if connect is not None and inspect.iscoroutinefunction(connect):
            raise TypeError("connect must return a psycopg.Connection, not a coroutine")
        self._connect_timeout = _positive("connect_timeout", connect_timeout)
        reconnect_delay = _positive("reconnect_delay", reconnect_delay)
        max_reconnect_delay = _positive("max_reconnect_delay", max_reconnect_delay)
        if max_reconnect_delay < reconnect_delay:
            raise ValueError("max_reconnect_delay must be >= reconnect_delay")
        hc_interval = _positive("health_check_interval", health_check_interval,
                                zero_ok=True)
        hc_timeout = _positive("health_check_timeout", health_check_timeout)
        self._buffer_size = round_capacity(buffer_size)
        self._overflow = _check_overflow(overflow)

        source = connection_source(conninfo, pool, connect, self._connect_timeout)
        self._lock = threading.Lock()
        self._state = "new"               # new -> running -> stopped
        self._first = threading.Event()
        self._first_error: BaseException | None = None
        self._wait_first = False
        self._thread: threading.Thread | None = None
        self._handlers: list[threading.Thread] = []

        self._connected = False
        self._backend_pid: int | None = None
        self._channels: frozenset[str] = frozenset()
        self._connects = 0
        self._reconnects = 0
        self._last_error: str | None = None

        self._engine = Engine(
            source=source,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
            health_check_interval=hc_interval,
            health_check_timeout=hc_timeout,
            publish=self._publish,
            on_first_attempt=self._on_first_attempt,
        )

    # -- engine callbacks (selector thread) -----------------------------------
    def _publish(
        self,
        *,
        connected: bool | None = None,
        backend_pid: int | None = None,
        channels: frozenset[str] | None = None,
        last_error: str | None = None,
        connect: bool = False,
        reconnect: bool = False,
    ) -> None:
        with self._lock:
            if connected is not None:
                self._connected = connected
                self._backend_pid = backend_pid if connected else None
            if channels is not None:
                self._channels = channels
            if last_error is not None:
                self._last_error = last_error
            if connect:
                self._connects += 1
            if reconnect:
                self._reconnects += 1

    def _on_first_attempt(self, err: BaseException | None) -> bool:
        """Outcome of the first attempt; False: stop (start(wait=True) raises)."""
        self._first_error = err
        self._first.set()
        return err is None or not self._wait_first

    # -- life cycle ----------------------------------------------------------
    def start(self, wait: bool = True) -> Listener:
        """Start the selector thread.

        :param wait: connect synchronously (and LISTEN what was already
            requested is sent right after); raise :class:`ConnectError` if the
            first attempt fails, leaving the listener stopped.  With
            ``wait=False`` return at once and keep retrying in the background.
        :raises Closed: the listener was stopped.
        """
        with self._lock:
            if self._state == "stopped":
                raise Closed("the listener is stopped")
            if self._state == "running":
                return self
            self._state = "running"
            self._wait_first = wait
            self._thread = threading.Thread(
                target=self._engine.run, name="pglisten-fast-selector", daemon=True
            )
            self._thread.start()
        if wait:
            self._first.wait()
            err = self._first_error
            if err is not None:
                self.stop()
                raise ConnectError(f"cannot connect to PostgreSQL: "
                                   f"{describe(err)}") from err
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop listening, close the connection and every subscription.

        Idempotent.  Waits at most ``timeout`` seconds in all (None: until
        done) for the selector thread, which takes about a second at most,
        and then for handler threads to finish what was buffered before the
        stop; never raises for a slow server.  Consumers blocked in ``get``
        wake up and, once they have drained what is buffered, get
        :class:`Closed`.  A handler still running when the timeout ends
        goes on in its daemon thread until its items are handled.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            previous = self._state
            self._state = "stopped"
            handlers, self._handlers = self._handlers, []
        if previous != "stopped":
            self._engine.request_stop()
        me = threading.current_thread()
        thread = self._thread
        if thread is not None and thread is not me:
            thread.join(_left(deadline))
        if previous == "new":
            self._engine.teardown()
        self._first.set()
        for t in handlers:
            if t is not me:
                t.join(_left(deadline))

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self._state
        if state == "running":
            state = f"connected pid={self._backend_pid}" if self._connected \
                else "disconnected"
        return f"<Listener {state} channels={len(self._channels)}>"

    # -- subscriptions -------------------------------------------------------
    def listen(
        self,
        *channels: str,
        buffer_size: int | None = None,
        overflow: Overflow | None = None,
        handler: Callable[[Notification], object] | None = None,
    ) -> Subscription:
        """Subscribe to one or more channels; returns at once.

        :param channels: channel names, used verbatim (case and spaces kept);
            a name repeated in one call counts once.
        :param buffer_size: ring size in bytes (default: the listener's).
        :param overflow: ``"drop"`` or ``"block"`` (default: the listener's).
        :param handler: if given, ``handler(notification)`` runs for every item
            (markers included) on a worker thread of this subscription;
            exceptions are logged and the worker keeps going.
        :raises ValueError: no channel, an empty/over-long/NUL-containing name,
            or an unknown overflow policy.
        :raises TypeError: a name is not a ``str``.
        :raises Closed: the listener was stopped.
        """
        if not channels:
            raise ValueError("listen() needs at least one channel")
        names = tuple(dict.fromkeys(check_channel(c) for c in channels))
        size = self._buffer_size if buffer_size is None else round_capacity(buffer_size)
        policy = self._overflow if overflow is None else _check_overflow(overflow)
        if handler is not None and not callable(handler):
            raise TypeError("handler must be callable")
        ring = self._engine.make_ring(size)
        spec = SubSpec(names, ring, block=policy == "block")
        sub = Subscription(names, ring, policy,
                           on_unlisten=lambda: self._unlisten(spec))
        with self._lock:
            if self._state == "stopped":
                raise Closed("the listener is stopped")
            self._engine.submit(AddSub(spec))
            if handler is not None:
                self._handlers = [t for t in self._handlers if t.is_alive()]
                self._handlers.append(start_handler(sub, handler, names))
        return sub

    def _unlisten(self, spec: SubSpec) -> None:
        with self._lock:
            if self._state != "stopped":
                self._engine.submit(RemoveSub(spec))

    # -- state -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while a connection is established and usable."""
        return self._connected

    @property
    def backend_pid(self) -> int | None:
        """Process id of the listening backend, or None while disconnected."""
        return self._backend_pid

    @property
    def channels(self) -> frozenset[str]:
        """Channels LISTENed on the current connection (confirmed by the server)."""
        return self._channels

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._state == "running"

    @property
    def stats(self) -> ListenerStats:
        """A :class:`ListenerStats` snapshot."""
        counters = self._engine.counters()
        with self._lock:
            return ListenerStats(
                connects=self._connects,
                reconnects=self._reconnects,
                received=counters.received,
                markers=counters.markers,
                dropped=counters.dropped,
                last_error=self._last_error,
            )


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def start_listener(conninfo: str = "", **kwargs: Any) -> Listener:
    """Create and start a :class:`Listener` (``Listener(...).start()``)."""
    wait = kwargs.pop("wait", True)
    return Listener(conninfo, **kwargs).start(wait=wait)
