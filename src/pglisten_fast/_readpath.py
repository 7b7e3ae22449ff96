"""The read path: how the selector thread reads the connection.

Two implementations of one small protocol, :class:`ReadPath`, chosen once
per connection by :func:`open_read_path`:

- :class:`CReadPath` hands psycopg's ``PGconn *`` to the C read loop
  (``pglf_run``/``pglf_pump`` in ``csrc/``), which polls, calls
  ``PQconsumeInput``/``PQnotifies``, routes and wakes consumers with the
  GIL released, and returns only for control events;
- :class:`PythonReadPath` does the same through ``psycopg.pq`` and hands
  each notification to the same C router.

The C loop is only sound if it calls *the same* libpq as psycopg: a
``PGconn`` from one libpq build handed to another is undefined behaviour
(psycopg's ``binary`` wheels bundle their own libpq, and a process may hold
several).  So the extension is not linked with libpq at all: at import,
this module binds the C loop to the libpq functions of a library psycopg
already loaded (``pglf_libpq_bind`` in ``csrc/pglf_libpq.c``) and proves
the match:

1. candidates: psycopg's own pq extension module (``psycopg_c.pq`` or
   ``psycopg_binary.pq``: ``dlsym`` on its handle finds the libpq it was
   linked with, bundled or system) or, for psycopg's pure-Python
   implementation, the library its ``ctypes`` layer opened (the bound
   functions must be the very ones ctypes calls); and the global symbol
   scope;
2. a candidate counts only if every function comes from one shared object
   (``dladdr``) and its ``PQlibVersion()`` equals ``psycopg.pq.version()``;
3. two candidates that count but are different objects are ambiguous:
   refused;
4. each connection is checked before the C loop reads it: ``PQsocket`` and
   ``PQbackendPID`` through the bound functions must agree with psycopg's
   ``pgconn.socket`` and ``pgconn.backend_pid`` (else that connection is
   read by the Python path, with one warning per listener).

Anything that cannot be proven selects the Python path, with one log line
saying why (:data:`REASON`).  ``PGLISTEN_FAST_IMPL=c`` or ``=python``
forces a path; forcing ``c`` when the binding cannot be proven raises
:class:`ImportError` with the reason.  :data:`LIBPQ` names the library the
C loop is bound to.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import select
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import pq

from ._log import fields, logger
from ._pglf import ffi, lib
from ._router import Router, RunFlag

__all__ = [
    "BINDING",
    "IMPL",
    "IMPL_ENV",
    "LIBPQ",
    "REASON",
    "LibpqBinding",
    "ReadPath",
    "bind_libpq",
    "check_c_path",
    "choose_binding",
    "connection_mismatch",
    "open_read_path",
]


IMPL_ENV = "PGLISTEN_FAST_IMPL"

#: The libpq functions the C read loop calls, in the order they are bound.
LIBPQ_FUNCTIONS = (
    "PQconsumeInput",
    "PQnotifies",
    "PQfreemem",
    "PQsocket",
    "PQisBusy",
    "PQflush",
    "PQlibVersion",
    "PQbackendPID",
)


# ---------------------------------------------------------------------------
# binding to psycopg's libpq


@dataclass(frozen=True)
class LibpqBinding:
    """The C loop's function table, bound to one loaded libpq."""

    #: Where it was found: ``"psycopg_c.pq"``, ``"ctypes libpq"``, ``"global scope"``.
    source: str
    #: The shared object every function comes from (as the loader names it).
    path: str
    #: Its ``PQlibVersion()``.
    version: int
    #: Its load address: two bindings use the same library iff these are equal.
    base: int
    #: The ``pglf_libpq *`` handed to ``pglf_run``/``pglf_pump`` (kept alive here).
    table: Any

    def address(self, name: str) -> int:
        """Address of the bound function ``name`` (one of :data:`LIBPQ_FUNCTIONS`)."""
        return int(ffi.cast("uintptr_t", getattr(self.table, name)))


def _c_string(raw: Any) -> str | None:
    return None if raw == ffi.NULL else ffi.string(raw).decode(errors="replace")


