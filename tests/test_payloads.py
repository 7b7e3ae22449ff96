"""Payloads: contents, sizes, volume and bytes that are not UTF-8.

Round trips of payloads up to the server's 7,999-byte limit (quotes,
unicode, multi-byte characters), 100,000 notifications committed in one
transaction, and invalid bytes from a SQL_ASCII database (decoded with
U+FFFD, the connection survives) whatever client encoding is asked for.

Passes under both read paths (``PGLISTEN_FAST_IMPL=python`` runs the Python one).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, collect, listen_ready, temp_database

Conn = psycopg.Connection[TupleRow]


# ---------------------------------------------------------------------------
# payload round trips
# ---------------------------------------------------------------------------


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
# invalid bytes in payloads
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sql_ascii_dsn(pg_server: Any) -> Iterator[str]:
    """A database in SQL_ASCII, where a payload may hold any byte but NUL.

    The server sends such bytes unchecked to SQL_ASCII clients, validates
    them for other clients (LATIN1 accepts every byte; UTF-8 does not).
    """
    with temp_database(pg_server, "SQL_ASCII") as dsn:
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
