"""pglisten_fast: a fast PostgreSQL LISTEN/NOTIFY client.

Usage::

    import pglisten_fast as pgl

    with pgl.Listener("dbname=app") as listener:
        sub = listener.listen("orders")
        for n in sub:
            if n.connection_reset:
                reload_orders()          # marker: state may have been missed
            else:
                handle(n.channel, n.payload)

One selector thread per Listener reads the connection in C (without the GIL)
and writes each notification into the lock-free ring buffer of every
subscription of its channel; consumers read with ``get``, ``get_batch``,
iteration or their asyncio forms.  Markers (``connection_reset=True``) tell a
consumer exactly when it may have missed something: when LISTEN takes
effect, after a reconnect, and where a full buffer dropped notifications.
"""

from __future__ import annotations

from ._readpath import IMPL as __impl__
from ._records import Notification
from ._state import ListenerStats
from .errors import Closed, ConnectError, Empty, Error
from .listener import Listener, start_listener
from .publish import notify, notify_many
from .subscription import Subscription, SubscriptionStats

__version__ = "0.1.0"

__all__ = [
    "Closed",
    "ConnectError",
    "Empty",
    "Error",
    "Listener",
    "ListenerStats",
    "Notification",
    "Subscription",
    "SubscriptionStats",
    "__impl__",
    "__version__",
    "notify",
    "notify_many",
    "start_listener",
]

for _obj in (Listener, ListenerStats, Subscription, SubscriptionStats, notify,
             notify_many, start_listener):
    _obj.__module__ = __name__
del _obj
