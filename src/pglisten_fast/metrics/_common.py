"""What both exporters share: listener snapshots taken at collection time."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._state import ListenerStats
from ..errors import Error
from ..listener import Listener

if TYPE_CHECKING:
    pass




def _require(module: str, extra: str) -> None:
    """Import ``module`` now, or say which extra provides it."""
    try:
        __import__(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed: pip install 'pglisten_fast[{extra}]'"
        ) from e


# -- snapshots shared by both exporters ------------------------------------------
@dataclass(frozen=True)
class _SubTotals:
    """The open subscriptions of one listener with the same channels, summed."""

    channels: str
    count: int
    delivered: int
    dropped: int
    markers: int
    buffered_bytes: int
    buffer_size: int


@dataclass(frozen=True)
class _Snapshot:
    """What one collection reports about one listener."""

    name: str | None
    stats: ListenerStats
    connected: bool
    subscriptions: tuple[_SubTotals, ...]


def _snapshot(listener: Listener, name: str | None) -> _Snapshot | None:
    """One consistent read of ``listener``; None if it cannot be read.

    (An inherited listener refuses use after ``fork()``: a child process
    exporting its own metrics simply does not report it.)
    """
    try:
        stats = listener.stats
        connected = listener.connected
        subs = listener.subscriptions
    except Error:
        return None
    totals: dict[str, list[int]] = {}
    for sub in subs:
        try:
            s = sub.stats
        except Error:
            continue
        key = ",".join(sub.channels)
        t = totals.setdefault(key, [0, 0, 0, 0, 0, 0])
        t[0] += 1
        t[1] += s.delivered
        t[2] += s.dropped
        t[3] += s.markers
        t[4] += s.buffered_bytes
        t[5] += sub.buffer_size
    return _Snapshot(
        name=name,
        stats=stats,
        connected=connected,
        subscriptions=tuple(_SubTotals(k, *v) for k, v in totals.items()),
    )


class _Sources:
    """The listeners one exporter reports, held weakly, with their names."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._lock = threading.Lock()
        self._entries: list[tuple[weakref.ref[Listener], str | None]] = []

    def add(self, listener: Listener, name: str | None) -> None:
        if not isinstance(listener, Listener):
            raise TypeError(
                f"expected a pglisten_fast.Listener, got {type(listener).__name__}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("name must be a non-empty str (or None)")
        with self._lock:
            live = [(r, n) for r, n in self._entries if r() is not None]
            for ref, other in live:
                if ref() is listener:
                    raise ValueError(
                        f"this listener is already reported by {self._what}"
                    )
                if name is None or other is None or name == other:
                    raise ValueError(
                        f"several listeners reported by {self._what} need distinct "
                        f"names (got {other!r} and {name!r}); pass name=..."
                    )
            self._entries = [*live, (weakref.ref(listener), name)]

    def remove(self, listener: Listener) -> bool:
        with self._lock:
            found = any(r() is listener for r, _ in self._entries)
            self._entries = [
                (r, n) for r, n in self._entries if r() not in (None, listener)
            ]
            return found

    def snapshots(self) -> list[_Snapshot]:
        with self._lock:
            entries = list(self._entries)
        out = []
        for ref, name in entries:
            listener = ref()
            if listener is not None:
                snap = _snapshot(listener, name)
                del listener
                if snap is not None:
                    out.append(snap)
        return out


