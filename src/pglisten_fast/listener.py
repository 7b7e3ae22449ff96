"""Listener: one dedicated PostgreSQL connection, many subscriptions.

A Listener owns one connection and one background thread (the selector
thread).  ``listen()`` returns a :class:`~pglisten_fast.Subscription` at
once; LISTEN takes effect asynchronously and each channel's first item is a
``reason="listen"`` marker saying so.  After a reconnect every channel gets
a ``reason="reconnect"`` marker before any new notification.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import psycopg

from . import _fork
from ._commands import AddSub, RemoveSub, SubSpec
from ._connect import SessionLost, connection_source, describe
from ._engine import Engine
from ._handlers import is_async_handler, start_async_handler, start_handler
from ._names import check_channel
from ._records import Notification
from ._ring import round_capacity
from ._router import DEFAULT_BATCH_WINDOW
from ._state import ListenerState, ListenerStats
from .errors import Closed, ConnectError
from .subscription import Overflow, Subscription

__all__ = ["Listener", "ListenerStats", "start_listener"]


_OVERFLOW_POLICIES = ("drop", "block")

#: Upper bound of ``batch_window`` (seconds).
MAX_BATCH_WINDOW = 0.1


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
    :param health_check_interval: seconds between health checks (a query
        that also samples the server's notification queue); 0 disables.
    :param health_check_timeout: a ping (or LISTEN) unanswered for this long
        means the connection is dead.
    :param buffer_size: default ring size in bytes of each subscription
        (rounded up to a power of two, at least 64 KiB).
    :param overflow: default policy for full buffers: ``"drop"`` loses new
        notifications and queues an ``"overflow"`` marker with the count;
        ``"block"`` stops reading the socket until the consumer catches up
        (which stalls every subscription of this listener and lets the
        backlog grow in the server's notification queue).
    :param batch_window: seconds (default 0.0005) that a fast stream, over
        about 10,000 notifications a second, may be held to be read and
        handed over in batches: each consumer is woken once per window
        instead of once per notification, for far less CPU at the cost of
        up to this much more delay.  0 turns batching off; at most 0.1.
        (Slower streams are never held.  The Python read path never
        batches.)

    :param queue_warning: the server's notification queue usage (a
        fraction, sampled by each health check and shown in ``stats``) at
        which a WARNING is logged; an INFO line follows once it is lower.
    :param delivery_probes: prove that notifications committed by other
        sessions reach the listener, with probes sent from a second session
        (opened from the same source) once LISTEN is in effect and then on
        every health check.  None (the default): only when the connection
        goes through a pooler, where a transaction pooler would otherwise
        lose every notification in silence; True: always; False: never.

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
        delivery_probes: bool | None = None,
        queue_warning: float = 0.5,
        batch_window: float = DEFAULT_BATCH_WINDOW,
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
        queue_warning = _positive("queue_warning", queue_warning)
        if queue_warning > 1:
            raise ValueError(f"queue_warning is a fraction (0-1], got {queue_warning}")
        batch_window = _positive("batch_window", batch_window, zero_ok=True)
        if batch_window > MAX_BATCH_WINDOW:
            raise ValueError(f"batch_window is at most {MAX_BATCH_WINDOW} s, "
                             f"got {batch_window}")
        if delivery_probes not in (None, True, False):
            raise TypeError("delivery_probes must be None, True or False")
        self._buffer_size = round_capacity(buffer_size)
        self._overflow = _check_overflow(overflow)

        source = connection_source(conninfo, pool, connect, self._connect_timeout)
        self._created_in = _fork.generation()
        self._life = _Life()
        self._shared = ListenerState()
        self._subs: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._engine = Engine(
            source=source,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
            health_check_interval=hc_interval,
            health_check_timeout=hc_timeout,
            state=self._shared,
            delivery_probes=delivery_probes,
            queue_warning=queue_warning,
            # A positive window is at least 1 us (0 means off).
            batch_window_us=max(1, round(batch_window * 1e6)) if batch_window else 0,
        )
        # Neither the selector thread nor the subscriptions refer back to
        # this object: once the application drops it, this stops the thread.
        self._finalizer = weakref.finalize(
            self, _dropped, self._life, self._engine, self._created_in
        )
        self._finalizer.atexit = False

    def _check(self) -> None:
        _fork.check(self._created_in, "Listener")

    # -- life cycle ----------------------------------------------------------
    def start(self, wait: bool = True) -> Listener:
        """Start the selector thread.

        :param wait: connect synchronously (and LISTEN what was already
            requested is sent right after); raise :class:`ConnectError` if the
            first attempt fails, leaving the listener stopped.  With
            ``wait=False`` return at once and keep retrying in the background.
        :raises Closed: the listener was stopped.
        """
        self._check()
        life = self._life
        with life.lock:
            if life.phase == "stopped":
                raise Closed("the listener is stopped")
            if life.phase == "running":
                return self
            life.phase = "running"
            self._shared.raise_first = wait
            life.thread = threading.Thread(
                target=self._engine.run, name="pglisten-fast-selector", daemon=True
            )
            life.thread.start()
        if wait:
            self._shared.first_done.wait()
            err = self._shared.first_error
            if err is not None:
                self.stop()
                # The driver's error (or None), never an internal class.
                cause = err.__cause__ if isinstance(err, SessionLost) else err
                raise ConnectError(f"cannot connect to PostgreSQL: "
                                   f"{describe(err)}") from cause
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
        self._check()
        deadline = None if timeout is None else time.monotonic() + timeout
        life = self._life
        with life.lock:
            previous = life.phase
            life.phase = "stopped"
            handlers, life.handlers = life.handlers, []
        if previous != "stopped":
            self._engine.request_stop()
        me = threading.current_thread()
        thread = life.thread
        if thread is not None and thread is not me:
            thread.join(_left(deadline))
        if previous == "new":
            self._engine.teardown()
        self._shared.first_done.set()
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
        shared = self._shared
        state = self._life.phase
        if state == "running":
            state = f"connected pid={shared.backend_pid}" if shared.connected \
                else "disconnected"
        return f"<Listener {state} channels={len(shared.channels)}>"

    # -- subscriptions -------------------------------------------------------
    def listen(
        self,
        *channels: str,
        buffer_size: int | None = None,
        overflow: Overflow | None = None,
        handler: Callable[[Notification], object] | None = None,
        payload_type: type[str] | type[bytes] = str,
    ) -> Subscription:
        """Subscribe to one or more channels; returns at once.

        :param channels: channel names, used verbatim (case and spaces kept);
            a name repeated in one call counts once.
        :param buffer_size: ring size in bytes (default: the listener's).
        :param overflow: ``"drop"`` or ``"block"`` (default: the listener's).
        :param handler: if given, ``handler(notification)`` runs for every item
            (markers included) on a worker thread of this subscription; an
            ``async def`` handler runs instead as a task on the event loop
            that calls ``listen()``, one item at a time.  Exceptions are
            logged and the handler keeps going.
        :param payload_type: ``str`` (the default: payloads decoded) or
            ``bytes`` (payloads undecoded, e.g. for binary protocols or
            SQL_ASCII databases; markers then carry ``b""``).
        :raises ValueError: no channel, an empty/over-long/NUL-containing name,
            or an unknown overflow policy.
        :raises TypeError: a name is not a ``str``; an async handler outside
            a running event loop.
        :raises Closed: the listener was stopped.
        """
        self._check()
        if not channels:
            raise ValueError("listen() needs at least one channel")
        names = tuple(dict.fromkeys(check_channel(c) for c in channels))
        size = self._buffer_size if buffer_size is None else round_capacity(buffer_size)
        policy = self._overflow if overflow is None else _check_overflow(overflow)
        if payload_type is not str and payload_type is not bytes:
            raise TypeError(f"payload_type must be str or bytes, got {payload_type!r}")
        if handler is not None and not callable(handler):
            raise TypeError("handler must be callable")
        run_async = handler is not None and is_async_handler(handler)
        if run_async:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise TypeError(
                    "an async handler runs on the event loop that calls "
                    "listen(): call listen() from a coroutine, or pass a "
                    "plain function") from None
        ring = self._engine.make_ring(size)
        spec = SubSpec(names, ring, block=policy == "block")
        life, engine = self._life, self._engine
        sub = Subscription(names, ring, policy,
                           on_unlisten=lambda: life.unlisten(engine, spec),
                           payload_type=payload_type)
        with life.lock:
            if life.phase == "stopped":
                ring.close()
                ring.detach_producer()
                raise Closed("the listener is stopped")
            self._engine.submit(AddSub(spec))
            self._subs.add(sub)
            if run_async:
                task = start_async_handler(sub, handler, names)  # type: ignore[arg-type]
                life.tasks.add(task)
                task.add_done_callback(life.tasks.discard)
            elif handler is not None:
                life.handlers = [t for t in life.handlers if t.is_alive()]
                life.handlers.append(start_handler(sub, handler, names))
        return sub

    # -- state -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while a connection is established and usable."""
        self._check()
        return self._shared.connected

    @property
    def backend_pid(self) -> int | None:
        """Process id of the listening backend, or None while disconnected."""
        self._check()
        return self._shared.backend_pid

    @property
    def channels(self) -> frozenset[str]:
        """Channels LISTENed on the current connection (confirmed by the server)."""
        self._check()
        return self._shared.channels

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._life.phase == "running"

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The subscriptions of this listener that are still open."""
        self._check()
        return tuple(s for s in list(self._subs) if not s.closed)

    @property
    def stats(self) -> ListenerStats:
        """A :class:`ListenerStats` snapshot."""
        self._check()
        received, dropped, markers = self._engine.counters()
        return self._shared.stats(received, dropped, markers)


class _Life:
    """A listener's life cycle, shared with its finalizer and subscriptions."""

    __slots__ = ("handlers", "lock", "phase", "tasks", "thread")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phase = "new"                # new -> running -> stopped
        self.thread: threading.Thread | None = None
        self.handlers: list[threading.Thread] = []
        # Async handler tasks, kept referenced until done.
        self.tasks: set[asyncio.Task[None]] = set()

    def unlisten(self, engine: Engine, spec: SubSpec) -> None:
        """A subscription was closed by its consumer."""
        with self.lock:
            if self.phase != "stopped":
                engine.submit(RemoveSub(spec))


def _dropped(life: _Life, engine: Engine, created_in: int) -> None:
    """Finalizer: the application dropped a listener it never stopped."""
    if created_in != _fork.generation():
        return  # a copy inherited by a forked child: the parent's business
    with life.lock:
        running = life.phase == "running"
        life.phase = "stopped"
    if running:
        engine.request_stop()
        warnings.warn(
            "a pglisten_fast.Listener was dropped while running; it has been "
            "stopped (call stop() or use it as a context manager)",
            ResourceWarning,
            stacklevel=2,
        )


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def start_listener(conninfo: str = "", **kwargs: Any) -> Listener:
    """Create and start a :class:`Listener` (``Listener(...).start()``)."""
    wait = kwargs.pop("wait", True)
    return Listener(conninfo, **kwargs).start(wait=wait)
