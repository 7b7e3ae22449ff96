"""notify / notify_many: round trips, transactions, folding, input checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl


@pytest.fixture
def sub(dsn: str) -> Iterator[pgl.Subscription]:
    with pgl.Listener(dsn) as lst:
        s = lst.listen("pub")
        assert s.get(timeout=10).reason == "listen"
        yield s


def _drain(sub: pgl.Subscription, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        batch = sub.get_batch(timeout=10)
        assert batch, f"only {len(out)} of {n} arrived"
        out += [x.payload for x in batch]
    return out


def test_notify_round_trip(
    sub: pgl.Subscription, conn: psycopg.Connection[Any]
) -> None:
    pgl.notify(conn, "pub", "hello")
    pgl.notify(conn, "pub")
    n = sub.get(timeout=10)
    assert (n.channel, n.payload, n.connection_reset) == ("pub", "hello", False)
    assert sub.get(timeout=10).payload == ""


def test_notify_many_accepts_any_iterable_and_keeps_order(
    sub: pgl.Subscription, conn: psycopg.Connection[Any]
) -> None:
    sent = pgl.notify_many(conn, "pub", (f"m{i}" for i in range(3000)))
    assert sent == 3000
    assert _drain(sub, 3000) == [f"m{i}" for i in range(3000)]
    assert pgl.notify_many(conn, "pub", []) == 0


def test_runs_in_the_callers_transaction(sub: pgl.Subscription, dsn: str) -> None:
    with psycopg.connect(dsn) as c:  # not autocommit
        pgl.notify(c, "pub", "rolled back")
        pgl.notify_many(c, "pub", ["rolled", "back"])
        c.rollback()
        with pytest.raises(pgl.Empty):
            sub.get(timeout=0.3)
        pgl.notify_many(c, "pub", ["a", "b"])
        with pytest.raises(pgl.Empty):
            sub.get(timeout=0.1)  # not committed yet
        c.commit()
    assert _drain(sub, 2) == ["a", "b"]


def test_identical_pairs_are_folded_within_a_transaction(
    sub: pgl.Subscription, conn: psycopg.Connection[Any]
) -> None:
    with conn.transaction():
        pgl.notify_many(conn, "pub", ["same", "same", "other", "same"])
    assert _drain(sub, 2) == ["same", "other"]
    with pytest.raises(pgl.Empty):
        sub.get(timeout=0.2)


def test_payload_size_limit_checked_before_sending(
    sub: pgl.Subscription, conn: psycopg.Connection[Any]
) -> None:
    pgl.notify(conn, "pub", "x" * 7999)
    assert sub.get(timeout=10).payload == "x" * 7999
    with pytest.raises(ValueError, match="7999"):
        pgl.notify(conn, "pub", "x" * 8000)
    with pytest.raises(ValueError):
        # Multi-byte characters count in bytes.
        pgl.notify(conn, "pub", "é" * 4000)
    with pytest.raises(ValueError):
        pgl.notify_many(conn, "pub", ["ok", "y" * 8000])
    # Nothing of the refused batch was sent.
    with pytest.raises(pgl.Empty):
        sub.get(timeout=0.2)


@pytest.mark.parametrize(
    ("channel", "payload", "exc"),
    [
        ("", "p", ValueError),
        ("x" * 64, "p", ValueError),
        ("a\x00b", "p", ValueError),
        (42, "p", TypeError),
        ("pub", b"bytes", TypeError),
        ("pub", "nul\x00", ValueError),
    ],
)
def test_bad_input_is_refused(
    conn: psycopg.Connection[Any], channel: Any, payload: Any, exc: type[Exception]
) -> None:
    with pytest.raises(exc):
        pgl.notify(conn, channel, payload)
    with pytest.raises(exc):
        pgl.notify_many(conn, channel, [payload])


def test_publishing_creates_no_prepared_statements(
    conn: psycopg.Connection[Any],
) -> None:
    # psycopg prepares a query once it ran 5 times; a prepared statement
    # breaks behind a transaction pooler (the next call may land elsewhere).
    for i in range(12):
        pgl.notify(conn, "unprepared", str(i))
        pgl.notify_many(conn, "unprepared", [f"{i}a", f"{i}b"])
    row = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    assert row == (0,)
