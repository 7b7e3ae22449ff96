"""What the parts of :mod:`pglisten_fast.testing` share: the error, names, probes."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

#: Prefix of every environment variable read by the project.
ENV_PREFIX = "PGLISTEN_FAST_"

#: Shutdown modes understood by ``pg_ctl stop``.
StopMode = Literal["smart", "fast", "immediate"]

#: Name prefix of every temporary directory made by this package (clusters
#: and copies of server binaries); the reaper only looks at these.
TEMP_PREFIX = "pglisten-fast-"

#: Written into each temporary directory: the pid of the process that owns it.
OWNER_FILE = "owner.pid"


class ClusterError(RuntimeError):
    """Raised when a temporary cluster cannot be located, started or stopped."""


def pid_alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)
        return len(fields) == 2 and fields[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _allowed(
    st: os.stat_result, uid: int, gid: int, bits: tuple[int, int, int]
) -> bool:
    """Whether *uid*/*gid* gets the (user, group, other) permission *bits* on *st*."""
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid == gid:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


_SEARCH = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
_READ = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)


def traversable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether every directory from ``/`` down to *path* can be entered by uid/gid.

    Only the primary group is considered, which is what the server gets when
    it is started as another user (no supplementary groups).
    """
    current = path.resolve()
    for directory in (current, *current.parents):
        try:
            st = directory.stat()
        except OSError:
            return False
        if not _allowed(st, uid, gid, _SEARCH):
            return False
    return True


def executable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether *path* is a file that uid/gid may read and execute (and reach)."""
    path = path.resolve()
    try:
        st = path.stat()
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and _allowed(st, uid, gid, _SEARCH)
        and _allowed(st, uid, gid, _READ)
        and traversable_by(path.parent, uid, gid)
    )
