"""The Listener / Subscription API against a real PostgreSQL server.

Covers the pgxlisten seed's cases (listen markers, notification fields,
payload and channel-name round trips, several channels and several
subscriptions, shared channels with one LISTEN, no reconnect on
listen/unlisten), a 100,000-notification transaction, input validation,
``get``/``get_batch``/iteration semantics, closing and stopping, connection
sources (conninfo, ``connect=``, ``pool=``), concurrency (listen/unlisten
churn while notifications flow, several consumers on one subscription),
handler subscriptions, statistics, the ``Notification`` type, invalid bytes
in payloads, and the choice of read path (``PGLISTEN_FAST_IMPL``).

The file passes under both read paths: run it with
``PGLISTEN_FAST_IMPL=python`` to exercise the Python one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import (
    TIMEOUT,
    Barrier,
    Worker,
    collect,
    collect_until,
    expect_marker,
    expect_markers,
    expect_markers_amid_traffic,
    listen_ready,
    payloads,
    settle,
    wait_until,
)

Conn = psycopg.Connection[TupleRow]


@pytest.fixture
def listener(dsn: str) -> Iterator[pgl.Listener]:
    """A started listener, stopped after the test."""
    lst = pgl.Listener(dsn)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop(timeout=5)


def _closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------------------
# the seed's cases
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


def test_notification_fields(listener: pgl.Listener, conn: Conn) -> None:
    sub = listen_ready(listener, "seed_fields")
    pgl.notify(conn, "seed_fields", "hello")
    n = sub.get(timeout=TIMEOUT)
    assert n.connection_reset is False
    assert n.reason is None
    assert n.dropped == 0
    assert n.channel == "seed_fields"
    assert n.payload == "hello"
    assert n.pid == conn.info.backend_pid
    assert n.pid != listener.backend_pid


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "plain",
        "it's \"quoted\"\n\twith\\backslash",
        "h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c\u8a9e \U0001f389",
        "x" * 7999,
        "\u00e9" * 3999 + "a",          # 7,999 bytes of UTF-8, 4,000 characters
        "\U0001f389" * 1999 + "abc",    # 7,999 bytes with 4-byte characters
    ],
    ids=["empty", "plain", "quotes", "unicode", "7999-ascii", "7999-2byte",
         "7999-4byte"],
)
def test_payload_round_trip(listener: pgl.Listener, conn: Conn, payload: str) -> None:
    assert len(payload.encode()) <= 7999
    sub = listen_ready(listener, "seed_payload")
    pgl.notify(conn, "seed_payload", payload)
    n = sub.get(timeout=TIMEOUT)
    assert not n.connection_reset
    assert n.payload == payload
    assert n.channel == "seed_payload"


def test_two_channels_in_one_subscription(listener: pgl.Listener, conn: Conn) -> None:
    sub = listener.listen("seed_a", "seed_b")
    assert sub.channels == ("seed_a", "seed_b")
    markers = expect_markers(sub)
    assert {m.channel for m in markers} == {"seed_a", "seed_b"}
    pgl.notify(conn, "seed_a", "1")
    pgl.notify(conn, "seed_b", "2")
    pgl.notify(conn, "seed_a", "3")
    got = [(n.channel, n.payload) for n in collect(sub, 3)]
    assert got == [("seed_a", "1"), ("seed_b", "2"), ("seed_a", "3")]


def test_two_subscriptions_on_one_channel(listener: pgl.Listener, conn: Conn) -> None:
    sub1 = listen_ready(listener, "seed_fan")
    sub2 = listen_ready(listener, "seed_fan")
    sent = [f"m{i}" for i in range(50)]
    pgl.notify_many(conn, "seed_fan", sent)
    assert payloads(collect(sub1, 50)) == sent
    assert payloads(collect(sub2, 50)) == sent


def test_shared_channel_listened_once(listener: pgl.Listener, conn: Conn) -> None:
    subs = [listen_ready(listener, "seed_shared") for _ in range(3)]
    # The later subscriptions joined a channel already LISTENed: their first
    # marker is still "listen" (checked by listen_ready).
    wait_until(lambda: listener.channels == frozenset({"seed_shared"}))

    subs[0].unlisten()
    settle(listener)
    pgl.notify(conn, "seed_shared", "after-first")
    for s in subs[1:]:
        assert s.get(timeout=TIMEOUT).payload == "after-first"
    assert "seed_shared" in listener.channels

    subs[1].unlisten()
    settle(listener)
    pgl.notify(conn, "seed_shared", "after-second")
    assert subs[2].get(timeout=TIMEOUT).payload == "after-second"
    assert "seed_shared" in listener.channels

    # The first subscription got nothing after it left.
    with pytest.raises(pgl.Closed):
        subs[0].get(timeout=0.05)
    # The second one drained what it had before closing.
    with pytest.raises(pgl.Closed):
        subs[1].get(timeout=0)

    subs[2].unlisten()
    wait_until(lambda: "seed_shared" not in listener.channels,
               message="UNLISTEN after the last subscription left")
    assert listener.channels == frozenset()


def test_listen_unlisten_keeps_the_connection(listener: pgl.Listener) -> None:
    pid = listener.backend_pid
    assert pid is not None
    for i in range(5):
        sub = listen_ready(listener, f"seed_keep_{i}", "seed_keep")
        sub.unlisten()
    wait_until(lambda: listener.channels == frozenset())
    another = listen_ready(listener, "seed_keep")
    assert listener.backend_pid == pid
    assert listener.connected
    stats = listener.stats
    assert stats.connects == 1
    assert stats.reconnects == 0
    another.unlisten()


# ---------------------------------------------------------------------------
# volume
# ---------------------------------------------------------------------------


def test_100k_in_one_transaction(listener: pgl.Listener, conn: Conn) -> None:
    total = 100_000
    sub = listen_ready(listener, "bulk")
    with conn.transaction():
        sent = pgl.notify_many(conn, "bulk", (str(i) for i in range(total)))
    assert sent == total
    got: list[str] = []
    while len(got) < total:
        batch = sub.get_batch(max_items=10_000, timeout=TIMEOUT)
        assert batch, f"stalled after {len(got)} notifications"
        assert not any(n.connection_reset for n in batch)
        got += [n.payload for n in batch]
    assert got == [str(i) for i in range(total)]
    assert sub.stats.delivered == total
    assert sub.stats.dropped == 0
    assert sub.get_batch(timeout=0) == []


# ---------------------------------------------------------------------------
# channel names and input validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "it's",
        'say "hi"',
        "with space",
        " padded ",
        "MixedCase",
        "semi;colon--",
        "\u00fcn\u00efc\u00f6d\u00e9 \u2713",
        "a" * 63,
        "\u00e9" * 31 + "a",        # 63 bytes, 32 characters
        "\u65e5" * 21,              # 63 bytes of 3-byte characters
        "\U0001f389" * 15 + "abc",  # 63 bytes with 4-byte characters
    ],
    ids=["quote", "dquote", "space", "padded", "mixed-case", "sql-ish", "unicode",
         "63-ascii", "63-2byte", "63-3byte", "63-4byte"],
)
def test_channel_name_round_trip(listener: pgl.Listener, conn: Conn, name: str) -> None:
    assert len(name.encode()) <= 63
    sub = listener.listen(name)
    expect_marker(sub, name)
    # (listener.channels is updated just after the marker is queued)
    wait_until(lambda: listener.channels == frozenset({name}))
    pgl.notify(conn, name, "via notify")
    conn.execute("SELECT pg_notify(%s, %s)", (name, "via pg_notify"))
    conn.execute(sql.SQL("NOTIFY {}, 'via NOTIFY'").format(sql.Identifier(name)))
    got = collect(sub, 3)
    assert [(n.channel, n.payload) for n in got] == [
        (name, "via notify"), (name, "via pg_notify"), (name, "via NOTIFY")]


def test_channel_names_are_case_sensitive(listener: pgl.Listener, conn: Conn) -> None:
    upper = listen_ready(listener, "Orders")
    lower = listen_ready(listener, "orders")
    wait_until(lambda: listener.channels == frozenset({"Orders", "orders"}))
    pgl.notify(conn, "Orders", "to-upper")
    pgl.notify(conn, "orders", "to-lower")
    conn.execute("NOTIFY Orders, 'unquoted'")  # folded to lower case by SQL
    pgl.notify(conn, "orders", "end")
    pgl.notify(conn, "Orders", "end")
    assert payloads(collect_until(upper, "end")) == ["to-upper"]
    assert payloads(collect_until(lower, "end")) == ["to-lower", "unquoted"]


@pytest.mark.parametrize(
    ("name", "exc"),
    [
        ("", ValueError),
        ("a" * 64, ValueError),
        ("\u00e9" * 32, ValueError),          # 32 characters but 64 bytes
        ("\u65e5" * 21 + "a", ValueError),    # 64 bytes
        ("a\x00b", ValueError),
        ("\x00", ValueError),
        (b"bytes", TypeError),
        (42, TypeError),
        (None, TypeError),
        ("\ud800", ValueError),              # lone surrogate: not encodable
    ],
    ids=["empty", "64-ascii", "64-2byte", "64-3byte", "nul-inside", "nul-only",
         "bytes", "int", "none", "surrogate"],
)
def test_listen_refuses_bad_names(
    listener: pgl.Listener, name: Any, exc: type[Exception]
) -> None:
    with pytest.raises(exc):
        listener.listen(name)
    # Also when the bad name is not the first one.
    with pytest.raises(exc):
        listener.listen("good_name", name)
    assert listener.channels == frozenset()


def test_listen_refuses_bad_arguments(listener: pgl.Listener) -> None:
    with pytest.raises(ValueError):
        listener.listen()
    with pytest.raises(ValueError):
        listener.listen("ch", overflow="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        listener.listen("ch", overflow="DROP")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        listener.listen("ch", buffer_size=0)
    with pytest.raises(ValueError):
        listener.listen("ch", buffer_size=-1)
    with pytest.raises(ValueError):
        listener.listen("ch", buffer_size=1 << 60)
    with pytest.raises(TypeError):
        listener.listen("ch", buffer_size="big")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        listener.listen("ch", buffer_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        listener.listen("ch", handler=42)  # type: ignore[arg-type]
    assert listener.channels == frozenset()


def test_listener_refuses_bad_arguments(dsn: str) -> None:
    with pytest.raises(ValueError):
        pgl.Listener(dsn, overflow="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pgl.Listener(dsn, buffer_size=0)
    with pytest.raises(TypeError):
        pgl.Listener(dsn, buffer_size="1M")  # type: ignore[arg-type]


def test_buffer_size_is_rounded_up(listener: pgl.Listener) -> None:
    assert listener.listen("size_a", buffer_size=1).buffer_size == 64 * 1024
    size_b = listener.listen("size_b", buffer_size=64 * 1024 + 1).buffer_size
    assert size_b == 128 * 1024
    assert listener.listen("size_c", buffer_size=1 << 20).buffer_size == 1 << 20


def test_listen_after_stop_raises_closed(dsn: str) -> None:
    lst = pgl.Listener(dsn).start()
    lst.stop()
    with pytest.raises(pgl.Closed):
        lst.listen("after_stop")
    with pytest.raises(pgl.Closed):
        lst.start()


def test_repeated_channel_counts_once(listener: pgl.Listener, conn: Conn) -> None:
    sub = listener.listen("rep_a", "rep_b", "rep_a", "rep_b", "rep_a")
    assert sub.channels == ("rep_a", "rep_b")
    expect_markers(sub)
    pgl.notify(conn, "rep_a", "once")
    pgl.notify(conn, "rep_b", "end")
    assert [(n.channel, n.payload) for n in collect(sub, 2)] == [
        ("rep_a", "once"), ("rep_b", "end")]
    assert sub.get_batch(timeout=0.05) == []


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
# start / stop / connection sources
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


def test_start_bad_dsn_raises_connect_error(pg_server: Any) -> None:
    bad = f"host=127.0.0.1 port={_closed_port()} user=postgres dbname=postgres " \
          "connect_timeout=2"
    lst = pgl.Listener(bad, reconnect_delay=0.05)
    sub = lst.listen("bad_dsn")
    with pytest.raises(pgl.ConnectError) as info:
        lst.start(wait=True)
    assert info.value.__cause__ is not None
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert isinstance(info.value, pgl.Error)
    assert not lst.running
    assert not lst.connected
    assert lst.backend_pid is None
    assert sub.closed
    with pytest.raises(pgl.Closed):
        sub.get(timeout=1)
    with pytest.raises(pgl.Closed):
        lst.listen("bad_dsn_2")
    lst.stop()
    assert lst.stats.connects == 0
    assert lst.stats.last_error is not None


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


def test_connection_sources_are_mutually_exclusive(dsn: str) -> None:
    from psycopg_pool import ConnectionPool

    def connect() -> Conn:
        raise AssertionError("never called")

    pool: ConnectionPool[Conn] = ConnectionPool(dsn, min_size=1, max_size=1, open=False)
    with pytest.raises(TypeError):
        pgl.Listener(dsn, connect=connect)
    with pytest.raises(TypeError):
        pgl.Listener(dsn, pool=pool)
    with pytest.raises(TypeError):
        pgl.Listener(pool=pool, connect=connect)
    with pytest.raises(TypeError):
        pgl.Listener(dsn, pool=pool, connect=connect)
    with pytest.raises(TypeError):
        pgl.Listener(connect=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pgl.Listener(pool=object())


def test_connect_callable(dsn: str, conn: Conn) -> None:
    calls: list[str] = []
    app = f"pglf-custom-{uuid.uuid4().hex[:8]}"

    def connect() -> Conn:
        calls.append(threading.current_thread().name)
        c: Conn = psycopg.connect(dsn, application_name=app, connect_timeout=10)
        return c

    lst = pgl.Listener(connect=connect).start()
    try:
        assert len(calls) == 1
        sub = listen_ready(lst, "custom_connect")
        pgl.notify(conn, "custom_connect", "hooked")
        assert sub.get(timeout=TIMEOUT).payload == "hooked"
        row = conn.execute("SELECT application_name FROM pg_stat_activity "
                           "WHERE pid = %s", (lst.backend_pid,)).fetchone()
        assert row == (app,)
    finally:
        lst.stop()
    assert len(calls) == 1


def test_pool_source(dsn: str, conn: Conn) -> None:
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Conn] = ConnectionPool(
        dsn, min_size=1, max_size=2, open=True, timeout=TIMEOUT
    )
    try:
        lst = pgl.Listener(pool=pool).start()
        try:
            sub = listen_ready(lst, "pooled")
            pgl.notify(conn, "pooled", "from-pool")
            assert sub.get(timeout=TIMEOUT).payload == "from-pool"
            assert lst.stats.connects == 1
        finally:
            lst.stop()
        # The listener's connection went back: both slots are usable again.
        with pool.connection() as c1, pool.connection() as c2:
            assert c1.execute("SELECT 1").fetchone() == (1,)
            assert c2.execute("SELECT 2").fetchone() == (2,)
            # Not the listening session: it LISTENs to nothing.
            for c in (c1, c2):
                assert c.execute("SELECT pg_listening_channels()").fetchall() == []
    finally:
        pool.close()


# ---------------------------------------------------------------------------
# concurrency
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


def test_several_consumers_share_one_subscription(
    listener: pgl.Listener, conn: Conn
) -> None:
    total = 20_000
    sub = listener.listen("consumers")
    lock = threading.Lock()
    per_consumer: list[list[pgl.Notification]] = [[] for _ in range(4)]

    def keep(k: int, items: list[pgl.Notification]) -> None:
        with lock:
            per_consumer[k].extend(items)

    def by_batch(k: int) -> None:
        while True:
            try:
                batch = sub.get_batch(max_items=64, timeout=0.5)
            except pgl.Closed:
                return
            keep(k, batch)

    def by_get(k: int) -> None:
        while True:
            try:
                n = sub.get(timeout=0.5)
            except pgl.Empty:
                continue
            except pgl.Closed:
                return
            keep(k, [n])

    def by_iter(k: int) -> None:
        for n in sub:
            keep(k, [n])

    workers = [
        Worker(lambda: by_batch(0)), Worker(lambda: by_batch(1)),
        Worker(lambda: by_get(2)), Worker(lambda: by_iter(3)),
    ]

    def count() -> int:
        with lock:
            return sum(len(x) for x in per_consumer)

    wait_until(lambda: count() >= 1, message="the listen marker")
    pgl.notify_many(conn, "consumers", [str(i) for i in range(total)])
    wait_until(lambda: count() >= total + 1, timeout=60,
               message="every notification consumed")
    sub.unlisten()
    for w in workers:
        w.join()

    everything = [n for items in per_consumer for n in items]
    markers = [n for n in everything if n.connection_reset]
    assert len(markers) == 1
    assert markers[0].reason == "listen"
    got = [int(n.payload) for n in everything if not n.connection_reset]
    assert len(got) == total                       # no duplicates...
    assert set(got) == set(range(total))           # ...and nothing lost
    # Order is only promised to a single consumer: an iterator parks the rest
    # of its batch after another consumer may have taken newer items, so
    # per-consumer order is not checked here.
    assert sub.stats.delivered == total


# ---------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------


def test_handler_subscription(
    listener: pgl.Listener, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pglisten_fast")
    calls: list[tuple[pgl.Notification, threading.Thread]] = []
    seen_end = threading.Event()

    def handler(n: pgl.Notification) -> None:
        calls.append((n, threading.current_thread()))
        if n.payload == "boom":
            raise RuntimeError("handler failure on purpose")
        if n.payload == "end":
            seen_end.set()

    sub = listener.listen("handled", handler=handler)
    wait_until(lambda: len(calls) >= 1, message="handler called for the marker")
    marker = calls[0][0]
    assert marker.connection_reset
    assert marker.reason == "listen"

    pgl.notify_many(conn, "handled", ["1", "boom", "2", "end"])
    assert seen_end.wait(TIMEOUT)
    assert [n.payload for n, _ in calls[1:]] == ["1", "boom", "2", "end"]
    worker = calls[0][1]
    assert worker is not threading.main_thread()
    assert worker is not threading.current_thread()
    assert all(t is worker for _, t in calls)

    failures = [r for r in caplog.records if r.exc_info is not None
                and isinstance(r.exc_info[1], RuntimeError)]
    assert len(failures) == 1
    assert failures[0].name == "pglisten_fast"
    assert failures[0].levelno == logging.ERROR
    assert "handler failure on purpose" in str(failures[0].exc_info[1])  # type: ignore[index]

    assert worker.is_alive()
    sub.unlisten()
    worker.join(TIMEOUT)
    assert not worker.is_alive(), "the handler thread did not end after unlisten()"

    # Nothing more reaches the handler: a witness subscription sees it instead.
    witness = listen_ready(listener, "handled")
    before = len(calls)
    pgl.notify(conn, "handled", "after-unlisten")
    assert witness.get(timeout=TIMEOUT).payload == "after-unlisten"
    assert len(calls) == before


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# the Notification type
# ---------------------------------------------------------------------------


def test_notification_is_immutable(listener: pgl.Listener, conn: Conn) -> None:
    sub = listen_ready(listener, "immutable")
    pgl.notify(conn, "immutable", "p")
    n = sub.get(timeout=TIMEOUT)
    for attr, value in [("channel", "x"), ("payload", "x"), ("pid", 1),
                        ("connection_reset", True), ("reason", "listen"),
                        ("dropped", 5)]:
        with pytest.raises(AttributeError):
            setattr(n, attr, value)
    with pytest.raises((AttributeError, TypeError)):
        n.extra = 1  # type: ignore[attr-defined]
    with pytest.raises((AttributeError, TypeError)):
        del n.payload
    assert n.payload == "p"


def test_notification_repr_eq_hash_pickle(listener: pgl.Listener, conn: Conn) -> None:
    sub = listener.listen("obj")
    marker = sub.get(timeout=TIMEOUT)
    pgl.notify(conn, "obj", "payload 'q'")
    n = sub.get(timeout=TIMEOUT)

    assert repr(n) == (
        f"Notification(channel='obj', payload=\"payload 'q'\", pid={n.pid})")
    assert repr(marker) == (
        "Notification(channel='obj', connection_reset=True, reason='listen')")
    # The repr is also valid constructor syntax.
    for item in (n, marker):
        assert eval(repr(item), {"Notification": pgl.Notification}) == item

    same = pgl.Notification("obj", "payload 'q'", n.pid)
    assert same == n
    assert hash(same) == hash(n)
    assert n != pgl.Notification("obj", "other", n.pid)
    assert n != pgl.Notification("other", "payload 'q'", n.pid)
    assert n != pgl.Notification("obj", "payload 'q'", n.pid + 1)
    assert marker == pgl.Notification("obj", "", 0, True, reason="listen")
    assert marker != n
    assert len({n, same, marker}) == 2
    assert n != ("obj", "payload 'q'", n.pid)

    for item in (n, marker, pgl.Notification("c", "", 0, True, reason="overflow",
                                             dropped=7)):
        clone = pickle.loads(pickle.dumps(item))
        assert clone == item
        assert type(clone) is pgl.Notification
        assert (clone.channel, clone.payload, clone.pid, clone.connection_reset,
                clone.reason, clone.dropped) == (
            item.channel, item.payload, item.pid, item.connection_reset,
            item.reason, item.dropped)


# ---------------------------------------------------------------------------
# invalid bytes in payloads
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _temp_database(pg_server: Any, encoding: str) -> Iterator[str]:
    """A database in ``encoding`` (C locale) for one module; dropped after."""
    name = f"pglf_{encoding.lower()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn, autocommit=True, connect_timeout=10) as c:
        c.execute(sql.SQL(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING {} "
            "LC_COLLATE 'C' LC_CTYPE 'C'").format(
                sql.Identifier(name), sql.Literal(encoding)))
    try:
        yield make_conninfo(pg_server.dsn, dbname=name)
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True, connect_timeout=10) as c:
            c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                sql.Identifier(name)))


@pytest.fixture(scope="module")
def sql_ascii_dsn(pg_server: Any) -> Iterator[str]:
    """A database in SQL_ASCII, where a payload may hold any byte but NUL.

    The server sends such bytes unchecked to SQL_ASCII clients, validates
    them for other clients (LATIN1 accepts every byte; UTF-8 does not).
    """
    with _temp_database(pg_server, "SQL_ASCII") as dsn:
        yield dsn


_BAD_BYTES_SQL = ("SELECT pg_notify('bytes', "
                  "convert_from('\\x41ff4280c3'::bytea, 'SQL_ASCII'))")


@pytest.mark.parametrize("client_encoding", ["SQL_ASCII", "LATIN1", "UTF8"])
def test_invalid_bytes_in_payload(sql_ascii_dsn: str, client_encoding: str) -> None:
    """Bytes that are not UTF-8 become U+FFFD; the connection survives.

    Whatever client encoding the conninfo asks for, the listener reads a
    SQL_ASCII database's bytes unconverted (a UTF-8 session would be ended by
    the server with FATAL "invalid byte sequence") and decodes them as UTF-8
    with replacement.
    """
    lst = pgl.Listener(make_conninfo(sql_ascii_dsn, client_encoding=client_encoding))
    lst.start()
    try:
        pid = lst.backend_pid
        sub = listen_ready(lst, "bytes")
        with psycopg.connect(sql_ascii_dsn, autocommit=True, connect_timeout=10) as c:
            # 0xff, a lone continuation byte and a truncated sequence: not
            # ASCII and not UTF-8.
            c.execute(_BAD_BYTES_SQL)
            c.execute("SELECT pg_notify('bytes', 'still alive')")
            c.execute("SELECT pg_notify('bytes', "
                      "convert_from('\\x636166c3a9'::bytea, 'SQL_ASCII'))")
        bad, good, utf8 = collect(sub, 3)
        assert not bad.connection_reset
        assert bad.channel == "bytes"
        assert bad.payload == "A\ufffdB\ufffd\ufffd"
        assert good.payload == "still alive"
        assert utf8.payload == "caf\u00e9"  # UTF-8 bytes stored as they are
        assert lst.connected
        assert lst.backend_pid == pid
        assert lst.stats.reconnects == 0
    finally:
        lst.stop()


def test_channel_not_representable_in_client_encoding(dsn: str, conn: Conn) -> None:
    lst = pgl.Listener(make_conninfo(dsn, client_encoding="LATIN1")).start()
    try:
        sub = lst.listen("\u65e5\u672c")   # no LATIN1 form
        barrier = Barrier(lst, conn)       # LISTENed after the channel above
        pgl.notify(conn, "??", "wrong channel")
        barrier.sync()
        try:
            items = sub.get_batch(timeout=0)
        except pgl.Closed:
            items = []
        assert "??" not in lst.channels
        assert [n.payload for n in items if not n.connection_reset] == []
    finally:
        lst.stop()


# ---------------------------------------------------------------------------
# read path selection
# ---------------------------------------------------------------------------

_ROUND_TRIP = r"""
import os, psycopg, pglisten_fast as pgl
assert pgl.__impl__ == "python", pgl.__impl__
dsn = os.environ["PGLF_TEST_DSN"]
with pgl.Listener(dsn) as lst, psycopg.connect(dsn, autocommit=True) as c:
    sub = lst.listen("impl_python")
    m = sub.get(timeout=10)
    assert m.connection_reset and m.reason == "listen", m
    pgl.notify_many(c, "impl_python", [str(i) for i in range(1000)])
    got = []
    while len(got) < 1000:
        got += [n.payload for n in sub.get_batch(timeout=10)]
    assert got == [str(i) for i in range(1000)], got[:5]
