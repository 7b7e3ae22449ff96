"""Choice of the read path: libpq calls in C (the fast path) or in Python.

The C read loop (``pglf_run``/``pglf_pump`` in ``csrc/pglf_router.c``)
receives psycopg's ``PGconn *`` and calls ``PQconsumeInput``/``PQnotifies``
on it from C with the GIL released.  That is only sound if our extension
and psycopg use *the same* libpq: a ``PGconn`` from one libpq build handed
to another is undefined behaviour (psycopg's ``binary`` wheels bundle their
own libpq).  This module proves it at import and otherwise selects the
Python path, which reads through ``psycopg.pq`` and only hands the decoded
notifications to the C router.  Both paths share the router and rings.

``PGLISTEN_FAST_IMPL=c`` or ``=python`` forces a path; forcing ``c`` when it
cannot be proven safe raises :class:`ImportError` with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import psycopg
from psycopg import pq

from ._pglf import ffi, lib

__all__ = ["IMPL", "REASON", "check_c_path"]

logger = logging.getLogger("pglisten_fast")

IMPL_ENV = "PGLISTEN_FAST_IMPL"


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
    logger.warning("using the Python read path (%s)", why)
    return "python", why


#: ``"c"`` or ``"python"``: which read path Listeners use.
IMPL, REASON = _select()

RUN_WAKE: int = lib.PGLF_RUN_WAKE
RUN_TIMEOUT: int = lib.PGLF_RUN_TIMEOUT
RUN_RESULT: int = lib.PGLF_RUN_RESULT
RUN_ERROR: int = lib.PGLF_RUN_ERROR
RUN_BLOCKED: int = lib.PGLF_RUN_BLOCKED
RUN_EINTR: int = lib.PGLF_RUN_EINTR
BLOCKED: int = lib.PGLF_BLOCKED


def python_pump(router: object, pgconn: pq.abc.PGconn, busy: bool) -> int:
    """One read step through ``psycopg.pq``: the Python twin of ``pglf_pump``."""
    if lib.pglf_router_blocked(router) and lib.pglf_router_flush(router) == BLOCKED:
        return RUN_BLOCKED
    flags = 0
    try:
        pgconn.consume_input()
    except psycopg.OperationalError:
        flags |= RUN_ERROR
    route = lib.pglf_route
    notifies: Callable[[], pq.PGnotify | None] = pgconn.notifies
    while (n := notifies()) is not None:
        rc = route(router, n.relname, len(n.relname), n.be_pid, n.extra, len(n.extra))
        if rc == BLOCKED:
            flags |= RUN_BLOCKED
            break
    lib.pglf_router_wake(router)
    if busy and not pgconn.is_busy():
        flags |= RUN_RESULT
    return flags
