"""The throwaway cluster itself: :class:`TempCluster`.

Importing this module imports :mod:`psycopg` (for :meth:`TempCluster.connect`
and the readiness probe); it starts nothing and needs no server binaries
until :meth:`TempCluster.start` runs.  Finding the binaries is
:mod:`.bindir`'s job, running them as another user when we are root is
:mod:`._users`', cleaning up after dead processes is :mod:`.reaper`'s.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
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

from . import _server as srv
from . import reaper
from ._common import TEMP_PREFIX, ClusterError, StopMode, pid_alive, traversable_by
from ._server import PortInUseError
from ._users import server_user, temp_parent, usable_bindir
from .bindir import find_pg_bindir, missing_binaries

__all__ = ["TempCluster"]

_CONF_NAME = "pglisten_fast.conf"
_PORT_RETRIES = 3


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
        user: only when the current process is root (PostgreSQL refuses to
            run as root): the operating-system user (name or uid) to run the
            server as.  Default: ``$PGLISTEN_FAST_PG_USER``, else
            ``postgres``, else ``nobody``.  That user must be able to read
            the binaries: when it cannot, they are copied to a private
            temporary directory first (see :attr:`exec_bindir`).

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
        user: str | None = None,
    ) -> None:
        self._requested_port = port
        self._port: int | None = port
        self._settings: dict[str, str] = dict(settings or {})
        self._bindir: Path | None = Path(bindir) if bindir is not None else None
        self._quiet = quiet
        self._basedir: Path | None = None
        self._lock = threading.RLock()
        self._user = user
        self._run_as: pwd.struct_passwd | None = None
        self._exec_bindir: Path | None = None

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
        """Directory of the server binaries in use (as given or as found)."""
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def exec_bindir(self) -> Path:
        """Where the binaries are run from: :attr:`bindir`, or a private copy
        of its installation when the server's user cannot read it."""
        return self._exec_bindir or self.bindir

    @property
    def server_user(self) -> str | None:
        """The user the server runs as when we are root, else ``None``."""
        return self._run_as.pw_name if self._run_as is not None else None

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
                except PortInUseError:
                    if attempt + 1 >= attempts:
                        raise
                    self._port = srv.free_port()
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
            proc = self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")
            if proc.returncode != 0 and self.is_running():
                # pg_ctl failed or timed out: kill the postmaster outright; its
                # children exit by themselves once it is gone.
                srv.kill_postmaster(pid)
                if pid_alive(pid):
                    log = srv.tail(self._read_log())
                    raise ClusterError(
                        f"could not stop the server (pid {pid}) with pg_ctl:\n"
                        f"{srv.tail(proc.stdout)}\nserver log:\n{log}"
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
            last: PortInUseError | None = None
            for _ in range(5):
                try:
                    self._start_server()
                    return
                except PortInUseError as exc:
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

    def _run(
        self, args: Sequence[str], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a server command in the base directory, as the server's user."""
        return srv.run(
            args, cwd=self.basedir, run_as=self._run_as, quiet=self._quiet, check=check
        )

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``pg_ctl -D <datadir> *args`` (a failure is the caller's to report)."""
        pg_ctl = str(self.exec_bindir / "pg_ctl")
        return self._run([pg_ctl, "-D", str(self.datadir), *args], check=False)

    def _create(self) -> None:
        """Make the temporary directory and run ``initdb``."""
        bindir = self.bindir  # fail early with a clear message
        missing = missing_binaries(bindir)
        if missing:
            raise ClusterError(
                f"{bindir} lacks PostgreSQL binaries: {', '.join(missing)}"
            )
        run_as = server_user(self._user)
        if run_as is not None:
            self._exec_bindir = usable_bindir(bindir, run_as)
        parent = temp_parent(run_as)
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
                    f"the {run_as.pw_name!r} user cannot enter {basedir}; "
                    "point TMPDIR at a directory every user can traverse"
                )
        if self._port is None:
            self._port = srv.free_port()
        initdb = str(self.exec_bindir / "initdb")
        self._run([
            initdb, "-D", str(self.datadir), "-U", "postgres",
            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
        ])
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
        srv.write_conf(self.datadir / _CONF_NAME, settings, self._run_as)

    def _read_log(self, offset: int = 0) -> str:
        return srv.read_log(self.log_path, offset)

    def _postmaster_pid(self) -> int | None:
        return srv.postmaster_pid(self.datadir)

    def _start_server(self) -> None:
        """Run ``pg_ctl start`` and wait until the server takes connections."""
        log_offset = srv.file_size(self.log_path)
        timeout = str(int(srv.START_TIMEOUT))
        proc = self._pg_ctl("-l", str(self.log_path), "-w", "-t", timeout, "start")
        if proc.returncode != 0:
            new_log = self._read_log(log_offset)
            pid = self._postmaster_pid()
            if pid is not None and pid_alive(pid):
                srv.kill_postmaster(pid)
            message = (
                f"could not start PostgreSQL in {self.datadir} on port {self._port} "
                f"(pg_ctl exit code {proc.returncode}):\n{srv.tail(proc.stdout)}\n"
                f"server log ({self.log_path}):\n{srv.tail(new_log)}"
            )
            if "could not bind" in new_log or "Address already in use" in new_log:
                raise PortInUseError(message)
            raise ClusterError(message)
        srv.wait_connectable(
            self.dsn, self.is_running, self.log_path, timeout=srv.START_TIMEOUT
        )
