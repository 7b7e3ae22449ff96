"""Python face of the C ring buffer (``csrc/pglf_ring.c``).

One of the three modules that import the cffi extension (with
:mod:`._router` and :mod:`._readpath`): everything else sees enums and
methods, never ``ffi``/``lib`` objects.

A :class:`Ring` owns one lock-free single-producer / single-consumer ring of
variable-length records (``csrc/pglf_ring.c``) and the wake-up fd its
consumer sleeps on.  Thread roles follow the C contract: ``write`` and the
``producer_*`` methods belong to one producer thread, ``drain*`` and
``wait*`` to one consumer thread at a time; ``close``, ``used`` and the
statistics may be called from anywhere.

Release: the memory and the fd go as soon as both sides are done with
them, without waiting for the garbage collector.  The producer says so
with :meth:`Ring.detach_producer`; the consumer with :meth:`Ring.retire`
(no more waits; and, once closed and drained, no more reads).
"""

from __future__ import annotations

import enum
import os
import threading
import weakref
from collections.abc import Callable
from typing import NamedTuple

from . import _records
from ._pglf import ffi, lib
from ._records import Notification

__all__ = [
    "MAX_CAPACITY",
    "MIN_CAPACITY",
    "REC_HDR",
    "Kind",
    "RawRecord",
    "Reason",
    "Ring",
    "RingFull",
    "Status",
    "WakeFd",
    "round_capacity",
]


class Status(enum.IntEnum):
    """Result codes of the ring functions (``PGLF_*`` in ``pglf_ring.h``)."""

    OK = lib.PGLF_OK
    FULL = lib.PGLF_FULL          # no room now; try again later
    E2BIG = lib.PGLF_E2BIG        # the record can never fit in this ring
    EINVAL = lib.PGLF_EINVAL      # bad argument, or an fd that cannot be polled
    ENOMEM = lib.PGLF_ENOMEM
    CLOSED = lib.PGLF_CLOSED      # wait: the ring is closed
    TIMEOUT = lib.PGLF_TIMEOUT    # wait: nothing arrived in time
    READY = lib.PGLF_READY        # wait: records are available
    EINTR = lib.PGLF_EINTR        # wait: interrupted by a signal


def _millis(seconds: float | None) -> int:
    """A wait's timeout in whole milliseconds, rounded up (None: -1, none)."""
    if seconds is None:
        return -1
    return max(0, min(int(seconds * 1000 + 0.999), 2**31 - 1))


# Result code -> Status by lookup: calling the enum costs a microsecond on
# the consumer's path.
_STATUS: dict[int, Status] = {int(s): s for s in Status}


class Kind(enum.IntEnum):
    """Record kinds (``PGLF_KIND_*``)."""

    NOTIFY = lib.PGLF_KIND_NOTIFY
    PAD = lib.PGLF_KIND_PAD
    MARKER = lib.PGLF_KIND_MARKER


class Reason(enum.IntEnum):
    """Why a marker was queued (``PGLF_REASON_*``)."""

    NONE = lib.PGLF_REASON_NONE
    LISTEN = lib.PGLF_REASON_LISTEN
    RECONNECT = lib.PGLF_REASON_RECONNECT
    OVERFLOW = lib.PGLF_REASON_OVERFLOW


#: Bytes of a record header; payloads follow it, records are 8-byte aligned.
REC_HDR: int = lib.PGLF_REC_HDR

#: Smallest ring the library hands out: a maximal PostgreSQL payload
#: (7,999 bytes) always fits, with room for markers.
MIN_CAPACITY = 64 * 1024
MAX_CAPACITY = 1 << 34

# Rings made here are drained by the other extension through their address.
_ABI_C = int(lib.pglf_ring_abi())
if _records.RING_ABI != _ABI_C:  # pragma: no cover - a broken build
    raise ImportError(
        "pglisten_fast's two extensions were built with different ring layouts "
        f"({_ABI_C:#x} != {_records.RING_ABI:#x}); reinstall pglisten_fast"
    )


