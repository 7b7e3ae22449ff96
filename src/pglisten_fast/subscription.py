"""Subscription: the consumer's handle on one or more channels.

A subscription owns a ring buffer that the Listener's selector thread fills
(in C, without the GIL) and that consumers read from: ``get``, ``get_batch``,
iteration, and their async forms (asyncio, trio, anyio).  Several threads or
tasks may consume one
subscription; each notification goes to exactly one of them.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from . import _fork
from ._aio import FdWaiters
from ._records import Notification
from ._ring import Ring, Status
from .errors import Closed, Empty, Error

__all__ = ["Overflow", "Subscription", "SubscriptionStats"]


Overflow = Literal["drop", "block"]

# A blocked main thread wakes this often so that Ctrl-C is handled promptly
# (signals are delivered to whichever thread the kernel picks).
_MAIN_THREAD_SLICE = 0.25


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """Snapshot of a subscription's counters."""

    #: Notifications handed to consumers (markers excluded).
    delivered: int
    #: Notifications lost because the buffer was full (``overflow="drop"``).
    dropped: int
    #: Markers queued for this subscription.
    markers: int
    #: Bytes currently buffered in the ring.
    buffered_bytes: int


class Subscription:
    """Notifications of one or more channels, in server order.

    Created by :meth:`Listener.listen`; not instantiated directly.  Every
    method may be called from any thread.
    """

    __slots__ = (
        "__weakref__",
        "_channels",
        "_created_in",
        "_lock",
        "_on_unlisten",
        "_overflow",
        "_pending",
        "_plock",
        "_raw",
        "_ring",
        "_waiters",
    )

    def __init__(
        self,
        channels: tuple[str, ...],
        ring: Ring,
        overflow: Overflow,
        on_unlisten: Callable[[], None],
        payload_type: type[str] | type[bytes] = str,
    ) -> None:
        """
        :param channels: the channels, already checked.
        :param ring: the ring the listener's selector thread fills; closing
            it ends the subscription (the listener does so on ``stop()``).
        :param overflow: the ring's overflow policy (for display).
        :param on_unlisten: tells the listener to stop routing here.
        :param payload_type: ``str`` (decoded) or ``bytes`` (undecoded).
        """
        self._on_unlisten = on_unlisten
        self._created_in = _fork.generation()
        ring.on_detached = _weak_call(self._try_retire)
        self._channels = channels
        self._raw = payload_type is bytes
        self._ring = ring
        self._overflow: Overflow = overflow
        # Serialises consumers: the ring has a single consumer side.  A
        # thread may hold it while it sleeps in the ring's wait.
        self._lock = threading.Lock()
        # Guards _pending and _waiters; never held while sleeping.
        self._plock = threading.Lock()
        # Items taken from the ring but not yet handed out (iteration).
        self._pending: deque[Notification] = deque()
        # Async tasks waiting on the ring's fd (asyncio loops, trio).
        self._waiters = FdWaiters(ring.wake.rfd, self._plock)

    # -- properties ------------------------------------------------------
    @property
    def channels(self) -> tuple[str, ...]:
        """The channels of this subscription, in the order given to ``listen``."""
        return self._channels

    @property
    def payload_type(self) -> type[str] | type[bytes]:
        """``str`` (payloads decoded) or ``bytes`` (undecoded)."""
        return bytes if self._raw else str

    @property
    def overflow(self) -> Overflow:
        """The overflow policy: ``"drop"`` or ``"block"``."""
        return self._overflow

    @property
    def buffer_size(self) -> int:
        """Capacity of the ring buffer in bytes."""
        return self._ring.capacity

    @property
    def closed(self) -> bool:
        """True once ``unlisten``/``close`` or the listener's ``stop`` ran."""
        return self._ring.closed

    @property
    def stats(self) -> SubscriptionStats:
        """A :class:`SubscriptionStats` snapshot."""
        _fork.check(self._created_in, "Subscription")
        _written, delivered, dropped, markers = self._ring.stats()
        pending = sum(1 for n in tuple(self._pending) if not n.connection_reset)
        return SubscriptionStats(
            delivered=delivered - pending,
            dropped=dropped,
            markers=markers,
            buffered_bytes=self._ring.used,
        )

    def __repr__(self) -> str:
        state = "closed" if self._ring.closed else "open"
        return (
            f"<Subscription channels={self._channels!r} overflow={self._overflow!r} "
            f"buffer_size={self._ring.capacity} {state}>"
        )

    # -- consuming ---------------------------------------------------------
    def _take(self, max_items: int) -> list[Notification]:
        """Take up to ``max_items`` ready items.  Caller holds ``_lock``."""
        pending = self._pending
        if pending:
            with self._plock:
                if len(pending) <= max_items:
                    out = list(pending)
                    pending.clear()
                else:
                    out = [pending.popleft() for _ in range(max_items)]
            if len(out) < max_items:
                out += self._ring.drain(self._channels, max_items - len(out),
                                        None, self._raw)
            return out
        return self._ring.drain(self._channels, max_items, None, self._raw)

    def _get_many(self, max_items: int, timeout: float | None) -> list[Notification]:
        """Wait up to ``timeout`` for the first item, then take what is ready.

        Returns ``[]`` on timeout; raises :class:`Closed` when closed and empty.
        """
        _fork.check(self._created_in, "Subscription")
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or >= 0")
        # The timeout covers waiting for another consumer's turn too.
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._lock
        if not lock.acquire(False) and not lock.acquire(
            timeout=-1 if timeout is None else timeout
        ):
            return []
        try:
            if self._pending:
                return self._take(max_items)
            # Every wake-up of a consumer comes through here: one C call
            # drains the ring, or sleeps (GIL released) and then drains it.
            ring, channels, raw = self._ring, self._channels, self._raw
            slice_ = (_MAIN_THREAD_SLICE
                      if threading.current_thread() is threading.main_thread()
                      else None)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            while True:
                if slice_ is not None and (left is None or left > slice_):
                    left = slice_
                got = ring.take(channels, max_items, left, raw)
                if isinstance(got, list):
                    return got
                # An iterator may have put items back meanwhile (_keep):
                # they come first, and the subscription is not drained.
                if self._pending:
                    return self._take(max_items)
                if got == Status.CLOSED:
                    raise Closed(f"subscription {self._channels!r} is closed")
                if got == Status.EINVAL:
                    raise Error("cannot wait on the subscription's wake-up fd")
                # TIMEOUT (of the wait or of a main-thread slice) or EINTR:
                # signal handlers run here; go on until the deadline.
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return []
                else:
                    left = None
        finally:
            self._release_consumer()

    def _release_consumer(self) -> None:
        """Release the consumer lock, keeping asyncio waiters' wake-ups armed.

        A consumer may have taken the signal meant for a waiting task, or
        cleared the ring's "consumer waiting" flag (a timed-out wait does):
        re-arm on the waiters' behalf, and wake them if records are already
        there.  Done under ``_plock``, which a task also holds while it
        registers and tries the lock, so no task can slip between the two.

        Once the subscription is closed and nobody waits, the ring is told
        so (it then lets its fd go, and its memory once drained).
        """
        ring = self._ring
        with self._plock:
            if self._waiters:
                if ring.consumer_wait_arm():
                    ring.wake.signal()
            elif ring.consumer_closed():
                ring.retire(drained=not self._pending and ring.used == 0)
            self._lock.release()

    def _try_retire(self) -> None:
        """Let the ring go if no consumer is busy (any thread; never called
        with ``_plock`` held)."""
        # A consumer checks for the close and releases its lock under
        # _plock: wait that out, so that either it saw the close (and
        # retires) or its lock is free here.
        with self._plock:
            pass
        if self._lock.acquire(blocking=False):
            self._release_consumer()

    def get(self, timeout: float | None = None) -> Notification:
        """Return the next notification or marker.

        :param timeout: seconds to wait; None waits until one arrives.
        :raises Empty: nothing arrived within ``timeout``.
        :raises Closed: the subscription is closed and fully drained.
        """
        items = self._get_many(1, timeout)
        if not items:
            raise Empty(f"no notification within {timeout} s")
        return items[0]

    def get_nowait(self) -> Notification:
        """Return the next buffered item without waiting.

        :raises Empty: nothing is buffered.
        :raises Closed: the subscription is closed and fully drained.
        """
        return self.get(timeout=0)

    def get_batch(
        self, max_items: int = 1024, timeout: float | None = None
    ) -> list[Notification]:
        """Wait up to ``timeout`` for the first item, then return what is buffered.

        :param max_items: upper bound on the batch length (>= 1).
        :param timeout: seconds to wait for the first item; None waits forever.
        :returns: between 1 and ``max_items`` items, or ``[]`` on timeout.
        :raises Closed: the subscription is closed and fully drained.
        """
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive int, got {max_items!r}")
        return self._get_many(max_items, timeout)

    def _keep(self, rest: list[Notification]) -> None:
        """Put items back in front, in order, for the next reader.

        Iterators take a batch but yield one item at a time: the rest stays
        in the subscription, not in the generator, so that an abandoned
        iterator loses nothing.
        """
        if rest:
            with self._plock:
                self._pending.extendleft(reversed(rest))

    def __iter__(self) -> Iterator[Notification]:
        """Yield items as they arrive; ends once closed and drained."""
        while True:
            with self._plock:
                item = self._pending.popleft() if self._pending else None
            if item is not None:
                yield item
                continue
            try:
                batch = self._get_many(256, None)
            except Closed:
                return
            self._keep(batch[1:])
            yield batch[0]

    # -- async (asyncio, trio, anyio) --------------------------------------
    async def _get_many_async(
        self, max_items: int, timeout: float | None
    ) -> list[Notification]:
        _fork.check(self._created_in, "Subscription")
        waiter = self._waiters.waiter()
        deadline = None if timeout is None else time.monotonic() + timeout
        ring = self._ring
        while True:
            # Never block the event loop on the consumer lock.
            contended = not self._lock.acquire(blocking=False)
            if not contended:
                try:
                    if not ring.closed:
                        # No thread sleeps in the ring's wait while we hold
                        # the lock: consume the signal, then look.
                        ring.wake.clear()
                    items = self._take(max_items)
                    if items:
                        return items
                    if ring.closed:
                        raise Closed(f"subscription {self._channels!r} is closed")
                    if ring.consumer_wait_arm():
                        continue  # records (or a close) arrived meanwhile
                finally:
                    self._release_consumer()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                # The wait flag stays armed: at worst one spurious wake-up,
                # while clearing it could strand another waiter.
                return []
            with self._plock:
                if ring.closed:
                    continue    # never wait on a closed ring's fd: look again
                waiter.register()
                # We armed the ring ourselves, or whoever holds the lock now
                # re-arms for us when releasing it (_release_consumer); if it
                # was released in between, look again.
                free = contended and self._lock.acquire(blocking=False)
                if free:
                    self._lock.release()
                    waiter.unregister()
            if free:
                continue
            try:
                if not await waiter.wait(left):
                    return []
            finally:
                with self._plock:
                    waiter.unregister()
                if ring.closed:
                    self._try_retire()

    async def get_async(self, timeout: float | None = None) -> Notification:
        """Async form of :meth:`get` (asyncio, trio, anyio); cancelling it
        loses nothing."""
        items = await self._get_many_async(1, timeout)
        if not items:
            raise Empty(f"no notification within {timeout} s")
        return items[0]

    async def get_batch_async(
        self, max_items: int = 1024, timeout: float | None = None
    ) -> list[Notification]:
        """Async form of :meth:`get_batch` (asyncio, trio, anyio)."""
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive int, got {max_items!r}")
        return await self._get_many_async(max_items, timeout)

    def __aiter__(self) -> AsyncIterator[Notification]:
        """Yield items as they arrive; ends once closed and drained.

        A plain async iterator, not an async generator: leaving the loop
        early needs no finalization, and the batch it holds stays in the
        subscription for the next reader.
        """
        return _AsyncItems(self)

    async def _anext(self) -> Notification:
        with self._plock:
            if self._pending:
                return self._pending.popleft()
        try:
            batch = await self._get_many_async(256, None)
        except Closed:
            raise StopAsyncIteration from None
        self._keep(batch[1:])
        return batch[0]

    # -- lifecycle ---------------------------------------------------------
    def unlisten(self) -> None:
        """Stop receiving; idempotent.  Buffered items can still be read."""
        _fork.check(self._created_in, "Subscription")
        if self._ring.closed:
            return
        self._ring.close()
        self._on_unlisten()
        self._try_retire()

    close = unlisten

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unlisten()


def _weak_call(method: Callable[[], None]) -> Callable[[], None]:
    """``method`` without keeping its object alive."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        m = ref()
        if m is not None:
            m()

    return call


class _AsyncItems:
    """``async for`` over a subscription."""

    __slots__ = ("_sub",)

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    def __aiter__(self) -> _AsyncItems:
        return self

    async def __anext__(self) -> Notification:
        return await self._sub._anext()