def bind_libpq(path: str | None, source: str) -> LibpqBinding | str:
    """Bind the C loop to the libpq functions found from ``path``.

    ``path`` names an already loaded shared object (never loaded here);
    ``None`` searches the global symbol scope.  Returns the binding, or why
    there is none (prefixed with ``source``).
    """
    table = ffi.new("pglf_libpq *")
    rc = lib.pglf_libpq_bind(table, ffi.NULL if path is None else os.fsencode(path))
    symbol = _c_string(table.symbol)
    found = _c_string(table.path)
    if rc == lib.PGLF_BIND_OK:
        return LibpqBinding(source, os.path.normpath(found or "?"), int(table.version),
                            int(table.base), table)
    if rc == lib.PGLF_BIND_NOT_LOADED:
        return f"{source}: {path} is not loaded"
    if rc == lib.PGLF_BIND_MISSING:
        if symbol == LIBPQ_FUNCTIONS[0]:
            where = "in the global symbol scope" if path is None else f"from {path}"
            return f"{source}: no libpq {where}"
        return f"{source}: {found} has {LIBPQ_FUNCTIONS[0]} but no {symbol}"
    if rc == lib.PGLF_BIND_MIXED:
        return (f"{source}: {symbol} comes from {_c_string(table.other_path)}, "
                f"{LIBPQ_FUNCTIONS[0]} from {found}: not one library")
    if rc == lib.PGLF_BIND_UNKNOWN:
        return f"{source}: cannot tell which library {symbol} comes from (dladdr)"
    return f"{source}: cannot bind libpq at run time on this platform (no dlopen)"


def _ctypes_libpq() -> Any:
    """The ``ctypes.CDLL`` psycopg's pure-Python implementation calls, or None."""
    for name in ("psycopg.pq._pq_ctypes", "psycopg.pq.pq_ctypes"):
        module = sys.modules.get(name)
        cdll = getattr(module, "pq", None) or getattr(
            getattr(module, "impl", None), "pq", None)
        if isinstance(cdll, ctypes.CDLL):
            return cdll
    return None


def _same_as_ctypes(binding: LibpqBinding, cdll: Any) -> str | None:
    """Why ``binding`` is not what ``cdll`` calls, or None when it is."""
    for name in LIBPQ_FUNCTIONS:
        try:
            theirs = ctypes.cast(cdll[name], ctypes.c_void_p).value
        except (AttributeError, OSError):
            return f"{binding.source}: psycopg's ctypes libpq has no {name}"
        if theirs != binding.address(name):
            return (f"{binding.source}: {name} at {binding.path} is not the "
                    "function psycopg's ctypes layer calls")
    return None


def _module_candidate(impl: str) -> tuple[str, str | None, Any] | str:
    """psycopg's own library for ``impl``: (source, path, ctypes CDLL or None)."""
    if impl == "python":
        cdll = _ctypes_libpq()
        if cdll is None:
            return "psycopg's ctypes layer: its libpq handle was not found"
        return "ctypes libpq", str(cdll._name), cdll
    name = f"psycopg_{impl}.pq"
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        return f"{name}: cannot import it ({e})"
    path = getattr(module, "__file__", None)
    if not path:
        return f"{name}: its shared object is unknown (no __file__)"
    return name, str(path), None


def choose_binding(
    impl: str | None = None, version: int | None = None
) -> tuple[LibpqBinding | None, str | None, list[str]]:
    """Find the libpq psycopg uses: ``(binding, why_not, notes)``.

    ``impl`` and ``version`` default to psycopg's ``pq.__impl__`` and
    ``pq.version()``.  ``notes`` says what became of every candidate.
    """
    impl = pq.__impl__ if impl is None else impl
    theirs = pq.version() if version is None else version
    notes: list[str] = []
    candidates: list[tuple[str, str | None, Any]] = []
    own = _module_candidate(impl)
    if isinstance(own, str):
        notes.append(own)
    else:
        candidates.append(own)
    candidates.append(("global scope", None, None))

    matching: list[LibpqBinding] = []
    for source, path, cdll in candidates:
        bound = bind_libpq(path, source)
        if isinstance(bound, str):
            notes.append(bound)
            continue
        if cdll is not None and (why := _same_as_ctypes(bound, cdll)):
            notes.append(why)
            continue
        if bound.version != theirs:
            notes.append(f"{source}: libpq {bound.version} at {bound.path}, "
                         f"but psycopg uses libpq {theirs}")
            continue
        notes.append(f"{source}: libpq {bound.version} at {bound.path}")
        matching.append(bound)
    if not matching:
        return None, (f"no loaded libpq could be proven to be psycopg's "
                      f"({'; '.join(notes)})"), notes
    if len({b.base for b in matching}) > 1:
        paths = ", ".join(f"{b.path} ({b.source})" for b in matching)
        return None, (f"two different libpq {theirs} are loaded, cannot tell "
                      f"which one psycopg uses: {paths}"), notes
    return matching[0], None, notes


def check_c_path() -> str | None:
    """Return why the C read path cannot be used here, or None when it can."""
    return _prove()[1]


def _prove() -> tuple[LibpqBinding | None, str | None]:
    if not hasattr(pq.PGconn, "pgconn_ptr"):
        return None, (f"psycopg {psycopg.__version__} does not expose "
                      "PGconn.pgconn_ptr: upgrade psycopg")
    try:
        binding, why, _ = choose_binding()
    except Exception as e:  # never let the proof break the import
        return None, f"binding to psycopg's libpq failed: {e!r}"
    return binding, why


