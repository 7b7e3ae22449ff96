"""The commands and files of one data directory, for :class:`TempCluster`.

Running ``initdb``/``pg_ctl`` (as the server's user when we are root),
reading ``postmaster.pid`` and the server log, writing the configuration,
and waiting until the server takes connections.  Imports :mod:`psycopg`.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psycopg

from ._common import ClusterError, pid_alive
from ._users import run_as_kwargs

#: Bound on starting the server (and on each command, plus 30 s).
START_TIMEOUT = 60.0
_LOG_TAIL_LINES = 40


class PortInUseError(ClusterError):
    """The server could not bind its port."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """The last *lines* lines of *text*, indented for an error message."""
    selected = text.rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in selected) if selected else "    (empty)"


def _environment(run_as: pwd.struct_passwd | None, home: Path) -> dict[str, str]:
    """The environment of server commands: no ``PG*`` variables, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env.pop("LANGUAGE", None)
    if run_as is not None:
        env["HOME"] = str(home)
        env["USER"] = env["LOGNAME"] = run_as.pw_name
    return env


def run(
    args: Sequence[str],
    *,
    cwd: Path,
    run_as: pwd.struct_passwd | None,
    quiet: bool,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a server command in *cwd*, as *run_as* when given.

    With *quiet* the output is captured (and part of the error on failure);
    ``stdout`` of the result is always a string.
    """
    try:
        proc = subprocess.run(
            list(args),
            cwd=cwd,
            env=_environment(run_as, cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.STDOUT if quiet else None,
            text=True,
            timeout=START_TIMEOUT + 30,
            check=False,
            **run_as_kwargs(run_as),
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
            f"{tail(proc.stdout)}"
        )
    return proc


def write_conf(
    path: Path, settings: Mapping[str, str], run_as: pwd.struct_passwd | None
) -> None:
    """Write *settings* as a ``postgresql.conf`` file owned by the server's user."""
    def quote(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"

    lines = [f"{key} = {quote(value)}\n" for key, value in settings.items()]
    path.write_text("".join(lines), encoding="utf-8")
    if run_as is not None:
        os.chown(path, run_as.pw_uid, run_as.pw_gid)


def read_log(path: Path, offset: int = 0) -> str:
    """The server log from byte *offset* on ("" if there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def file_size(path: Path) -> int:
    """Size of *path* in bytes, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def postmaster_pid(datadir: Path) -> int | None:
    """The pid in ``postmaster.pid`` (the server may be gone), else ``None``."""
    try:
        text = (datadir / "postmaster.pid").read_text(encoding="ascii")
        return int(text.split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def kill_postmaster(pid: int) -> None:
    """SIGKILL the postmaster and wait (up to 10 s) for it to go."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_connectable(
    dsn: str, running: Callable[[], bool], log_path: Path, timeout: float
) -> None:
    """Poll until a client connection to *dsn* succeeds (bounded by *timeout*).

    Gives up early once *running* says the server is gone.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            last_error = exc
        if not running():
            break
        time.sleep(0.05)
    raise ClusterError(
        f"PostgreSQL ({dsn}) does not accept connections: {last_error}\n"
        f"server log ({log_path}):\n{tail(read_log(log_path))}"
    )
