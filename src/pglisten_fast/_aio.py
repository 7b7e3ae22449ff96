"""Async waiting on a subscription's wake-up fd: asyncio and trio.

A subscription's async consumers (``get_async``, ``get_batch_async``,
``async for``) sleep until its wake-up fd is readable.  Which event loop
runs them is found at each call: asyncio (also anyio on asyncio), or trio
(also anyio on trio), without making trio or anyio a dependency.

- asyncio: one fd reader per event loop, shared by every task of that
  loop waiting on the subscription (``add_reader`` would replace another
  task's callback);
- trio: ``trio.lowlevel.wait_readable``, one task at a time per fd (trio
  refuses two), the others queued on a ``trio.Lock``.

Registration happens under the subscription's ``plock``, so that a
consumer releasing the subscription can see that someone waits and
re-arm the ring for them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

__all__ = ["FdWaiters", "Waiter"]


class Waiter:
    """One task's wait on the fd (create with :meth:`FdWaiters.waiter`)."""

    __slots__ = ("_fut", "_loop", "_owner")

    def __init__(self, owner: FdWaiters, loop: asyncio.AbstractEventLoop | None
                 ) -> None:
        self._owner = owner
        self._loop = loop       # None under trio
        self._fut: asyncio.Future[None] | None = None

    def register(self) -> None:
        """Count this task as waiting; caller holds the plock."""
        owner = self._owner
        loop = self._loop
        if loop is None:
            owner._trio_waiting += 1
            return
        self._fut = loop.create_future()
        tasks = owner._loops.get(loop)
        if tasks is None:
            loop.add_reader(owner.fd, owner._wake_loop, loop)
            tasks = owner._loops[loop] = set()
        tasks.add(self._fut)

    def unregister(self) -> None:
        """No longer waiting (idempotent); caller holds the plock."""
        owner = self._owner
        loop = self._loop
        if loop is None:
            if owner._trio_waiting:
                owner._trio_waiting -= 1
            return
        tasks = owner._loops.get(loop)
        if tasks is None or self._fut not in tasks:
            return
        tasks.discard(self._fut)
        if not tasks:
            del owner._loops[loop]
            loop.remove_reader(owner.fd)

    async def wait(self, timeout: float | None) -> bool:
        """Sleep until the fd is readable; False on timeout."""
        if self._loop is None:
            return await self._owner._wait_trio(timeout)
        assert self._fut is not None
        try:
            if timeout is None:
                await self._fut
            else:
                await asyncio.wait_for(self._fut, timeout)
        except asyncio.TimeoutError:
            return False
        return True


class FdWaiters:
    """The tasks waiting on one fd, under any supported event loop."""

    __slots__ = ("_loops", "_plock", "_trio_lock", "_trio_waiting", "fd")

    def __init__(self, fd: int, plock: threading.Lock) -> None:
        self.fd = fd
        self._plock = plock
        self._loops: dict[asyncio.AbstractEventLoop, set[asyncio.Future[None]]] = {}
        self._trio_waiting = 0
        self._trio_lock: Any = None

    def __bool__(self) -> bool:
        """Whether any task waits (caller holds the plock)."""
        return bool(self._loops) or self._trio_waiting > 0

    def waiter(self) -> Waiter:
        """A waiter for the calling task's event loop.

        :raises RuntimeError: no asyncio loop nor trio run in this thread.
        """
        try:
            return Waiter(self, asyncio.get_running_loop())
        except RuntimeError:
            pass
        if _in_trio():
            return Waiter(self, None)
        raise RuntimeError(
            "the async methods of a subscription need a running asyncio event "
            "loop or trio (anyio runs on either)"
        )

    def _wake_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """fd reader callback: wake every task of ``loop`` waiting here."""
        with self._plock:
            tasks = self._loops.pop(loop, set())
            loop.remove_reader(self.fd)
        for fut in tasks:
            if not fut.done():
                fut.set_result(None)

    async def _wait_trio(self, timeout: float | None) -> bool:
        import trio  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

        if self._trio_lock is None:
            self._trio_lock = trio.Lock()
        with trio.move_on_after(float("inf") if timeout is None else timeout) \
                as scope:
            async with self._trio_lock:
                await trio.lowlevel.wait_readable(self.fd)
        return not scope.cancelled_caught


def _in_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