class RingFull(Exception):
    """Raised by :meth:`Ring.write_or_raise` when the record does not fit now."""


class RawRecord(NamedTuple):
    """One record as stored in the ring (tests and diagnostics)."""

    kind: int
    reason: int
    chan: int
    pid: int
    payload: bytes


def round_capacity(size: int) -> int:
    """Round a buffer size up to a power of two of at least :data:`MIN_CAPACITY`.

    :raises TypeError: ``size`` is not an ``int``.
    :raises ValueError: ``size`` is not positive or is absurdly large.
    """
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"buffer_size must be an int, got {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"buffer_size must be positive, got {size}")
    if size > MAX_CAPACITY:
        raise ValueError(f"buffer_size {size} exceeds the maximum of {MAX_CAPACITY}")
    cap = MIN_CAPACITY
    while cap < size:
        cap <<= 1
    return cap


class WakeFd:
    """A non-blocking wake-up fd pair: an eventfd on Linux, else a pipe.

    Once closed, :meth:`signal` does nothing: a late signal can never reach
    another file that reused the number.
    """

    __slots__ = ("__weakref__", "_finalizer", "_lock", "rfd", "wfd")

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.rfd = self.wfd = fd
        else:  # pragma: no cover - non-Linux
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_fds, self.rfd, self.wfd)

    def signal(self) -> None:
        """Make the fd readable (safe from any thread, also after close)."""
        with self._lock:
            if self._finalizer.alive:
                lib.pglf_fd_signal(self.wfd)

    def clear(self) -> None:
        """Consume pending signals without blocking (nothing once closed)."""
        with self._lock:
            if self._finalizer.alive:
                lib.pglf_fd_clear(self.rfd)

    def fileno(self) -> int:
        return self.rfd

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Close the fds (idempotent)."""
        with self._lock:
            self._finalizer()


def _close_fds(rfd: int, wfd: int) -> None:
    os.close(rfd)
    if wfd != rfd:
        os.close(wfd)


def _free_ring(ptr: object, wake: WakeFd | None) -> None:
    lib.pglf_ring_free(ptr)
    if wake is not None:
        wake.close()


class Ring:
    """A C SPSC ring of records plus the fd its consumer sleeps on.

    :param capacity: bytes, rounded up to a power of two (C minimum 4 KiB;
        the library itself uses :func:`round_capacity`).
    :param producer_wfd: fd the consumer signals when a producer waiting for
        space (:meth:`producer_wait_arm`) may continue; -1 for none.
    :param consumer_wake: the fd the producer signals when the consumer
        sleeps; by default the ring makes (and closes) its own.
    """

    __slots__ = (
        "__weakref__",
        "_capacity",
        "_detached",
        "_drained",
        "_final",
        "_finalizer",
        "_idle",
        "_lock",
        "_out",
        "_own_wake",
        "_ptr",
        "address",
        "on_detached",
        "wake",
    )

    def __init__(self, capacity: int, producer_wfd: int = -1,
                 consumer_wake: WakeFd | None = None) -> None:
        if capacity <= 0 or capacity > MAX_CAPACITY:
            raise ValueError(f"ring capacity out of range: {capacity}")
        own = consumer_wake is None
        self.wake = WakeFd() if consumer_wake is None else consumer_wake
        ptr = lib.pglf_ring_new(capacity, self.wake.wfd, self.wake.rfd, producer_wfd)
        if ptr == ffi.NULL:
            if own:
                self.wake.close()
            raise MemoryError(f"cannot allocate a ring of {capacity} bytes")
        self._ptr: object = ptr
        self._out: object = None
        self.address: int = int(ffi.cast("uintptr_t", ptr))
        self._capacity = int(lib.pglf_ring_capacity(ptr))
        self._own_wake = own
        self._lock = threading.Lock()       # guards release against readers
        self._detached = producer_wfd < 0   # the producer is done
        self._idle = False                  # the consumer will not wait again
        self._drained = False               # ... nor read: closed and empty
        self._final: tuple[int, int, int, int] | None = None
        #: Called (on the producer's thread) once the producer detached.
        self.on_detached: Callable[[], None] | None = None
        self._finalizer = weakref.finalize(
            self, _free_ring, ptr, self.wake if own else None
        )

    # -- any thread ----------------------------------------------------
    @property
    def ptr(self) -> object:
        """The ``pglf_ring *`` (valid while this object lives)."""
        return self._ptr

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_payload(self) -> int:
        with self._lock:
            return 0 if self._ptr is None else int(lib.pglf_ring_max_payload(self._ptr))

    @property
    def used(self) -> int:
        with self._lock:
            return 0 if self._ptr is None else int(lib.pglf_ring_used(self._ptr))

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._ptr is None or bool(lib.pglf_ring_closed(self._ptr))

    @property
    def released(self) -> bool:
        """The memory is gone (both sides done)."""
        return self._ptr is None

    def close(self) -> None:
        """Mark the ring closed and wake every sleeping consumer (idempotent)."""
        with self._lock:
            if self._ptr is not None and not self.wake.closed:
                lib.pglf_ring_close(self._ptr)

    def stats(self) -> tuple[int, int, int, int]:
        """``(written, delivered, dropped, markers)`` counters."""
        with self._lock:
            return self._stats_locked()

    def _stats_locked(self) -> tuple[int, int, int, int]:
        p = self._ptr
        if p is None:
            assert self._final is not None
            return self._final
        return (
            int(lib.pglf_ring_stat_written(p)),
            int(lib.pglf_ring_stat_delivered(p)),
            int(lib.pglf_ring_stat_dropped(p)),
            int(lib.pglf_ring_stat_markers(p)),
        )

    # -- release ---------------------------------------------------------
    def detach_producer(self) -> None:
        """Producer: done for good (idempotent).

        No consumer signals the producer's fd after this returns, so the
        producer may close it.  Then :attr:`on_detached` runs, on this thread.
        """
        with self._lock:
            if self._detached:
                return
            self._detached = True
            if self._ptr is not None:
                lib.pglf_ring_detach_producer(self._ptr)
            self._release_locked()
        hook = self.on_detached
        if hook is not None:
            hook()

    def retire(self, *, drained: bool) -> None:
        """Consumer: it will not wait on the fd again; with ``drained`` (the
        ring is closed and empty) it will not read again either."""
        with self._lock:
            self._idle = True
            self._drained = self._drained or drained
            self._release_locked()

    def _release_locked(self) -> None:
        if not (self._detached and self._idle):
            return
        if self._own_wake:
            self.wake.close()
        if self._drained and self._ptr is not None:
            self._final = self._stats_locked()
            self._ptr = None
            self._finalizer()

    # -- producer ------------------------------------------------------
    def write(
        self,
        payload: bytes,
        *,
        kind: Kind = Kind.NOTIFY,
        reason: Reason = Reason.NONE,
        chan: int = 0,
        pid: int = 0,
        reserve: int = 0,
    ) -> Status:
        """Append one record; returns ``OK``, ``FULL`` or ``E2BIG``."""
        return _STATUS[
            lib.pglf_ring_write(
                self._ptr, kind, reason, chan, pid, payload, len(payload), reserve
            )
        ]

    def write_or_raise(
        self,
        payload: bytes,
        *,
        kind: Kind = Kind.NOTIFY,
        reason: Reason = Reason.NONE,
        chan: int = 0,
        pid: int = 0,
        reserve: int = 0,
    ) -> None:
        """Like :meth:`write`, raising :class:`RingFull` or :class:`ValueError`."""
        rc = self.write(payload, kind=kind, reason=reason, chan=chan, pid=pid,
                        reserve=reserve)
        if rc == Status.FULL:
            raise RingFull
        if rc == Status.E2BIG:
            raise ValueError(
                f"record of {len(payload)} bytes exceeds this ring's maximum "
                f"payload of {self.max_payload} bytes"
            )

    def free_bytes(self) -> int:
        return int(lib.pglf_ring_free_bytes(self._ptr))

    def wake_consumer(self) -> bool:
        """Signal the consumer if it sleeps; call after a batch of writes."""
        return bool(lib.pglf_ring_wake_consumer(self._ptr))

    def producer_wait_arm(self, need: int) -> bool:
        """True if ``need`` bytes are free now; else the consumer will signal."""
        return bool(lib.pglf_ring_producer_wait_arm(self._ptr, need))

    # -- consumer ------------------------------------------------------
    def drain(
        self,
        channels: tuple[str, ...],
        max_items: int,
        encoding: str | None = None,
        raw: bool = False,
    ) -> list[Notification]:
        """Consume up to ``max_items`` records as :class:`Notification` objects
        (payloads decoded with ``encoding``, UTF-8 by default, or ``bytes``
        with ``raw``)."""
        if self._drained:
            return []
        return _records.drain(self.address, channels, max_items, encoding, raw)

    def drain_raw(self, max_records: int, out_cap: int = 1 << 20) -> list[RawRecord]:
        """Consume up to ``max_records`` records as :class:`RawRecord` tuples."""
        if self._drained:
            return []
        if self._out is None or len(ffi.buffer(self._out)) < out_cap:
            self._out = ffi.new("char[]", out_cap)
        used = ffi.new("size_t *")
        n = lib.pglf_ring_drain(self._ptr, self._out, out_cap, max_records, used)
        buf = ffi.buffer(self._out, used[0])[:]
        out: list[RawRecord] = []
        off = 0
        hdr = ffi.cast("pglf_rec *", self._out)
        for _ in range(n):
            h = ffi.cast("pglf_rec *", ffi.cast("char *", hdr) + off)
            length = int(h.len)
            start = off + REC_HDR
            out.append(
                RawRecord(
                    int(h.kind), int(h.reason), int(h.chan), int(h.pid),
                    buf[start : start + length],
                )
            )
            off += (REC_HDR + length + 7) & ~7
        return out

    def wait(self, timeout: float | None) -> Status:
        """Sleep (GIL released) until records arrive, close, or ``timeout``.

        Returns ``READY``, ``CLOSED``, ``TIMEOUT``, ``EINTR``, or ``EINVAL``
        when the wake-up fd cannot be polled.
        """
        if self._idle:
            return Status.CLOSED
        return _STATUS[lib.pglf_ring_wait(self._ptr, _millis(timeout))]

    def take(
        self, channels: tuple[str, ...], max_items: int, timeout: float | None,
        raw: bool,
    ) -> list[Notification] | Status:
        """Drain up to ``max_items`` records (UTF-8 payloads, or ``bytes``
        with ``raw``); if there are none, sleep up to ``timeout`` seconds
        (None: no limit, 0: not at all) with the GIL released for them first.

        Returns a non-empty list, or the wait's result: ``CLOSED`` (closed
        and empty), ``TIMEOUT``, ``EINTR`` or ``EINVAL`` (the fd cannot be
        polled).  One C call per wake-up of the consumer.
        """
        if self._idle:
            items = self.drain(channels, max_items, None, raw)
            return items or Status.CLOSED
        got = _records.take(self.address, channels, max_items, _millis(timeout), raw)
        return got if isinstance(got, list) else _STATUS[got]

    def consumer_closed(self) -> bool:
        """:attr:`closed` for the consumer, without the release lock.

        Only for the consumer, between waits: the memory cannot go away
        under it, since it is released only once the consumer has retired.
        """
        return self._idle or bool(lib.pglf_ring_closed(self._ptr))

    def consumer_wait_arm(self) -> bool:
        """Announce a sleep; True means records (or close) are already there."""
        if self._drained:
            return True
        return bool(lib.pglf_ring_consumer_wait_arm(self._ptr))

    def consumer_wait_disarm(self) -> None:
        if not self._drained:
            lib.pglf_ring_consumer_wait_disarm(self._ptr)
