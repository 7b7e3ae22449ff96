"""Finding the PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ._common import ClusterError

__all__ = ["BINDIR_ENV_VAR", "REQUIRED_BINARIES", "find_pg_bindir", "missing_binaries"]

#: Environment variable that overrides the search for the server binaries.
BINDIR_ENV_VAR = "PGLISTEN_PG_BINDIR"

#: The programs a cluster needs.
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")


def missing_binaries(bindir: Path) -> list[str]:
    """Return the names of the required server binaries absent from *bindir*."""
    return [
        name
        for name in REQUIRED_BINARIES
        if not ((bindir / name).is_file() and os.access(bindir / name, os.X_OK))
    ]
def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin`` directories."""
    return tuple(int(part) for part in path.parent.name.split("."))


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


def find_pg_bindir() -> Path:
    """Locate the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    The candidates are, in order:

    1. the environment variable ``PGLISTEN_PG_BINDIR`` (if set, it must be
       valid: no other place is tried);
    2. ``pg_config --bindir``, when ``pg_config`` is on ``PATH``;
    3. the directory of ``pg_ctl`` found on ``PATH`` (and, if that is a
       symbolic link, the directory of its target);
    4. the newest ``/usr/lib/postgresql/<version>/bin``;
    5. ``/usr/local/pgsql/bin``.

    Raises:
        ClusterError: no candidate holds all three binaries.
    """
    override = os.environ.get(BINDIR_ENV_VAR)
    if override:
        path = Path(override)
        missing = missing_binaries(path)
        if missing:
            raise ClusterError(
                f"{BINDIR_ENV_VAR}={override!r} does not contain the PostgreSQL "
                f"server binaries (missing: {', '.join(missing)})"
            )
        return path

    tried: list[str] = []
    candidates: list[tuple[str, Path | None]] = [
        ("pg_config --bindir", _pg_config_bindir())
    ]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        candidates.append(("directory of pg_ctl on PATH", Path(pg_ctl).parent))
        candidates.append(
            ("directory of pg_ctl on PATH (resolved)", Path(pg_ctl).resolve().parent)
        )
    else:
        candidates.append(("directory of pg_ctl on PATH", None))
    versioned: list[Path] = []
    for versioned_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        if re.fullmatch(r"\d+(\.\d+)*", versioned_dir.parent.name):
            versioned.append(versioned_dir)
    versioned.sort(key=_version_key, reverse=True)
    if versioned:
        candidates.extend(("/usr/lib/postgresql/*/bin", v) for v in versioned)
    else:
        candidates.append(("/usr/lib/postgresql/*/bin", None))
    candidates.append(("/usr/local/pgsql/bin", Path("/usr/local/pgsql/bin")))

    for label, candidate in candidates:
        if candidate is None:
            tried.append(f"{label}: not available")
            continue
        missing = missing_binaries(candidate)
        if not missing:
            return candidate
        tried.append(f"{label}: {candidate} (missing: {', '.join(missing)})")
    raise ClusterError(
        "could not find the PostgreSQL server binaries (initdb, pg_ctl, postgres); "
        f"install the PostgreSQL server or set {BINDIR_ENV_VAR}. Tried:\n  "
        + "\n  ".join(tried)
    )

