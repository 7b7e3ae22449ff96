"""``listen(..., payload_type=bytes)``: payloads undecoded, as sent.

For binary protocols and SQL_ASCII databases.  The choice is made in C on
the consumer's hot path: the same ring, no re-encoding in Python.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, listen_ready

Conn = psycopg.Connection[Any]


def test_bytes_payloads_arrive_undecoded(dsn: str, conn: Conn) -> None:
    with pgl.Listener(dsn) as listener:
        raw = listen_ready(listener, "raw_ch", payload_type=bytes)
        text = listen_ready(listener, "raw_ch")
        assert raw.payload_type is bytes and text.payload_type is str
        pgl.notify_many(conn, "raw_ch", ["plain", "héllo €", ""])
        got = raw.get_batch(max_items=3, timeout=TIMEOUT)
        assert [n.payload for n in got] == [b"plain", "héllo €".encode(), b""]
        assert all(n.channel == "raw_ch" and n.pid > 0 for n in got)
        assert [n.payload for n in text.get_batch(3, timeout=TIMEOUT)] == [
            "plain", "héllo €", ""]


def test_bytes_markers_carry_empty_bytes(dsn: str) -> None:
    with pgl.Listener(dsn) as listener:
        sub = listener.listen("raw_marker", payload_type=bytes)
        marker = sub.get(timeout=TIMEOUT)
        assert marker.connection_reset and marker.payload == b""


def test_bytes_notifications_pickle_and_compare() -> None:
    import pickle

    n = pgl.Notification("ch", b"\x00\xff", 7)
    assert pickle.loads(pickle.dumps(n)) == n
    assert n != pgl.Notification("ch", "\x00\xff", 7)
    with pytest.raises(TypeError):
        pgl.Notification("ch", 42)  # type: ignore[arg-type]


def test_payload_type_is_checked(dsn: str) -> None:
    with pgl.Listener(dsn) as listener, pytest.raises(TypeError):
        listener.listen("x", payload_type=bytearray)  # type: ignore[arg-type]
