"""Cleaning up after throwaway clusters, including those of dead processes.

Two mechanisms:

* every live :class:`~pglisten_fast.testing.TempCluster` is registered here,
  and an :mod:`atexit` hook closes those still open when the interpreter
  exits (a forked child never closes its parent's);
* each temporary directory gets an owner record (``owner.pid``, written by
  the creating process).  A process killed outright (SIGKILL, or SIGTERM with
  no handler) never runs its atexit hook, so its server would run forever:
  :func:`reap_orphans`, called before a new cluster is made, stops and
  removes the clusters whose owner is dead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

from ._common import OWNER_FILE, TEMP_PREFIX, pid_alive

__all__ = ["reap_orphans", "register", "unregister", "write_owner_record"]


class _Closable(Protocol):
    def close(self) -> None: ...


_live: set[_Closable] = set()
_live_last: set[_Closable] = set()
_lock = threading.Lock()
_owner_pid = os.getpid()


def register(obj: _Closable, *, last: bool = False) -> None:
    """Have *obj* closed at interpreter exit unless :func:`unregister`-ed first.

    Objects registered with *last* are closed after the others (copies of
    the server binaries, after the clusters that run from them).
    """
    with _lock:
        (_live_last if last else _live).add(obj)


def unregister(obj: _Closable) -> None:
    """Forget *obj* (no-op when unknown)."""
    with _lock:
        _live.discard(obj)
        _live_last.discard(obj)


def _cleanup_at_exit() -> None:
    """Close every registered object still alive when the interpreter exits."""
    if os.getpid() != _owner_pid:  # a forked child must not stop the parent's servers
        return
    with _lock:
        objs = [*_live, *_live_last]
    for obj in objs:
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            obj.close()


atexit.register(_cleanup_at_exit)


def write_owner_record(directory: Path) -> None:
    """Record in *directory* that this process owns it."""
    (directory / OWNER_FILE).write_text(f"{os.getpid()}\n")


def _stop_postmaster(data: Path) -> bool:
    """Stop the postmaster of *data*, if one runs; False when it may still run.

    A server is signalled only once it is proven to be that directory's
    postmaster (its working directory is the data directory): a pid read from
    a stale ``postmaster.pid`` may have been reused by an unrelated process.
    """
    pid = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    if pid is None or not pid_alive(pid):
        return True
    try:
        cwd = os.path.realpath(f"/proc/{pid}/cwd")
    except OSError:
        return False
    if cwd != os.path.realpath(data):
        return False  # a recycled pid: not that cluster's server
    # SIGQUIT is PostgreSQL's immediate shutdown; the children follow.
    try:
        os.kill(pid, signal.SIGQUIT)
    except OSError:
        return False
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


def reap_orphans(parent: str | Path | None = None) -> None:
    """Stop and remove the temporary directories whose owning process died.

    Looks at the ``pglisten-fast-*`` directories of *parent* (default: the
    temporary directory).  Only directories of ours are considered: real
    directories whose owner record is a regular file written by this user
    (the directory itself may belong to the server's user when running as
    root).  A directory whose server cannot be proven stopped is left alone.
    """
    base = Path(parent or tempfile.gettempdir())
    me = os.geteuid()
    for d in base.glob(TEMP_PREFIX + "*"):
        record = d / OWNER_FILE
        try:
            if not stat.S_ISDIR(d.lstat().st_mode):
                continue
            st = record.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_uid != me:
                continue
            owner = int(record.read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if owner == os.getpid() or pid_alive(owner):
            continue
        if _stop_postmaster(d / "data"):
            shutil.rmtree(d, ignore_errors=True)
