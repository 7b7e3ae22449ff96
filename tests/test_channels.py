"""Channels: names, several channels and subscriptions, LISTEN/UNLISTEN.

Several channels in one subscription and a repeated channel counted once;
several subscriptions on one channel (fan-out) sharing one LISTEN that
ends with the last of them; listen/unlisten on the running connection
without reconnecting; channel-name round trips through ``notify``,
``pg_notify`` and ``NOTIFY`` (quotes, spaces, case, unicode, the 63-byte
limit), case sensitivity, names refused before reaching the server, a name
the client encoding cannot represent, and LISTEN refused by the server
(closing only the subscription that asked for it).

Passes under both read paths (``PGLISTEN_FAST_IMPL=python`` runs the Python one).
"""

from __future__ import annotations

import logging
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
    collect,
    collect_until,
    expect_marker,
    expect_markers,
    listen_ready,
    payloads,
    settle,
    temp_database,
    wait_until,
)

Conn = psycopg.Connection[TupleRow]


# ---------------------------------------------------------------------------
# several channels, several subscriptions
# ---------------------------------------------------------------------------


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


def test_repeated_channel_counts_once(listener: pgl.Listener, conn: Conn) -> None:
    sub = listener.listen("rep_a", "rep_b", "rep_a", "rep_b", "rep_a")
    assert sub.channels == ("rep_a", "rep_b")
    expect_markers(sub)
    pgl.notify(conn, "rep_a", "once")
    pgl.notify(conn, "rep_b", "end")
    assert [(n.channel, n.payload) for n in collect(sub, 2)] == [
        ("rep_a", "once"), ("rep_b", "end")]
    assert sub.get_batch(timeout=0.05) == []


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
# channel names
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


# ---------------------------------------------------------------------------
# channel names and encodings
# ---------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def latin1_dsn(pg_server: Any) -> Iterator[str]:
    """A LATIN1 database: channel names outside LATIN1 cannot be LISTENed."""
    with temp_database(pg_server, "LATIN1") as dsn:
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
