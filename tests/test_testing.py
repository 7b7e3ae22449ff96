"""Tests of the test harness: the throwaway cluster, its fixtures and the TCP proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import TupleRow

from pglisten_fast.testing import ClusterError, TempCluster, find_pg_bindir
from tests.fix_db import PgServer
from tests.fix_proxy import Proxy, server_address

Conn = psycopg.Connection[TupleRow]


class _Background:
    """Run a callable in a daemon thread; ``done`` is set when it returns or raises."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # inspected by the test
            self.error = exc
        finally:
            self.done.set()

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"


@pytest.fixture
def proxied_conn(proxy: Proxy) -> Iterator[Conn]:
    """An autocommit connection going through the proxy."""
    connection = psycopg.connect(proxy.dsn, autocommit=True, connect_timeout=10)
    try:
        yield connection
    finally:
        connection.close()


# -- cluster ------------------------------------------------------------------


def test_find_pg_bindir_has_server_binaries() -> None:
    bindir = find_pg_bindir()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert (bindir / name).is_file()


def test_find_pg_bindir_rejects_bad_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGLISTEN_PG_BINDIR", str(tmp_path))
    with pytest.raises(ClusterError, match="PGLISTEN_PG_BINDIR"):
        find_pg_bindir()


def test_cluster_reachable(conn: Conn) -> None:
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert conn.info.server_version >= 150000


def test_terminate_backend_kills_connection(
    conn: Conn, terminate_backend: Callable[[int], bool]
) -> None:
    assert terminate_backend(conn.info.backend_pid)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart(
    mode: str, pg_server: PgServer, conn: Conn, restart_server: Callable[[str], None]
) -> None:
    port_before = conn.info.port
    restart_server(mode)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    with psycopg.connect(pg_server.dsn, autocommit=True, connect_timeout=10) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)
        assert fresh.info.port == port_before


def _postmaster_pid(datadir: Path) -> int:
    return int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])


def test_context_manager_leaves_no_process() -> None:
    with TempCluster() as cluster:
        basedir = cluster.basedir
        datadir = cluster.datadir
        pid = _postmaster_pid(datadir)
        assert cluster.is_running()
        assert Path(f"/proc/{pid}").exists()
        with cluster.connect() as c:
            assert c.execute("SELECT current_setting('data_directory')").fetchone() == (
                str(datadir),
            )
    assert not cluster.is_running()
    assert not basedir.exists()
    # Nothing left: neither the postmaster nor a process started from that data dir.
    assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(datadir).encode() not in cmdline, f"process {proc.name} survived"
    cluster.stop()  # idempotent
    cluster.close()


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_start_failure_reports_server_log() -> None:
    cluster = TempCluster(settings={"shared_buffers": "not-a-size"})
    try:
        with pytest.raises(ClusterError, match="shared_buffers"):
            cluster.start()
        assert not cluster.is_running()
    finally:
        cluster.close()


# -- proxy ----------------------------------------------------------------------


def test_proxy_forwards(proxy: Proxy, proxied_conn: Conn) -> None:
    assert proxied_conn.execute("SELECT 1").fetchone() == (1,)
    assert proxied_conn.info.port == proxy.port
    assert proxy.connection_count == 1
    # Larger payloads in both directions survive the trip.
    payload = "x" * 1_000_000
    row = proxied_conn.execute("SELECT %s::text", (payload,)).fetchone()
    assert row == (payload,)


def test_proxy_blackhole_hangs_query(proxy: Proxy, proxied_conn: Conn) -> None:
    proxy.blackhole()
    query = _Background(lambda: proxied_conn.execute("SELECT 1"))
    assert not query.done.wait(0.5), "query completed through a blackholed proxy"
    proxy.disconnect()  # release the hung query
    query.join()
    assert isinstance(query.error, psycopg.OperationalError)


def test_proxy_restore_accepts_new_connections(
    proxy: Proxy, proxied_conn: Conn
) -> None:
    proxy.blackhole()
    attempt = _Background(
        lambda: psycopg.connect(proxy.dsn, connect_timeout=30).close()
    )
    assert not attempt.done.wait(0.3), "connected through a blackholed proxy"
    proxy.restore()
    with psycopg.connect(proxy.dsn, autocommit=True, connect_timeout=10) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)
    # The connection blackholed before restore() stays dead.
    stuck = _Background(lambda: proxied_conn.execute("SELECT 1"))
    assert not stuck.done.wait(0.3)
    proxy.disconnect()
    attempt.join()
    stuck.join()
    assert isinstance(attempt.error, psycopg.OperationalError)
    assert isinstance(stuck.error, psycopg.OperationalError)


def test_proxy_disconnect_breaks_connection(proxy: Proxy, proxied_conn: Conn) -> None:
    assert proxied_conn.execute("SELECT 1").fetchone() == (1,)
    proxy.disconnect()
    assert proxy.connection_count == 0
    with pytest.raises(psycopg.OperationalError):
        proxied_conn.execute("SELECT 1")
    with psycopg.connect(proxy.dsn, autocommit=True, connect_timeout=10) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_proxy_stop_closes_everything(pg_server: PgServer) -> None:
    host, port = server_address(pg_server.dsn)
    proxy = Proxy(host, port, base_dsn=pg_server.dsn).start()
    connection = psycopg.connect(proxy.dsn, autocommit=True, connect_timeout=10)
    try:
        proxy.stop()
        proxy.stop()  # idempotent
        with pytest.raises(psycopg.OperationalError):
            connection.execute("SELECT 1")
    finally:
        connection.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when running as root")
def test_root_runs_server_as_postgres(pg_server: PgServer, conn: Conn) -> None:
    if not isinstance(pg_server, TempCluster):
        pytest.skip("external server")
    pid = pg_server.postmaster_pid
    assert pid is not None
    assert os.stat(f"/proc/{pid}").st_uid != 0


def test_orphaned_cluster_is_reaped(tmp_path: Path) -> None:
    """A cluster whose owner was SIGKILLed is stopped by the next TempCluster."""
    script = (
        "import os, signal, sys\n"
        "from pglisten_fast.testing import TempCluster\n"
        "c = TempCluster().start()\n"
        "print(c.basedir, c.postmaster_pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    basedir, pid = proc.stdout.split()
    assert Path(basedir).exists()
    with TempCluster() as fresh:
        assert fresh.is_running()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "orphaned postmaster still running"
    assert not Path(basedir).exists()