print("impl", pgl.__impl__, "ok")
"""


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
        timeout=60, check=False, cwd=os.path.dirname(os.path.dirname(__file__)),
    )


def test_forced_python_read_path(dsn: str) -> None:
    proc = _run_python(_ROUND_TRIP, PGLISTEN_FAST_IMPL="python", PGLF_TEST_DSN=dsn)
    assert proc.returncode == 0, proc.stderr
    assert "impl python ok" in proc.stdout


def test_bogus_read_path_fails_import() -> None:
    proc = _run_python(
        "import pglisten_fast\n", PGLISTEN_FAST_IMPL="bogus"
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "PGLISTEN_FAST_IMPL" in proc.stderr
    assert "bogus" in proc.stderr


def test_current_read_path_is_reported() -> None:
    assert pgl.__impl__ in ("c", "python")
    forced = os.environ.get("PGLISTEN_FAST_IMPL", "").strip().lower()
    if forced:
        assert pgl.__impl__ == forced


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


@pytest.fixture(scope="module")
def latin1_dsn(pg_server: Any) -> Iterator[str]:
    """A LATIN1 database: channel names outside LATIN1 cannot be LISTENed."""
    with _temp_database(pg_server, "LATIN1") as dsn:
        yield dsn


def test_refused_listen_closes_only_its_subscription(
    latin1_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refuses one channel: its subscription ends, the rest goes on."""
    caplog.set_level(logging.WARNING, logger="pglisten_fast")
    with pgl.Listener(latin1_dsn, reconnect_delay=0.05) as lst:
        pid = lst.backend_pid
        good = listen_ready(lst, "caf\u00e9")
        # Refused in the same batch as a good channel: retried one by one.
        bad = lst.listen("\u65e5\u672c", "other")
        also_good = lst.listen("fine")
        assert also_good.get(timeout=TIMEOUT).reason == "listen"
        with pytest.raises(pgl.Closed):
            bad.get(timeout=TIMEOUT)
        assert bad.closed
        last_error = lst.stats.last_error
        assert last_error is not None and "\u65e5\u672c" in last_error
        with psycopg.connect(latin1_dsn, autocommit=True, connect_timeout=10) as c:
            pgl.notify(c, "caf\u00e9", "still here")
            pgl.notify(c, "fine", "too")
        assert good.get(timeout=TIMEOUT).payload == "still here"
        assert also_good.get(timeout=TIMEOUT).payload == "too"
        assert lst.connected and lst.backend_pid == pid
        assert lst.stats.reconnects == 0
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_pool_with_close_returns(dsn: str) -> None:
    """A pooled listener session is ended, never handed back as it is."""
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Conn] = ConnectionPool(
        dsn, min_size=1, max_size=1, open=True, kwargs={"autocommit": True},
        close_returns=True,
    )
    try:
        lst = pgl.Listener(pool=pool).start()
        listen_ready(lst, "pooled")
        listener_pid = lst.backend_pid
        lst.stop()
        assert lst.stats.last_error is None
        with pool.connection(timeout=10) as c:
            row = c.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None and row[0] != listener_pid
            listening = c.execute("SELECT pg_listening_channels()").fetchall()
            assert listening == []
    finally:
        pool.close()


def test_async_connection_sources_are_refused(dsn: str) -> None:
    from psycopg_pool import AsyncConnectionPool

    async def connect() -> Any:
        return None

    with pytest.raises(TypeError):
        pgl.Listener(connect=connect)
    pool: Any = AsyncConnectionPool(dsn, open=False)
    with pytest.raises(TypeError, match="async"):
        pgl.Listener(pool=pool)
