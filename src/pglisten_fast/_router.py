"""Python face of the notification router (``csrc/pglf_router.c``).

The router maps channel names to the subscriptions listening on them and
writes each notification into their rings, paying the markers it owes
them (``"listen"``, ``"reconnect"``, ``"overflow"``) and keeping aside a
notification that a full ``overflow="block"`` ring cannot take yet.

Thread role: every method except :meth:`Router.counters` belongs to the
Listener's selector thread (the single producer of every ring it writes).
"""

from __future__ import annotations

import enum
from typing import Any

from ._pglf import ffi, lib
from ._ring import Reason, Ring

__all__ = ["ChannelState", "Router", "RouterCounters", "RouterSub", "RunFlag"]


class RunFlag(enum.IntFlag):
    """Why the read path returned to Python (``PGLF_RUN_*``)."""

    NONE = 0
    WAKE = lib.PGLF_RUN_WAKE          # the wake-up fd is readable
    TIMEOUT = lib.PGLF_RUN_TIMEOUT    # the time asked for has passed
    RESULT = lib.PGLF_RUN_RESULT      # the outstanding query has its results
    ERROR = lib.PGLF_RUN_ERROR        # libpq reported an error
    BLOCKED = lib.PGLF_RUN_BLOCKED    # a full "block" ring stopped the reading
    EINTR = lib.PGLF_RUN_EINTR        # the wait was interrupted by a signal


class ChannelState(enum.IntEnum):
    """State of one channel of a subscription (``pglf_sub_state``)."""

    NEW = lib.PGLF_SUB_NEW        # never activated: nothing routed, no marker
    LAPSED = lib.PGLF_SUB_LAPSED  # announced before, not routed (connection lost)
    LIVE = lib.PGLF_SUB_LIVE      # routed, and its "listen" marker was queued


class RouterCounters(tuple[int, int, int]):
    """``(received, dropped, markers)``, read without a lock."""

    __slots__ = ()

    @property
    def received(self) -> int:
        return self[0]

    @property
    def dropped(self) -> int:
        return self[1]

    @property
    def markers(self) -> int:
        return self[2]


class RouterSub:
    """The router's side of one subscription: its ring and channel states."""

    __slots__ = ("_ptr", "_router", "channels", "ring")

    def __init__(self, router: Router, ptr: Any, ring: Ring,
                 channels: tuple[str, ...]) -> None:
        self._router = router
        self._ptr = ptr
        self.ring = ring          # kept alive as long as the router writes it
        self.channels = channels

    def activate(self, idx: int, reason: Reason) -> bool:
        """Start routing channel ``idx``, owing its consumer a marker.

        The first marker of a channel is always ``"listen"`` whatever
        ``reason`` says; later ones are ``reason``.  Returns True while the
        marker is still owed (no room yet; it is written once there is).
        """
        return bool(lib.pglf_sub_activate(self._router.ptr, self._ptr, idx, reason))

    def state(self, idx: int) -> ChannelState:
        return ChannelState(lib.pglf_sub_state(self._ptr, idx))

    def free(self) -> None:
        """Unregister from the router (idempotent); the ring is left alone."""
        if self._ptr is not None:
            lib.pglf_sub_free(self._router.ptr, self._ptr)
            self._ptr = None


#: The read loop's default batch window, in seconds (``PGLF_HOLD_US``).
DEFAULT_BATCH_WINDOW: float = lib.PGLF_HOLD_US / 1e6


class Router:
    """Channel routing, owed markers and the block stash of one Listener."""

    __slots__ = ("_ptr",)

    def __init__(self, batch_window_us: int = -1) -> None:
        """
        :param batch_window_us: the C read loop's batch window for fast
            streams, in microseconds; 0 turns batching off, < 0 keeps the
            default (``PGLF_HOLD_US``).
        """
        ptr = lib.pglf_router_new()
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate the notification router")
        self._ptr = ffi.gc(ptr, lib.pglf_router_free)
        lib.pglf_set_batch_window(ptr, batch_window_us)

    @property
    def ptr(self) -> Any:
        """The ``pglf_router *`` (for the read path)."""
        return self._ptr

    def add(self, ring: Ring, channels: tuple[str, ...], *, block: bool,
            reserve: int) -> RouterSub:
        """Register a subscription over ``ring``; its channels start inactive.

        :param block: the ``"block"`` overflow policy (else ``"drop"``).
        :param reserve: bytes that notifications leave free for markers.
        """
        ptr = lib.pglf_sub_new(self._ptr, ring.ptr, len(channels), block, reserve)
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate a subscription")
        sub = RouterSub(self, ptr, ring, channels)
        for idx, name in enumerate(channels):
            raw = encode_name(name)
            if lib.pglf_sub_attach(self._ptr, ptr, idx, raw, len(raw)) != 0:
                sub.free()
                raise MemoryError("cannot register a channel")
        return sub

    def route(self, channel: bytes, pid: int, payload: bytes) -> bool:
        """Route one notification; True when a full "block" ring kept it aside.

        While it is kept aside nothing else may be routed: :meth:`flush`
        retries it once its consumer frees space.
        """
        return bool(
            lib.pglf_route(self._ptr, channel, len(channel), pid, payload,
                           len(payload)) == lib.PGLF_BLOCKED
        )

    def flush(self) -> bool:
        """Pay owed markers that fit, retry a kept-aside notification.

        Returns True while a "block" ring still holds routing up.
        """
        return bool(lib.pglf_router_flush(self._ptr) == lib.PGLF_BLOCKED)

    @property
    def blocked(self) -> bool:
        """A notification is kept aside for a full "block" ring."""
        return bool(lib.pglf_router_blocked(self._ptr))

    @property
    def owing(self) -> bool:
        """Some subscription is still owed a marker."""
        return bool(lib.pglf_router_owing(self._ptr))

    def wake(self) -> None:
        """Wake the sleeping consumers of rings written since the last call."""
        lib.pglf_router_wake(self._ptr)

    def set_busy(self, busy: bool) -> None:
        """Tell the read path whether a query's results are awaited."""
        lib.pglf_router_set_busy(self._ptr, 1 if busy else 0)

    def deactivate_all(self) -> None:
        """Stop routing to every channel (the connection is gone)."""
        lib.pglf_router_deactivate_all(self._ptr)

    def counters(self) -> RouterCounters:
        """Counters since creation (safe from any thread)."""
        p = self._ptr
        return RouterCounters((
            int(lib.pglf_router_received(p)),
            int(lib.pglf_router_dropped(p)),
            int(lib.pglf_router_markers(p)),
        ))


def encode_name(name: str) -> bytes:
    """A channel name as the listener's session sends and receives it.

    The session is switched to UTF-8 (see :mod:`._queries`), so every name
    is representable and comes back from the server byte-identical.
    ``listen()`` has already refused names that are not valid Unicode.
    """
    return name.encode("utf-8")
