"""The throwaway cluster itself: :class:`TempCluster`.

Importing this module imports :mod:`psycopg` (for :meth:`TempCluster.connect`
and the readiness probe); it starts nothing and needs no server binaries
until :meth:`TempCluster.start` runs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from . import reaper
from ._common import TEMP_PREFIX, ClusterError, StopMode, pid_alive, traversable_by
from .bindir import find_pg_bindir, missing_binaries

__all__ = ["TempCluster"]

_SERVER_USER = "postgres"
_CONF_NAME = "pglisten_fast.conf"
_START_TIMEOUT = 60.0
_LOG_TAIL_LINES = 40
_PORT_RETRIES = 3


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_quote(value: str) -> str:
    """Quote *value* for ``postgresql.conf``."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """The last *lines* lines of *text*, indented for an error message."""
    selected = text.rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in selected) if selected else "    (empty)"


class TempCluster:
    """A private PostgreSQL cluster living in a temporary directory.

    Args:
        port: TCP port to listen on (``127.0.0.1`` only); a free port is picked
            when omitted.
        settings: extra ``postgresql.conf`` settings, which override the
            defaults of this class.
        bindir: directory of the server binaries; found with
            :func:`find_pg_bindir` when omitted.
        quiet: capture the output of ``initdb`` and ``pg_ctl`` instead of
            letting it through to the terminal.  The output is always part of
            the error message when a command fails.

    Nothing happens until :meth:`start` is called (or the ``with`` block is
    entered).  :meth:`close` stops the server and removes the directory.
    """

    #: Settings written to the cluster configuration before *settings*.
    DEFAULT_SETTINGS: Mapping[str, str] = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "wal_level": "minimal",
        "max_wal_senders": "0",
        "listen_addresses": "127.0.0.1",
        "max_connections": "100",
        "shared_buffers": "64MB",
        "log_min_messages": "warning",
        "log_line_prefix": "%m [%p] ",
        "logging_collector": "off",
    }

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        bindir: str | os.PathLike[str] | None = None,
        quiet: bool = True,
    ) -> None:
        self._requested_port = port
        self._port: int | None = port
        self._settings: dict[str, str] = dict(settings or {})
        self._bindir: Path | None = Path(bindir) if bindir is not None else None
        self._quiet = quiet
        self._basedir: Path | None = None
        self._lock = threading.RLock()
        self._run_as: pwd.struct_passwd | None = None

    # -- properties ---------------------------------------------------------

    @property
    def host(self) -> str:
        """Address the server listens on."""
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """TCP port of the server (fixed once :meth:`start` has run)."""
        if self._port is None:
            raise ClusterError("the cluster has not been started yet: no port chosen")
        return self._port

    @property
    def dsn(self) -> str:
        """libpq connection string for the ``postgres`` database as ``postgres``."""
        return f"host={self.host} port={self.port} user=postgres dbname=postgres"

    @property
    def basedir(self) -> Path:
        """The temporary directory holding the data directory and the log."""
        if self._basedir is None:
            raise ClusterError(
                "the cluster has not been started yet (or was cleaned up)"
            )
        return self._basedir

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.basedir / "data"

    @property
    def log_path(self) -> Path:
        """The server log file."""
        return self.basedir / "server.log"

    @property
    def bindir(self) -> Path:
        """Directory of the server binaries in use."""
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def server_version(self) -> int:
        """Server version number as reported by libpq (e.g. ``150004``)."""
        with self.connect() as conn:
            return conn.info.server_version

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        where = self._basedir if self._basedir is not None else "not created"
        return f"<TempCluster port={self._port} dir={where} {state}>"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> TempCluster:
        """Create the cluster if needed and start the server.

        Returns *self* so that ``cluster = TempCluster().start()`` works.
        Does nothing if the server is already running.
        """
        with self._lock:
            if self._basedir is None:
                try:
                    self._create()
                except BaseException:
                    self.cleanup()
                    raise
            if self.is_running():
                return self
            attempts = _PORT_RETRIES if self._requested_port is None else 1
            for attempt in range(attempts):
                try:
                    self._start_server()
                    return self
                except _PortInUseError:
                    if attempt + 1 >= attempts:
                        raise
                    self._port = _free_port()
                    self._write_conf()
            return self  # pragma: no cover - loop always returns or raises

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (no-op when it is not running).

        ``mode="immediate"`` is a crash-like stop: no checkpoint, recovery runs
        on the next start.
        """
        with self._lock:
            if self._basedir is None or not self.datadir.exists():
                return
            pid = self._postmaster_pid()
            if pid is None or not pid_alive(pid):
                return
            proc = self._run(
                [
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ],
                check=False,
            )
            if proc.returncode != 0 and self.is_running():
                # pg_ctl failed or timed out: kill the postmaster outright; its
                # children exit by themselves once it is gone.
                self._kill_postmaster(pid)
                if pid_alive(pid):
                    raise ClusterError(
                        f"could not stop the server (pid {pid}) with pg_ctl:\n"
                        f"{_tail(proc.stdout)}\nserver log:\n{_tail(self._read_log())}"
                    )

    def kill(self) -> None:
        """Crash-like stop; same as ``stop(mode="immediate")``."""
        self.stop(mode="immediate")

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server with *mode* and start it again on the same port and data.

        Returns once the server accepts connections again.
        """
        with self._lock:
            if self._basedir is None:
                raise ClusterError("cannot restart a cluster that was never started")
            self.stop(mode=mode)
            # The port may be taken for a moment by an outgoing connection that
            # happened to get it as its local port: retry a few times.
            last: _PortInUseError | None = None
            for _ in range(5):
                try:
                    self._start_server()
                    return
                except _PortInUseError as exc:
                    last = exc
                    time.sleep(0.2)
            assert last is not None
            raise last

    def is_running(self) -> bool:
        """Whether the postmaster of this cluster is alive."""
        if self._basedir is None:
            return False
        pid = self._postmaster_pid()
        return pid is not None and pid_alive(pid)

    @property
    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, or ``None``."""
        pid = self._postmaster_pid()
        return pid if pid is not None and pid_alive(pid) else None

    def cleanup(self) -> None:
        """Stop the server if needed and delete the temporary directory."""
        with self._lock:
            try:
                self.stop()
            finally:
                if self._basedir is not None:
                    shutil.rmtree(self._basedir, ignore_errors=True)
                    self._basedir = None
                    self._port = self._requested_port
                reaper.unregister(self)

    def close(self) -> None:
        """Stop the server and remove every file (idempotent)."""
        self.cleanup()

    def __enter__(self) -> TempCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- client helpers -----------------------------------------------------

    def connect(self, **kwargs: Any) -> psycopg.Connection[TupleRow]:
        """Open a new psycopg connection to the cluster (autocommit by default)."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kwargs)

    def terminate_backend(self, pid: int) -> bool:
        """Terminate the backend *pid* and wait (up to 10 s) until it is gone.

        Returns ``True`` if the backend was terminated.
        """
        with self.connect() as conn:
            row = conn.execute(
                "SELECT pg_terminate_backend(%s, 10000)", (pid,)
            ).fetchone()
        return bool(row is not None and row[0])

    # -- internals ----------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _subprocess_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        env.pop("LANGUAGE", None)
        if self._run_as is not None:
            env["HOME"] = str(self.basedir)
            env["USER"] = env["LOGNAME"] = self._run_as.pw_name
        return env

    def _run(
        self, args: Sequence[str], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a server command, as the ``postgres`` user when we are root."""
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(
                user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[]
            )
        try:
            proc = subprocess.run(
                list(args),
                cwd=self.basedir,
                env=self._subprocess_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self._quiet else None,
                stderr=subprocess.STDOUT if self._quiet else None,
                text=True,
                timeout=_START_TIMEOUT + 30,
                check=False,
                **kwargs,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"command timed out: {' '.join(args)}") from exc
        except OSError as exc:
            raise ClusterError(f"could not run {args[0]}: {exc}") from exc
        if proc.stdout is None:
            proc.stdout = ""
        if check and proc.returncode != 0:
            raise ClusterError(
                f"command failed with exit code {proc.returncode}: {' '.join(args)}\n"
                f"{_tail(proc.stdout)}"
            )
        return proc

    def _create(self) -> None:
        """Make the temporary directory and run ``initdb``."""
        bindir = self.bindir  # fail early with a clear message
        missing = missing_binaries(bindir)
        if missing:
            raise ClusterError(
                f"{bindir} lacks PostgreSQL binaries: {', '.join(missing)}"
            )
        run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                run_as = pwd.getpwnam(_SERVER_USER)
            except KeyError:
                raise ClusterError(
                    "running as root, but PostgreSQL refuses to run as root and "
                    f"there is no {_SERVER_USER!r} user to run it as; create one "
                    f"(useradd -r {_SERVER_USER}) or run as an ordinary user"
                ) from None
        parent: str | None = None
        if run_as is not None and not traversable_by(
            Path(tempfile.gettempdir()), run_as.pw_uid, run_as.pw_gid
        ):
            parent = "/tmp"
        with contextlib.suppress(OSError):
            reaper.reap_orphans(parent)
        basedir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))
        reaper.write_owner_record(basedir)
        self._basedir = basedir
        self._run_as = run_as
        reaper.register(self)
        if run_as is not None:
            os.chown(basedir, run_as.pw_uid, run_as.pw_gid)
            if not traversable_by(basedir, run_as.pw_uid, run_as.pw_gid):
                raise ClusterError(
                    f"the {_SERVER_USER!r} user cannot enter {basedir}; "
                    "point TMPDIR at a directory every user can traverse"
                )
        if self._port is None:
            self._port = _free_port()
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write(f"\n# added by pglisten_fast.testing\ninclude '{_CONF_NAME}'\n")
        self._write_conf()

    def _write_conf(self) -> None:
        """Write this cluster's settings to the included configuration file."""
        settings: dict[str, str] = dict(self.DEFAULT_SETTINGS)
        settings["port"] = str(self.port)
        # Unix socket paths are limited to ~107 bytes; clients here use TCP anyway.
        socket_dir = str(self.basedir)
        too_long = len(socket_dir) + len("/.s.PGSQL.65535") >= 100
        settings["unix_socket_directories"] = "" if too_long else socket_dir
        settings.update(self._settings)
        path = self.datadir / _CONF_NAME
        lines = [f"{key} = {_conf_quote(value)}\n" for key, value in settings.items()]
        path.write_text("".join(lines), encoding="utf-8")
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _read_log(self, offset: int = 0) -> str:
        """The server log from byte *offset* on ("" if there is none)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _postmaster_pid(self) -> int | None:
        try:
            first = (
                (self.datadir / "postmaster.pid")
                .read_text(encoding="ascii")
                .split("\n", 1)[0]
            )
            return int(first.strip())
        except (OSError, ValueError):
            return None

    def _kill_postmaster(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _start_server(self) -> None:
        """Run ``pg_ctl start`` and wait until the server takes connections."""
        log_offset = self._log_size()
        proc = self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(_START_TIMEOUT)),
                "start",
            ],
            check=False,
        )
        if proc.returncode != 0:
            new_log = self._read_log(log_offset)
            pid = self._postmaster_pid()
            if pid is not None and pid_alive(pid):
                self._kill_postmaster(pid)
            message = (
                f"could not start PostgreSQL in {self.datadir} on port {self._port} "
                f"(pg_ctl exit code {proc.returncode}):\n{_tail(proc.stdout)}\n"
                f"server log ({self.log_path}):\n{_tail(new_log)}"
            )
            if "could not bind" in new_log or "Address already in use" in new_log:
                raise _PortInUseError(message)
            raise ClusterError(message)
        self._wait_connectable()

    def _wait_connectable(self, timeout: float = _START_TIMEOUT) -> None:
        """Poll until a client connection succeeds (bounded by *timeout*)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(
                    self.dsn, connect_timeout=5, autocommit=True
                ) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_error = exc
            if not self.is_running():
                break
            time.sleep(0.05)
        raise ClusterError(
            f"PostgreSQL on port {self._port} does not accept connections: "
            f"{last_error}\n"
            f"server log ({self.log_path}):\n{_tail(self._read_log())}"
        )


class _PortInUseError(ClusterError):
    """The server could not bind its port."""
