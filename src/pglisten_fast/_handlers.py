"""Handler threads: ``listen(..., handler=fn)`` runs ``fn`` on its own thread.

Each subscription with a handler gets one daemon thread that iterates the
subscription and calls the handler for every item, markers included.  An
exception is logged and the thread goes on with the next item.  The
iteration ends once the subscription is closed and drained, so a handler
still sees everything that was buffered before ``unlisten()``/``stop()``;
``Listener.stop(timeout)`` waits for that within its timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from ._records import Notification

__all__ = ["start_handler"]

logger = logging.getLogger("pglisten_fast")


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
                                 handler, n)

    name = f"pglisten-fast-handler-{','.join(channels)[:40]}"
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t
