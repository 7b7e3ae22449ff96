"""Exceptions raised by pglisten_fast."""

from __future__ import annotations

import queue

__all__ = ["Closed", "ConnectError", "Empty", "Error"]


class Error(Exception):
    """Base class of every exception raised by pglisten_fast."""


class ConnectError(Error):
    """A connection could not be established; the driver's error is ``__cause__``."""


class Closed(Error):
    """The subscription or listener is closed (and, for reads, fully drained)."""


class Empty(Error, queue.Empty):
    """Nothing arrived within the timeout (also a :class:`queue.Empty`)."""


for _cls in (Error, ConnectError, Closed, Empty):
    _cls.__module__ = "pglisten_fast"
