"""The read path: how the selector thread reads the connection.

Two implementations of one small protocol, :class:`ReadPath`, chosen once
per connection by :func:`open_read_path`:

- :class:`CReadPath` hands psycopg's ``PGconn *`` to the C read loop
  (``pglf_run``/``pglf_pump`` in ``csrc/``), which polls, calls
  ``PQconsumeInput``/``PQnotifies``, routes and wakes consumers with the
  GIL released, and returns only for control events;
- :class:`PythonReadPath` does the same through ``psycopg.pq`` and hands
  each notification to the same C router.

The C loop is only sound if our extension and psycopg use *the same*
libpq: a ``PGconn`` from one libpq build handed to another is undefined
behaviour (psycopg's ``binary`` wheels bundle their own libpq).  This
module proves it at import and otherwise selects the Python path, with one
log line saying why.  ``PGLISTEN_FAST_IMPL=c`` or ``=python`` forces a
path; forcing ``c`` when it cannot be proven safe raises
:class:`ImportError` with the reason.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from psycopg import pq

from ._log import fields, logger
from ._pglf import ffi, lib
from ._router import Router, RunFlag

__all__ = ["IMPL", "IMPL_ENV", "REASON", "ReadPath", "check_c_path", "open_read_path"]


IMPL_ENV = "PGLISTEN_FAST_IMPL"


# ---------------------------------------------------------------------------
# choice at import


def _mapped_libpq_paths() -> set[str] | None:
    """Real paths of every libpq shared object mapped in this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    paths = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "libpq" in os.path.basename(parts[5].strip()):
            paths.add(os.path.realpath(parts[5].strip()))
    return paths


def check_c_path() -> str | None:
    """Return why the C read path is unsafe here, or None when it is safe."""
    impl = pq.__impl__
    if impl not in ("c", "python"):
        return (
            f"psycopg uses its {impl!r} implementation, which bundles its own "
            "libpq; install psycopg[c] to get the C read path"
        )
    ours = int(lib.PQlibVersion())
    theirs = pq.version()
    if ours != theirs:
        return f"psycopg's libpq is version {theirs}, pglisten_fast's is {ours}"
    raw = lib.pglf_libpq_path()
    if raw == ffi.NULL:
        return "cannot tell which libpq file pglisten_fast is linked with"
    our_path = os.path.realpath(ffi.string(raw).decode(errors="replace"))
    mapped = _mapped_libpq_paths()
    if mapped is None:
        return "cannot list the libraries loaded in this process (/proc/self/maps)"
    if impl == "python":
        # ctypes loads libpq lazily by soname; it is mapped once loaded.
        mapped.add(our_path)
    others = mapped - {our_path}
    if others:
        return f"more than one libpq is loaded: {sorted(mapped)}"
    return None


def _select() -> tuple[str, str | None]:
    forced = os.environ.get(IMPL_ENV, "").strip().lower()
    if forced not in ("", "c", "python"):
        raise ImportError(f"{IMPL_ENV} must be 'c' or 'python', not {forced!r}")
    if forced == "python":
        return "python", f"{IMPL_ENV}=python"
    why = check_c_path()
    if why is None:
        return "c", None
    if forced == "c":
        raise ImportError(f"{IMPL_ENV}=c, but the C read path is unsafe: {why}")
    logger.warning("using the Python read path (%s)", why,
                   extra=fields("read_path"))
    return "python", why


#: ``"c"`` or ``"python"``: which read path Listeners use.
IMPL, REASON = _select()


# ---------------------------------------------------------------------------
# the protocol and its two implementations


class ReadPath(Protocol):
    """Reads one connection on the selector thread until a control event."""

    #: ``"c"`` or ``"python"``.
    name: str

    def run(self, timeout: float) -> RunFlag:
        """Wait, read, route until a control event or ``timeout`` seconds
        without a byte from the server (< 0: no limit)."""

    def pump(self) -> RunFlag:
        """Read and route what the connection holds now, without waiting."""

    def close(self) -> None:
        """Stop watching the socket (before the connection is closed)."""


