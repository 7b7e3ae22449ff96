"""Listen/unlisten racing notifications and the selector thread.

Subscriptions come and go while notifications flow (no reconnect, no
marker out of place, order kept); ``listener.channels`` holds a channel
once its marker is seen; nothing committed after ``unlisten()`` reaches
the closed subscription.

Passes under both read paths (``PGLISTEN_FAST_IMPL=python`` runs the Python one).
"""

from __future__ import annotations

import functools
import threading

import psycopg
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import (
    TIMEOUT,
    Worker,
    collect_until,
    expect_markers_amid_traffic,
    listen_ready,
    settle,
    wait_until,
)

Conn = psycopg.Connection[TupleRow]


# ---------------------------------------------------------------------------
# churn while notifications flow
# ---------------------------------------------------------------------------


def test_listen_unlisten_churn_while_notifications_flow(
    listener: pgl.Listener, dsn: str
) -> None:
    pid = listener.backend_pid
    steady = listen_ready(listener, "churn_shared")
    stop_producer = threading.Event()

    def produce() -> int:
        sent = 0
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            while not stop_producer.is_set() or sent < 200:
                pgl.notify_many(c, "churn_shared",
                                [str(i) for i in range(sent, sent + 20)])
                sent += 20
            pgl.notify(c, "churn_shared", "end")
        return sent

    def churn(k: int) -> None:
        # Every other subscription also has a private channel, so that real
        # LISTEN/UNLISTEN round trips run while notifications flow.
        for i in range(20):
            chans = ("churn_shared", f"churn_{k}") if i % 2 else ("churn_shared",)
            with listener.listen(*chans, buffer_size=1 << 16) as s:
                items = expect_markers_amid_traffic(s)
                items += s.get_batch(timeout=0)
                assert not any(n.connection_reset for n in items)
                assert {n.channel for n in items} <= {"churn_shared"}
                seen = [int(n.payload) for n in items if n.payload != "end"]
                assert seen == sorted(seen)
                assert len(seen) == len(set(seen))

    producer = Worker(produce, name="producer")
    churners = [Worker(functools.partial(churn, k), name=f"churn-{k}")
                for k in range(4)]
    for w in churners:
        w.join(timeout=60)
    stop_producer.set()
    total = producer.join(timeout=60)
    assert isinstance(total, int)

    got = collect_until(steady, "end", timeout=30)
    assert not any(n.connection_reset for n in got)
    assert [int(n.payload) for n in got] == list(range(total))
    assert listener.connected
    assert listener.backend_pid == pid
    assert listener.stats.reconnects == 0
    wait_until(lambda: listener.channels == frozenset({"churn_shared"}))


# ---------------------------------------------------------------------------
# races between the API and the selector thread
# ---------------------------------------------------------------------------


def test_channels_include_channel_once_marker_seen(listener: pgl.Listener) -> None:
    missing: list[int] = []
    for i in range(500):
        sub = listen_ready(listener, f"race_chan_{i}")
        if f"race_chan_{i}" not in listener.channels:
            missing.append(i)
            break
        sub.unlisten()
    assert missing == []


def test_nothing_committed_after_unlisten_is_delivered(
    listener: pgl.Listener, conn: Conn
) -> None:
    keep = listen_ready(listener, "race_late")   # the channel stays LISTENed
    # Keep the selector thread busy with LISTEN/UNLISTEN round trips, as in
    # an application whose subscriptions come and go.
    done = threading.Event()

    def churn() -> None:
        k = 0
        while not done.is_set():
            listener.listen(f"race_churn_{k % 8}", buffer_size=1 << 16).unlisten()
            k += 1

    churner = Worker(churn, name="churn")
    late: list[int] = []
    try:
        for i in range(1500):
            sub = listen_ready(listener, "race_late")
            sub.unlisten()
            pgl.notify(conn, "race_late", str(i))      # committed after unlisten()
            assert keep.get(timeout=TIMEOUT).payload == str(i)
            settle(listener)                           # the removal is processed
            try:
                items = sub.get_batch(timeout=0)
            except pgl.Closed:
                items = []
            late += [int(n.payload) for n in items]
            if late:
                break
    finally:
        done.set()
        churner.join()
    assert late == []
