"""Configuration: argument validation and connection sources.

``Listener(...)`` and ``listen(...)`` refuse bad arguments, buffer sizes
are rounded up; the connection comes from a conninfo, a ``connect=``
callable or a ``pool=`` (mutually exclusive, async ones refused, a pooled
session ended rather than handed back as it is); a first connection that
fails raises ``ConnectError`` from ``start(wait=True)``.

Passes under both read paths (``PGLISTEN_FAST_IMPL=python`` runs the Python one).
"""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, listen_ready

Conn = psycopg.Connection[TupleRow]


def _closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------------------
# argument validation
# ---------------------------------------------------------------------------


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
    for window in (-0.001, 0.2, float("nan")):
        with pytest.raises(ValueError, match="batch_window"):
            pgl.Listener(dsn, batch_window=window)
    for bad in ("1ms", True, None):
        with pytest.raises(TypeError, match="batch_window"):
            pgl.Listener(dsn, batch_window=bad)  # type: ignore[arg-type]
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


# ---------------------------------------------------------------------------
# connection sources
# ---------------------------------------------------------------------------


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


def test_async_connection_sources_are_refused(dsn: str) -> None:
    from psycopg_pool import AsyncConnectionPool

    async def connect() -> Any:
        return None

    with pytest.raises(TypeError):
        pgl.Listener(connect=connect)
    pool: Any = AsyncConnectionPool(dsn, open=False)
    with pytest.raises(TypeError, match="async"):
        pgl.Listener(pool=pool)


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