class CReadPath:
    """The C read loop on psycopg's own ``PGconn *`` (GIL released)."""

    name = "c"

    def __init__(self, router: Router, conn_ptr: Any, wake_rfd: int) -> None:
        self._router = router.ptr
        self._conn = conn_ptr
        self._wake_rfd = wake_rfd

    def run(self, timeout: float) -> RunFlag:
        ms = -1 if timeout < 0 else int(timeout * 1000 + 0.999)
        return RunFlag(lib.pglf_run(self._router, self._conn, self._wake_rfd, ms))

    def pump(self) -> RunFlag:
        return RunFlag(lib.pglf_pump(self._router, self._conn))

    def close(self) -> None:
        self._conn = ffi.NULL


class PythonReadPath:
    """The same loop through ``psycopg.pq``: the fallback read path."""

    name = "python"

    def __init__(self, router: Router, pgconn: pq.abc.PGconn, wake_rfd: int,
                 busy: Callable[[], bool]) -> None:
        self._router = router
        self._pgconn = pgconn
        self._wake_rfd = wake_rfd
        self._busy = busy
        self._sock = pgconn.socket
        # poll, not select: the fds may be numbered above FD_SETSIZE.
        self._poller: Any = select.poll()
        self._poller.register(wake_rfd, select.POLLIN)
        self._sock_events: int | None = None

    def pump(self) -> RunFlag:
        router = self._router
        if router.blocked and router.flush():
            return RunFlag.BLOCKED
        pgconn = self._pgconn
        flags = RunFlag.NONE
        try:
            pgconn.consume_input()
        except psycopg.OperationalError:
            flags |= RunFlag.ERROR
        route = router.route
        notifies: Callable[[], pq.PGnotify | None] = pgconn.notifies
        while (n := notifies()) is not None:
            if route(n.relname, n.be_pid, n.extra):
                flags |= RunFlag.BLOCKED
                break
        router.wake()
        if self._busy() and not pgconn.is_busy():
            flags |= RunFlag.RESULT
        return flags

    def run(self, timeout: float) -> RunFlag:
        pgconn = self._pgconn
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            try:
                pending = pgconn.flush()
            except psycopg.OperationalError:
                return RunFlag.ERROR
            blocked = self._router.blocked
            events = (0 if blocked else select.POLLIN) | (
                select.POLLOUT if pending else 0
            )
            # While blocked the socket is left out entirely, like pglf_run
            # does: poll would report a hang-up even with no events asked.
            self._watch_socket(events)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready = self._poller.poll(None if left is None else left * 1000)
            except InterruptedError:
                return RunFlag.EINTR
            if not ready:
                return RunFlag.TIMEOUT
            flags = RunFlag.NONE
            for fd, ev in ready:
                if fd == self._wake_rfd:
                    flags |= RunFlag.WAKE
                elif ev & ~select.POLLOUT and not blocked:
                    flags |= self.pump()
                    if deadline is not None:
                        deadline = time.monotonic() + timeout
            if flags:
                return flags

    def _watch_socket(self, events: int) -> None:
        if events:
            if self._sock_events is None:
                self._poller.register(self._sock, events)
            elif self._sock_events != events:
                self._poller.modify(self._sock, events)
        elif self._sock_events is not None:
            self._poller.unregister(self._sock)
        self._sock_events = events or None

    def close(self) -> None:
        # Unregister before the fd is closed (a closed fd can hang epoll).
        if self._sock_events is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poller.unregister(self._sock)
            self._sock_events = None


def open_read_path(router: Router, pgconn: pq.abc.PGconn, wake_rfd: int,
                   busy: Callable[[], bool]) -> ReadPath:
    """The read path for one connection: C when proven safe, else Python."""
    ptr = getattr(pgconn, "pgconn_ptr", None)
    if IMPL == "c" and ptr:
        return CReadPath(router, ffi.cast("PGconn *", ptr), wake_rfd)
    return PythonReadPath(router, pgconn, wake_rfd, busy)
