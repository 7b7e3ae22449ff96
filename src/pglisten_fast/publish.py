"""Publishing helpers: ``notify`` and ``notify_many``.

Both run in the connection's current transaction: when the connection is
not in autocommit mode, nothing is sent to listeners until the caller
commits.  PostgreSQL folds identical (channel, payload) pairs sent in one
transaction into a single notification; make payloads unique (a sequence
number, an id) when every one must arrive.

Neither creates server-side prepared statements (psycopg prepares a query
after a few executions by default), so both work through a transaction-mode
connection pooler such as PgBouncer, where the next statement may run in
another server session.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from ._names import check_channel, check_payload

__all__ = ["notify", "notify_many"]


def _encoding(conn: psycopg.Connection[Any]) -> str:
    try:
        return conn.info.encoding
    except Exception:  # pragma: no cover - closed connection: psycopg raises later
        return "utf-8"


def notify(conn: psycopg.Connection[Any], channel: str, payload: str = "") -> None:
    """Send one notification with ``pg_notify(channel, payload)`` through ``conn``.

    :raises TypeError: channel or payload is not a ``str``.
    :raises ValueError: bad channel name, or payload of 8000 bytes or more.
    """
    check_channel(channel)
    check_payload(payload, _encoding(conn))
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload), prepare=False)


def notify_many(
    conn: psycopg.Connection[Any], channel: str, payloads: Iterable[str]
) -> int:
    """Send many notifications on one channel in a single round trip.

    Every payload is checked before anything is sent.  Order is kept.

    :param payloads: any iterable of ``str``.
    :returns: the number of notifications sent.
    :raises TypeError: channel or a payload is not a ``str``.
    :raises ValueError: bad channel name, or a payload of 8000 bytes or more.
    """
    check_channel(channel)
    items = list(payloads)
    enc = _encoding(conn)
    for p in items:
        check_payload(p, enc)
    if not items:
        return 0
    # unnest() yields in array order and the aggregate consumes rows in
    # scan order, so the notifications are queued in the given order.
    cur = conn.execute(
        "SELECT count(pg_notify(%s, p)) FROM unnest(%s::text[]) AS p",
        (channel, items),
        prepare=False,
    )
    row = cur.fetchone()
    return int(row[0]) if row else 0