def _select() -> tuple[str, str | None, LibpqBinding | None]:
    forced = os.environ.get(IMPL_ENV, "").strip().lower()
    if forced not in ("", "c", "python"):
        raise ImportError(f"{IMPL_ENV} must be 'c' or 'python', not {forced!r}")
    if forced == "python":
        return "python", f"{IMPL_ENV}=python", None
    binding, why = _prove()
    if binding is not None:
        logger.debug("C read path bound to libpq %s at %s (%s)",
                     binding.version, binding.path, binding.source,
                     extra=fields("read_path"))
        return "c", None, binding
    if forced == "c":
        raise ImportError(f"{IMPL_ENV}=c, but the C read path is unsafe: {why}")
    logger.warning("using the Python read path (%s)", why,
                   extra=fields("read_path"))
    return "python", why, None


#: ``"c"`` or ``"python"``: which read path Listeners use.
IMPL: str
#: Why the Python path was chosen (None when the C path is used).
REASON: str | None
#: The libpq the C read loop is bound to (None on the Python path).
BINDING: LibpqBinding | None
IMPL, REASON, BINDING = _select()
#: Path of that libpq's shared object, for diagnostics (None on the Python path).
LIBPQ: str | None = BINDING.path if BINDING is not None else None


# ---------------------------------------------------------------------------
# the protocol and its two implementations


class ReadPath(Protocol):
    """Reads one connection on the selector thread until a control event."""

    #: ``"c"`` or ``"python"``.
    name: str

    def run(self, timeout: float) -> RunFlag:
        """Wait, read, route until a control event or until ``timeout``
        seconds have passed (< 0: no limit)."""

    def pump(self) -> RunFlag:
        """Read and route what the connection holds now, without waiting."""

    def close(self) -> None:
        """Stop watching the socket (before the connection is closed)."""


class CReadPath:
    """The C read loop on psycopg's own ``PGconn *`` (GIL released)."""

    name = "c"

    def __init__(self, router: Router, binding: LibpqBinding, conn_ptr: Any,
                 wake_rfd: int) -> None:
        self._router = router.ptr
        self._binding = binding      # keeps the function table alive
        self._pq = binding.table
        self._conn = conn_ptr
        self._wake_rfd = wake_rfd

    def run(self, timeout: float) -> RunFlag:
        ms = -1 if timeout < 0 else int(timeout * 1000 + 0.999)
        return RunFlag(
            lib.pglf_run(self._router, self._pq, self._conn, self._wake_rfd, ms))

    def pump(self) -> RunFlag:
        return RunFlag(lib.pglf_pump(self._router, self._pq, self._conn))

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


def connection_mismatch(binding: LibpqBinding, conn_ptr: Any, socket: int,
                        backend_pid: int) -> str | None:
    """Why the bound libpq does not see ``conn_ptr`` as psycopg does, or None.

    ``socket`` and ``backend_pid`` are what psycopg reports for the
    connection; the bound ``PQsocket``/``PQbackendPID`` must return the same.
    """
    ids = ffi.new("int[2]")
    lib.pglf_libpq_conn_ids(binding.table, conn_ptr, ids, ids + 1)
    ours = (int(ids[0]), int(ids[1]))
    if ours != (socket, backend_pid):
        return (f"libpq at {binding.path} sees socket {ours[0]} and backend "
                f"{ours[1]}, psycopg sees socket {socket} and backend {backend_pid}")
    return None


#: Routers (one per Listener) already warned about a connection the C loop
#: could not prove its own.
_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def _warn_once(router: Router, why: str) -> None:
    key = router.ptr
    try:
        if key in _warned:
            return
        _warned.add(key)
    except TypeError:  # not weakly referenceable: warn every time
        pass
    logger.warning("using the Python read path for this connection (%s)", why,
                   extra=fields("read_path"))


def open_read_path(router: Router, pgconn: pq.abc.PGconn, wake_rfd: int,
                   busy: Callable[[], bool]) -> ReadPath:
    """The read path for one connection: C when proven safe, else Python."""
    ptr = getattr(pgconn, "pgconn_ptr", None)
    if IMPL == "c" and BINDING is not None and ptr:
        conn = ffi.cast("PGconn *", ptr)
        try:
            why = connection_mismatch(BINDING, conn, pgconn.socket,
                                      pgconn.backend_pid)
        except psycopg.Error as e:
            why = f"psycopg cannot tell the connection's socket and backend: {e}"
        if why is None:
            return CReadPath(router, BINDING, conn, wake_rfd)
        _warn_once(router, why)
    return PythonReadPath(router, pgconn, wake_rfd, busy)
