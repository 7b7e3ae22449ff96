"""What the selector thread tells the API threads: a listener's state.

The selector thread writes a :class:`ListenerState` (connected or not,
backend pid, confirmed channels, counters, last error, the server's queue
usage) and the Listener reads it.  The selector thread holds this object,
never the Listener itself, so a Listener that the application drops
becomes unreachable and its finalizer can stop the thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["ListenerState", "ListenerStats"]


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
    #: The server's notification queue usage, 0.0 to 1.0
    #: (``pg_notification_queue_usage()``), sampled on the health-check
    #: schedule; None before the first sample or with health checks off.
    queue_usage: float | None = None


class ListenerState:
    """Shared state of one listener (any thread; writes by the selector)."""

    __slots__ = (
        "_lock",
        "backend_pid",
        "channels",
        "connected",
        "connects",
        "first_done",
        "first_error",
        "last_error",
        "queue_usage",
        "raise_first",
        "reconnects",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connected = False
        self.backend_pid: int | None = None
        self.channels: frozenset[str] = frozenset()
        self.connects = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.queue_usage: float | None = None
        # The first connection attempt: start(wait=True) waits for it.
        self.first_done = threading.Event()
        self.first_error: BaseException | None = None
        self.raise_first = False

    def publish(
        self,
        *,
        connected: bool | None = None,
        backend_pid: int | None = None,
        channels: frozenset[str] | None = None,
        last_error: str | None = None,
        connect: bool = False,
        reconnect: bool = False,
        queue_usage: float | None = None,
    ) -> None:
        """Update the fields given (selector thread)."""
        with self._lock:
            if connected is not None:
                self.connected = connected
                self.backend_pid = backend_pid if connected else None
            if channels is not None:
                self.channels = channels
            if last_error is not None:
                self.last_error = last_error
            if connect:
                self.connects += 1
            if reconnect:
                self.reconnects += 1
            if queue_usage is not None:
                self.queue_usage = queue_usage

    def first_attempt(self, err: BaseException | None) -> bool:
        """Record the first attempt's outcome; False: stop, start() raises it."""
        self.first_error = err
        self.first_done.set()
        return err is None or not self.raise_first

    def stats(self, received: int, dropped: int, markers: int) -> ListenerStats:
        with self._lock:
            return ListenerStats(
                connects=self.connects,
                reconnects=self.reconnects,
                received=received,
                markers=markers,
                dropped=dropped,
                last_error=self.last_error,
                queue_usage=self.queue_usage,
            )
