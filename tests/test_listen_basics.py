"""The life of a listener and its subscriptions, against a real server.

The first item of a subscription (its ``"listen"`` marker), ``get`` /
``get_nowait`` / ``get_batch`` semantics, ``unlisten()`` / ``close()`` and
iteration (ending, breaking out, closing from another thread), the
Subscription and Listener context managers, and ``start()`` / ``stop()``:
idempotence, listening before start, ``start(wait=False)``,
``start_listener()``, what ``stop()`` does to blocked consumers and buffered
items.

Passes under both read paths (``PGLISTEN_FAST_IMPL=python`` runs the Python one).
"""

from __future__ import annotations

import queue
import threading
import time

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import (
    TIMEOUT,
    Barrier,
    Worker,
    expect_marker,
    listen_ready,
    wait_until,
)

Conn = psycopg.Connection[TupleRow]


# ---------------------------------------------------------------------------
# the first item
# ---------------------------------------------------------------------------


def test_first_item_is_listen_marker(listener: pgl.Listener) -> None:
    sub = listener.listen("seed_marker")
    n = sub.get(timeout=TIMEOUT)
    assert n.connection_reset is True
    assert n.reason == "listen"
    assert n.channel == "seed_marker"
    assert n.payload == ""
    assert n.pid == 0
    assert n.dropped == 0
    with pytest.raises(pgl.Empty):
        sub.get(timeout=0.05)


# ---------------------------------------------------------------------------
# get / get_nowait / get_batch
# ---------------------------------------------------------------------------


def test_get_timeout_raises_empty(listener: pgl.Listener) -> None:
    sub = listen_ready(listener, "empty_get")
    with pytest.raises(pgl.Empty) as info:
        sub.get(timeout=0.05)
    assert isinstance(info.value, queue.Empty)
    assert isinstance(info.value, pgl.Error)
    with pytest.raises(queue.Empty):
        sub.get_nowait()
    with pytest.raises(pgl.Empty):
        sub.get(timeout=0)


def test_get_nowait_returns_buffered(listener: pgl.Listener, conn: Conn) -> None:
    sub = listen_ready(listener, "nowait")
    barrier = Barrier(listener, conn)
    pgl.notify_many(conn, "nowait", ["1", "2"])
    pgl.notify(conn, "nowait", "end")
    barrier.sync()
    assert sub.stats.buffered_bytes > 0
    assert [sub.get_nowait().payload for _ in range(3)] == ["1", "2", "end"]
    with pytest.raises(pgl.Empty):
        sub.get_nowait()


def test_get_batch_timeout_and_max_items(listener: pgl.Listener, conn: Conn) -> None:
    sub = listen_ready(listener, "batch")
    assert sub.get_batch(timeout=0.05) == []
    assert sub.get_batch(max_items=5, timeout=0) == []
    with pytest.raises(ValueError):
        sub.get_batch(max_items=0)
    with pytest.raises(ValueError):
        sub.get_batch(max_items=-3)
    with pytest.raises(ValueError):
        sub.get(timeout=-1)

    barrier = Barrier(listener, conn)
    pgl.notify_many(conn, "batch", [str(i) for i in range(10)])
    barrier.sync()
    first = sub.get_batch(max_items=4, timeout=TIMEOUT)
    assert [n.payload for n in first] == ["0", "1", "2", "3"]
    second = sub.get_batch(max_items=1, timeout=TIMEOUT)
    assert [n.payload for n in second] == ["4"]
    rest = sub.get_batch(max_items=100, timeout=TIMEOUT)
    assert [n.payload for n in rest] == ["5", "6", "7", "8", "9"]
    assert sub.get_batch(timeout=0) == []


def test_get_batch_returns_after_first_item(listener: pgl.Listener, conn: Conn) -> None:
    sub = listen_ready(listener, "batch_first")
    waiter = Worker(lambda: sub.get_batch(max_items=1000, timeout=TIMEOUT))
    pgl.notify(conn, "batch_first", "only")
    result = waiter.join()
    assert isinstance(result, list)
    assert [n.payload for n in result] == ["only"]


