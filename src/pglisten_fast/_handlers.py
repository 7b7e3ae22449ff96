"""Handlers: ``listen(..., handler=fn)`` calls ``fn`` for every item.

A plain function runs on a daemon thread of its own that iterates the
subscription; an ``async def`` function runs as a task on the event loop
that called ``listen()``, awaited one item at a time.  Either way markers
are included, an exception is logged and the next item follows, and the
iteration ends once the subscription is closed and drained: a handler
still sees everything that was buffered before ``unlisten()``/``stop()``.
``Listener.stop(timeout)`` waits for handler threads within its timeout;
handler tasks finish on their loop.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable

from ._log import fields, logger
from ._records import Notification

__all__ = ["is_async_handler", "start_async_handler", "start_handler"]



def start_handler(
    items: Iterable[Notification],
    handler: Callable[[Notification], object],
    channels: tuple[str, ...] = (),
) -> threading.Thread:
    """Start a daemon thread calling ``handler`` on each of ``items``."""

    def run() -> None:
        for n in items:
            try:
                handler(n)
            except Exception:
                logger.exception("handler %r raised on %r; it keeps running",
                                 handler, n,
                                 extra=fields("handler_error", channel=n.channel))

    name = f"pglisten-fast-handler-{','.join(channels)[:40]}"
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def is_async_handler(handler: object) -> bool:
    """Whether calling ``handler`` returns an awaitable (``async def``)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - async __call__
    )


def start_async_handler(
    items: AsyncIterable[Notification],
    handler: Callable[[Notification], Awaitable[object]],
    channels: tuple[str, ...] = (),
) -> asyncio.Task[None]:
    """Start a task on the running loop awaiting ``handler`` on each item.

    :raises TypeError: no asyncio event loop runs in this thread.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise TypeError(
            "an async handler runs on the event loop that calls listen(): "
            "call listen() from a coroutine, or pass a plain function"
        ) from None

    async def run() -> None:
        async for n in items:
            try:
                await handler(n)
            except Exception:
                logger.exception("handler %r raised on %r; it keeps running",
                                 handler, n,
                                 extra=fields("handler_error", channel=n.channel))

    return loop.create_task(
        run(), name=f"pglisten-fast-handler-{','.join(channels)[:40]}")
