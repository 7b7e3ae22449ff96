"""Pytest plugin: a real PgBouncer in front of the test server.

Enabled from ``tests/conftest.py`` with ``pytest_plugins``.  The ``pgbouncer``
fixture is a factory: ``pgbouncer(pool_mode="session")`` starts a private
PgBouncer process in front of ``pg_server`` and returns a started
:class:`Bouncer`; every bouncer it started is stopped, and its files removed,
when the test ends (pass or fail).

Each bouncer listens on a free port on ``127.0.0.1``; its ini file, auth file,
log and Unix socket live in a private temporary directory.  Authentication is
``trust`` (no passwords: the cluster's user is listed in the auth file), the
server reset query is PgBouncer's default (``DISCARD ALL``, session mode
only), pools are small (``default_pool_size=4``) and the cluster's user is an
admin of the ``pgbouncer`` console database.

PgBouncer refuses to run as root: when the test-suite runs as root it is run
as the ``postgres`` operating-system user (the one
:class:`pglisten_fast.testing.TempCluster` uses), or ``nobody`` when there is
none.  The binary is ``pgbouncer`` on ``PATH`` or ``/usr/sbin/pgbouncer``
(override with ``PGLISTEN_PGBOUNCER``); without it every test using the
fixture is skipped ("pgbouncer not installed: apt-get install pgbouncer").

:class:`Bouncer`:

``bouncer.dsn``
    libpq conninfo through the pooler (same dbname and user as the cluster).
``bouncer.admin_dsn``
    conninfo of the admin console (``dbname=pgbouncer``).
``bouncer.pool_mode``
    the pool mode in effect.
``bouncer.set_pool_mode(mode)``
    rewrite the ini file and ``RELOAD`` through the admin console; returns
    once ``SHOW CONFIG`` reports the new mode.  PgBouncer 1.18 applies it to
    clients that connect afterwards; see ``tests/test_poolers.py`` for what
    happens to clients already connected.
``bouncer.admin(command)``
    run one admin console command (``SHOW POOLS``, ``KILL db``, ...) and return
    its rows.
``bouncer.restart()``
    stop (immediate shutdown: every client connection is closed) and start
    again on the same port; returns once a client connects through it.
``bouncer.stop()``
    immediate shutdown (idempotent).
``bouncer.version``
    e.g. ``(1, 18, 0)``.
``bouncer.client_logins()``
    how many client logins to the pooled database PgBouncer has logged since
    it last started (counts connection attempts, whatever the client does).
``bouncer.log_text()``
    PgBouncer's log since it last started, to explain failures.

Readiness is tested by connecting through the pooler (``SELECT 1`` reaches
the server), never by sleeping.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pglisten_fast.testing._common import pid_alive
from tests.fix_db import PgServer

#: Environment variable naming the PgBouncer binary to use.
BINARY_ENV_VAR = "PGLISTEN_PGBOUNCER"

PoolMode = Literal["session", "transaction", "statement"]

_SKIP_REASON = "pgbouncer not installed: apt-get install pgbouncer"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_RUN_AS_CANDIDATES = ("postgres", "nobody")

#: In each bouncer's directory: the pid of the test process that owns it,
#: and the pid of its PgBouncer (for the orphan reaper).
_OWNER_FILE = "owner.pid"
_PID_FILE = "bouncer.pid"

_live: set[Bouncer] = set()
_live_lock = threading.Lock()
_owner_pid = os.getpid()


def find_pgbouncer() -> str | None:
    """Path of the PgBouncer binary, or None when it is not installed."""
    override = os.environ.get(BINARY_ENV_VAR)
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer",
                      "/usr/local/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run PgBouncer as (None: as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.skip("running as root and no 'postgres' or 'nobody' user to run "
                "pgbouncer as (it refuses to run as root)")
    return None  # pragma: no cover - pytest.skip raises


def _ini_quote(value: str) -> str:
    """A value for a ``key=value`` connection string inside ``[databases]``."""
    if value and all(c.isalnum() or c in "._-/" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _server_target(dsn: str) -> dict[str, str]:
    """host/port/dbname/user that a connection to *dsn* really uses."""
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        info = conn.info
        return {
            "host": info.hostaddr or info.host,
            "port": str(info.port),
            "dbname": info.dbname,
            "user": info.user,
            "password": info.password or "",
        }


class BouncerError(RuntimeError):
    """PgBouncer could not be started, reloaded or stopped."""


class Bouncer:
    """One private PgBouncer process in front of a PostgreSQL server.

    Args:
        server_dsn: conninfo of the server to pool connections to.
        binary: the ``pgbouncer`` executable.
        pool_mode: ``"session"``, ``"transaction"`` or ``"statement"``.
        settings: extra ``[pgbouncer]`` settings, overriding the defaults.
    """

    DEFAULT_SETTINGS: dict[str, str] = {  # noqa: RUF012 - read-only by convention
        "auth_type": "trust",
        "default_pool_size": "4",
        "min_pool_size": "0",
        "reserve_pool_size": "0",
        "max_client_conn": "100",
        "max_db_connections": "20",
        "server_lifetime": "3600",
        "server_idle_timeout": "600",
        "server_connect_timeout": "5",
        "server_login_retry": "1",
        "ignore_startup_parameters": "extra_float_digits",
        "log_connections": "1",
        "log_disconnections": "1",
        "log_pooler_errors": "1",
        "stats_period": "60",
    }

    def __init__(
        self,
        server_dsn: str,
        binary: str,
        pool_mode: PoolMode = "session",
        settings: dict[str, str] | None = None,
    ) -> None:
        self._binary = binary
        self._target = _server_target(server_dsn)
        self._pool_mode: PoolMode = pool_mode
        self._settings = dict(settings or {})
        self._run_as = _run_as()
        self._port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._dir = Path(tempfile.mkdtemp(prefix="pglf-bouncer-", dir="/tmp"))
        os.chmod(self._dir, stat.S_IRWXU)
        (self._dir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        if self._run_as is not None:
            os.chown(self._dir, self._run_as.pw_uid, self._run_as.pw_gid)
        with _live_lock:
            _live.add(self)
        self._write_files()

    # -- properties -----------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def pool_mode(self) -> PoolMode:
        return self._pool_mode

    @property
    def directory(self) -> Path:
        """Where the ini, auth file, log and Unix socket live."""
        return self._dir

    @property
    def log_path(self) -> Path:
        return self._dir / "pgbouncer.log"

    @property
    def dsn(self) -> str:
        """libpq conninfo through the pooler, same dbname and user as the server."""
        return self._conninfo(self._target["dbname"])

    @property
    def admin_dsn(self) -> str:
        """libpq conninfo of the admin console."""
        return self._conninfo("pgbouncer")

    def _conninfo(self, dbname: str) -> str:
        params: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self._port,
            "dbname": dbname,
            "user": self._target["user"],
        }
        return make_conninfo("", **params)

    @property
    def pid(self) -> int | None:
        """PID of the running PgBouncer process, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return (f"<Bouncer 127.0.0.1:{self._port} pool_mode={self._pool_mode} "
                f"{state}>")

    # -- files ----------------------------------------------------------------

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _write_files(self) -> None:
        user = self._target["user"]
        auth = self._dir / "userlist.txt"
        password = self._target["password"].replace('"', '""')
        auth.write_text(f'"{user}" "{password}"\n', encoding="utf-8")
        self._chown(auth)
        self._write_ini()

    def _write_ini(self) -> None:
        target = self._target
        server = " ".join(
            f"{key}={_ini_quote(target[key])}"
            for key in ("host", "port", "dbname", "user")
        )
        if target["password"]:
            server += f" password={_ini_quote(target['password'])}"
        fallback = f"host={_ini_quote(target['host'])} port={target['port']}"
        settings = dict(self.DEFAULT_SETTINGS)
        settings.update(
            listen_addr="127.0.0.1",
            listen_port=str(self._port),
            unix_socket_dir=str(self._dir),
            auth_file=str(self._dir / "userlist.txt"),
            logfile=str(self.log_path),
            pidfile=str(self._dir / "pgbouncer.pid"),
            admin_users=target["user"],
            stats_users=target["user"],
            pool_mode=self._pool_mode,
        )
        settings.update(self._settings)
        lines = [
            "[databases]",
            f"{target['dbname']} = {server}",
            f"* = {fallback}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
            "",
        ]
        ini = self._dir / "pgbouncer.ini"
        tmp = ini.with_suffix(".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        self._chown(tmp)
        tmp.replace(ini)

    @property
    def version(self) -> tuple[int, ...]:
        """PgBouncer's version, e.g. ``(1, 18, 0)`` (asked through the console)."""
        text = str(self.admin("SHOW VERSION")[0][0])  # "PgBouncer 1.18.0"
        match = re.search(r"(\d+(?:\.\d+)*)", text)
        if match is None:
            raise BouncerError(f"unexpected SHOW VERSION answer: {text!r}")
        return tuple(int(part) for part in match.group(1).split("."))

    def client_logins(self) -> int:
        """Client logins to the pooled database so far (since the last start)."""
        needle = f"login attempt: db={self._target['dbname']} "
        return self.log_text().count(needle)

    def log_text(self) -> str:
        """PgBouncer's log (empty when there is none)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 30) -> str:
        tail = self.log_text().rstrip().splitlines()[-lines:]
        return "\n".join("    " + line for line in tail) or "    (empty)"

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Bouncer:
        """Start PgBouncer (no-op when running); returns once it pools clients."""
        with self._lock:
            if self.is_running():
                return self
            last: BouncerError | None = None
            # Right after a stop the port can be briefly unavailable.
            for _ in range(5):
                try:
                    self._spawn()
                    self._wait_ready()
                    return self
                except BouncerError as exc:
                    last = exc
                    self._kill()
                    if "Address already in use" not in self.log_text():
                        raise
                    time.sleep(0.2)
            assert last is not None
            raise last

    def _spawn(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid,
                          extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with contextlib.suppress(OSError):
            self.log_path.unlink()
        # Errors before the log file is open go to stdout/stderr.
        out = open(self._dir / "stderr.log", "ab")  # noqa: SIM115 - closed below
        try:
            self._proc = subprocess.Popen(
                [self._binary, str(self._dir / "pgbouncer.ini")],
                cwd=self._dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                **kwargs,
            )
        except OSError as exc:
            raise BouncerError(f"could not run {self._binary}: {exc}") from exc
        finally:
            out.close()
        (self._dir / _PID_FILE).write_text(f"{self._proc.pid}\n")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                stderr = ""
                with contextlib.suppress(OSError):
                    stderr = (self._dir / "stderr.log").read_text(errors="replace")
                raise BouncerError(
                    f"pgbouncer exited (code {code}) while starting on port "
                    f"{self._port}:\n{self._log_tail()}\n{stderr[-2000:]}"
                )
            try:
                with psycopg.connect(self.dsn, autocommit=True,
                                     connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
            time.sleep(0.05)
        raise BouncerError(
            f"pgbouncer on port {self._port} did not pool a client within "
            f"{_START_TIMEOUT:g} s: {last}\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Immediate shutdown: every client and server connection is closed."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                # PgBouncer 1.18: SIGTERM is the immediate shutdown.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._kill()
            self._proc = None

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_STOP_TIMEOUT)
        self._proc = None

    def restart(self) -> None:
        """Stop, then start again on the same port and with the same files."""
        with self._lock:
            self.stop()
            self.start()

    def close(self) -> None:
        """Stop and remove every file (idempotent)."""
        with self._lock:
            try:
                self.stop()
            finally:
                shutil.rmtree(self._dir, ignore_errors=True)
                with _live_lock:
                    _live.discard(self)

    # -- admin console --------------------------------------------------------

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Run one admin console command and return its rows ([] if none)."""
        # The console speaks only the simple query protocol and refuses
        # transactions: autocommit and no parameters.
        with psycopg.connect(self.admin_dsn, autocommit=True,
                             connect_timeout=10) as conn:
            cur = conn.execute(command.encode())
            return cur.fetchall() if cur.description is not None else []

    def admin_dicts(self, command: str) -> list[dict[str, Any]]:
        """Like :meth:`admin`, each row as a dict keyed by column name."""
        with psycopg.connect(self.admin_dsn, autocommit=True,
                             connect_timeout=10) as conn:
            cur = conn.execute(command.encode())
            if cur.description is None:
                return []
            names = [c.name for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def config(self, key: str) -> str:
        """The value of a setting as PgBouncer reports it (``SHOW CONFIG``)."""
        for row in self.admin_dicts("SHOW CONFIG"):
            if row["key"] == key:
                return str(row["value"])
        raise KeyError(key)

    def set_pool_mode(self, mode: PoolMode) -> None:
        """Rewrite the ini with *mode* and ``RELOAD``; returns once in effect."""
        with self._lock:
            self._pool_mode = mode
            self._write_ini()
            if not self.is_running():
                return
            self.admin("RELOAD")
            current = self.config("pool_mode")
            if current != mode:
                raise BouncerError(
                    f"pool_mode is {current!r} after RELOAD, not {mode!r}:\n"
                    f"{self._log_tail()}"
                )


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _reap_orphans() -> None:
    """Stop the bouncers of test runs that died without cleaning up.

    A test process killed outright never runs its finalizers nor its atexit
    hook.  A directory is ours when it holds ``owner.pid``; its PgBouncer is
    stopped only when ``bouncer.pid`` names a live process running that
    directory's ini file.
    """
    for d in Path("/tmp").glob("pglf-bouncer-*"):
        try:
            owner = int((d / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or pid_alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError):
            pid = int((d / _PID_FILE).read_text().strip())
            if str(d / "pgbouncer.ini") in _cmdline(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + _STOP_TIMEOUT
                while _cmdline(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(d, ignore_errors=True)


def _close_all_at_exit() -> None:
    if os.getpid() != _owner_pid:
        return
    with _live_lock:
        bouncers = list(_live)
    for bouncer in bouncers:
        with contextlib.suppress(Exception):
            bouncer.close()


atexit.register(_close_all_at_exit)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which PgBouncer the pooler tests use."""
    binary = find_pgbouncer()
    if binary is None:
        return [f"pgbouncer: NOT FOUND (pooler tests skipped; {_SKIP_REASON})"]
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False, stdin=subprocess.DEVNULL)
        version = out.stdout.splitlines()[0] if out.stdout else "unknown version"
    except (OSError, subprocess.SubprocessError):
        version = "version unknown"
    return [f"pgbouncer: {binary} ({version})"]


@pytest.fixture
def pgbouncer(request: pytest.FixtureRequest) -> Iterator[Callable[..., Bouncer]]:
    """Factory: ``pgbouncer(pool_mode="session", **settings)`` -> started Bouncer.

    Skips the test when PgBouncer is not installed (before the PostgreSQL
    server is even started).  Every bouncer started is closed when the test
    ends.
    """
    binary = find_pgbouncer()
    if binary is None:
        pytest.skip(_SKIP_REASON)
    pg_server: PgServer = request.getfixturevalue("pg_server")
    with contextlib.suppress(OSError):
        _reap_orphans()
    started: list[Bouncer] = []

    def make(pool_mode: PoolMode = "session", **settings: Any) -> Bouncer:
        bouncer = Bouncer(pg_server.dsn, binary, pool_mode,
                          {k: str(v) for k, v in settings.items()})
        started.append(bouncer)
        bouncer.start()
        return bouncer

    try:
        yield make
    finally:
        for bouncer in started:
            bouncer.close()