# ---------------------------------------------------------------------------
# unlisten / close / iteration
# ---------------------------------------------------------------------------


def test_unlisten_is_idempotent_and_keeps_buffered_items(
    listener: pgl.Listener, conn: Conn
) -> None:
    sub = listen_ready(listener, "close_buf")
    barrier = Barrier(listener, conn)
    pgl.notify_many(conn, "close_buf", ["a", "b", "c"])
    barrier.sync()
    assert not sub.closed
    sub.unlisten()
    assert sub.closed
    sub.unlisten()
    sub.close()
    assert sub.get(timeout=TIMEOUT).payload == "a"
    assert [n.payload for n in sub.get_batch(timeout=TIMEOUT)] == ["b", "c"]
    with pytest.raises(pgl.Closed):
        sub.get(timeout=1)
    with pytest.raises(pgl.Closed):
        sub.get()
    with pytest.raises(pgl.Closed):
        sub.get_nowait()
    with pytest.raises(pgl.Closed):
        sub.get_batch()
    wait_until(lambda: "close_buf" not in listener.channels)


def test_iteration_ends_after_close(listener: pgl.Listener, conn: Conn) -> None:
    sub = listen_ready(listener, "iter_end")
    barrier = Barrier(listener, conn)
    pgl.notify_many(conn, "iter_end", ["1", "2", "3"])
    barrier.sync()
    sub.close()
    assert [n.payload for n in sub] == ["1", "2", "3"]
    assert list(sub) == []


def test_iteration_ends_when_closed_from_another_thread(
    listener: pgl.Listener, conn: Conn
) -> None:
    sub = listen_ready(listener, "iter_thread")
    seen: list[str] = []
    first = threading.Event()

    def consume() -> None:
        for n in sub:
            seen.append(n.payload)
            first.set()

    worker = Worker(consume)
    pgl.notify(conn, "iter_thread", "x")
    assert first.wait(TIMEOUT)
    sub.unlisten()
    worker.join()
    assert seen == ["x"]


def test_breaking_out_of_iteration_loses_nothing(
    listener: pgl.Listener, conn: Conn
) -> None:
    sub = listen_ready(listener, "iter_break")
    barrier = Barrier(listener, conn)
    sent = [str(i) for i in range(10)]
    pgl.notify_many(conn, "iter_break", sent)
    barrier.sync()
    first: list[str] = []
    for n in sub:
        first.append(n.payload)
        if len(first) == 3:
            break
    assert first == sent[:3]
    rest: list[str] = []
    for n in sub:
        rest.append(n.payload)
        if len(rest) == 7:
            break
    assert rest == sent[3:]
    # Items parked by the first iterator are also seen by get().
    pgl.notify_many(conn, "iter_break", ["x", "y"])
    barrier.sync()
    it = iter(sub)
    assert next(it).payload == "x"
    assert sub.get(timeout=TIMEOUT).payload == "y"


def test_subscription_context_manager(listener: pgl.Listener, conn: Conn) -> None:
    with listener.listen("ctx_sub") as sub:
        assert not sub.closed
        expect_marker(sub, "ctx_sub")
        pgl.notify(conn, "ctx_sub", "inside")
        assert sub.get(timeout=TIMEOUT).payload == "inside"
    assert sub.closed
    with pytest.raises(pgl.Closed):
        sub.get(timeout=1)
    wait_until(lambda: "ctx_sub" not in listener.channels)


def test_listener_context_manager(dsn: str, conn: Conn) -> None:
    with pgl.Listener(dsn) as lst:
        assert lst.running
        assert lst.connected
        sub = listen_ready(lst, "ctx_listener")
        pgl.notify(conn, "ctx_listener", "inside")
        assert sub.get(timeout=TIMEOUT).payload == "inside"
    assert not lst.running
    assert not lst.connected
    assert lst.backend_pid is None
    assert sub.closed
    with pytest.raises(pgl.Closed):
        sub.get(timeout=1)


