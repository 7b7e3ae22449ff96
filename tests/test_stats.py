"""Statistics: ``Subscription.stats`` and ``Listener.stats``.

Delivered, marker, dropped and buffered counts per subscription (iteration,
``get_batch``), received/markers/connects counts of the listener, one
server notification counted once however many subscriptions get it, and
the stats objects are read-only.

Passes under both read paths (``PGLISTEN_FAST_IMPL=python`` runs the Python one).
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import (
    TIMEOUT,
    collect,
    expect_markers,
    listen_ready,
    payloads,
    wait_until,
)

Conn = psycopg.Connection[TupleRow]


def test_stats(listener: pgl.Listener, conn: Conn) -> None:
    sub = listener.listen("stats_a", "stats_b")
    s0 = sub.stats
    assert isinstance(s0, pgl.SubscriptionStats)
    expect_markers(sub)
    assert sub.stats.delivered == 0
    assert sub.stats.markers == 2

    pgl.notify_many(conn, "stats_a", [str(i) for i in range(10)])
    pgl.notify(conn, "stats_b", "b")
    wait_until(lambda: sub.stats.buffered_bytes > 0)

    for n in sub:            # one item handed out, the rest parked inside
        assert n.payload == "0"
        break
    assert sub.stats.delivered == 1
    assert len(sub.get_batch(max_items=4, timeout=TIMEOUT)) == 4
    assert sub.stats.delivered == 5
    rest = collect(sub, 6)
    assert payloads(rest) == ["5", "6", "7", "8", "9", "b"]

    st = sub.stats
    assert st.delivered == 11
    assert st.markers == 2
    assert st.dropped == 0
    assert st.buffered_bytes == 0

    ls = listener.stats
    assert isinstance(ls, pgl.ListenerStats)
    assert ls.received == 11
    assert ls.markers == 2
    assert ls.dropped == 0
    assert ls.connects == 1
    assert ls.reconnects == 0
    assert ls.last_error is None
    with pytest.raises(AttributeError):
        ls.received = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        st.delivered = 0  # type: ignore[misc]


def test_stats_count_per_subscription(listener: pgl.Listener, conn: Conn) -> None:
    one = listen_ready(listener, "stats_fan")
    two = listen_ready(listener, "stats_fan")
    pgl.notify_many(conn, "stats_fan", ["1", "2", "3"])
    collect(one, 3)
    assert one.stats.delivered == 3
    assert two.stats.delivered == 0
    collect(two, 3)
    assert two.stats.delivered == 3
    # One notification from the server, written into two subscriptions.
    assert listener.stats.received == 3
    assert listener.stats.markers == 2