# ---------------------------------------------------------------------------
# start / stop
# ---------------------------------------------------------------------------


def test_stop_is_idempotent_and_closes_subscriptions(dsn: str, conn: Conn) -> None:
    lst = pgl.Listener(dsn).start()
    pid = lst.backend_pid
    assert lst.connected
    assert pid is not None
    sub_a = listen_ready(lst, "stop_a")
    sub_b = listen_ready(lst, "stop_b")
    barrier = Barrier(lst, conn)
    pgl.notify(conn, "stop_b", "buffered")
    barrier.sync()

    blocked = Worker(sub_a.get, name="blocked-consumer")
    started = time.monotonic()
    lst.stop()
    assert time.monotonic() - started < 3.0, "stop() took more than 3 s"
    with pytest.raises(pgl.Closed):
        blocked.join(timeout=3)

    assert not lst.connected
    assert lst.backend_pid is None
    assert lst.channels == frozenset()
    assert not lst.running
    assert sub_a.closed
    assert sub_b.closed
    # What was buffered before the stop is still handed out.
    assert sub_b.get(timeout=1).payload == "buffered"
    with pytest.raises(pgl.Closed):
        sub_b.get(timeout=1)

    lst.stop()
    lst.stop(timeout=0)
    assert not lst.connected
    assert lst.backend_pid is None
    # The backend is gone (the connection was closed).
    wait_until(lambda: conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone() == (0,), message="listener backend still alive after stop()")


def test_stop_before_start(dsn: str) -> None:
    lst = pgl.Listener(dsn)
    sub = lst.listen("never_started")
    lst.stop()
    assert sub.closed
    with pytest.raises(pgl.Closed):
        sub.get(timeout=1)
    with pytest.raises(pgl.Closed):
        lst.listen("again")


def test_listen_after_stop_raises_closed(dsn: str) -> None:
    lst = pgl.Listener(dsn).start()
    lst.stop()
    with pytest.raises(pgl.Closed):
        lst.listen("after_stop")
    with pytest.raises(pgl.Closed):
        lst.start()


def test_start_listener(dsn: str, conn: Conn) -> None:
    lst = pgl.start_listener(dsn)
    try:
        assert isinstance(lst, pgl.Listener)
        assert lst.running
        assert lst.connected
        sub = listen_ready(lst, "start_listener")
        pgl.notify(conn, "start_listener", "ok")
        assert sub.get(timeout=TIMEOUT).payload == "ok"
    finally:
        lst.stop()


def test_start_is_idempotent(dsn: str) -> None:
    lst = pgl.Listener(dsn)
    try:
        assert lst.start() is lst
        pid = lst.backend_pid
        assert lst.start() is lst
        assert lst.backend_pid == pid
        assert lst.stats.connects == 1
    finally:
        lst.stop()


def test_listen_before_start(dsn: str, conn: Conn) -> None:
    lst = pgl.Listener(dsn)
    try:
        sub = lst.listen("before_start")
        assert not lst.connected
        assert lst.channels == frozenset()
        with pytest.raises(pgl.Empty):
            sub.get(timeout=0.05)
        lst.start()
        expect_marker(sub, "before_start")
        wait_until(lambda: lst.channels == frozenset({"before_start"}))
        pgl.notify(conn, "before_start", "after")
        assert sub.get(timeout=TIMEOUT).payload == "after"
    finally:
        lst.stop()


def test_start_without_wait(dsn: str, conn: Conn) -> None:
    lst = pgl.Listener(dsn)
    try:
        sub = lst.listen("no_wait")
        lst.start(wait=False)
        expect_marker(sub, "no_wait")
        assert lst.connected
        pgl.notify(conn, "no_wait", "x")
        assert sub.get(timeout=TIMEOUT).payload == "x"
    finally:
        lst.stop()
