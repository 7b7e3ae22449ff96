"""Build settings shared by both extension modules of pglisten_fast.

``pglisten_fast._pglf`` (cffi, API mode: ``csrc/build_ffi.py``) and
``pglisten_fast._records`` (a plain CPython extension: ``setup.py``) are
compiled with the same flags, macros and copy of ``pglf_ring.c``: a ring
created by one is drained by the other through its address (see
``PGLF_RING_ABI`` in ``pglf_ring.h``).  This module is the one place those
settings live.

``setup.py`` and ``build_ffi.py`` put this directory on ``sys.path`` and
``import build_settings``.  Run as a script, it prints settings for shell
scripts (``scripts/sanitize.sh``), one per line::

    python3 csrc/build_settings.py cflags        # flags and -D macros
    python3 csrc/build_settings.py sources _pglf  # sources of one module

Environment: ``PGLISTEN_FAST_EXTRA_CFLAGS`` adds compiler flags (split like
a shell command line), e.g. ``PGLISTEN_FAST_EXTRA_CFLAGS=-Werror``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Environment variable whose value is appended to the compiler flags.
EXTRA_CFLAGS_ENV = "PGLISTEN_FAST_EXTRA_CFLAGS"
_OLD_EXTRA_CFLAGS_ENV = "PGLF_EXTRA_CFLAGS"

#: Warnings the C code is kept clean of (both modules build with -Werror).
WARNINGS = ["-Wall", "-Wextra", "-Wshadow", "-Wconversion"]

#: Compiler flags of both modules, before the extra flags from the environment.
BASE_CFLAGS = ["-std=c11", "-O2", *WARNINGS, "-fvisibility=hidden"]

#: POSIX and GNU declarations (poll, clock_gettime, posix_memalign, dladdr)
#: that strict -std=c11 hides.
DEFINE_MACROS = [("_GNU_SOURCE", "1")]

#: C sources of each module, relative to this directory.  Each module
#: compiles its own copy of pglf_ring.c.
SOURCES = {
    "_pglf": ["pglf_ring.c", "pglf_chanmap.c", "pglf_router.c", "pglf_readloop.c"],
    "_records": ["pglf_records.c", "pglf_ring.c"],
}


def extra_cflags() -> list[str]:
    """Flags from ``$PGLISTEN_FAST_EXTRA_CFLAGS`` (empty when unset)."""
    if os.environ.get(_OLD_EXTRA_CFLAGS_ENV) and EXTRA_CFLAGS_ENV not in os.environ:
        # Refuse rather than build silently without the flags asked for.
        raise RuntimeError(
            f"{_OLD_EXTRA_CFLAGS_ENV} is no longer read: set {EXTRA_CFLAGS_ENV} instead"
        )
    return shlex.split(os.environ.get(EXTRA_CFLAGS_ENV, ""))


def cflags() -> list[str]:
    """Compiler flags of both modules, extra flags from the environment last."""
    return [*BASE_CFLAGS, *extra_cflags()]


def sources(module: str, *, absolute: bool = False) -> list[str]:
    """Sources of ``module`` (``"_pglf"`` or ``"_records"``).

    Relative to the current directory by default, as setuptools expects
    (absolute paths would scatter the object files); ``absolute=True`` for
    builds that change directory (``FFI.compile(tmpdir=...)``).
    """
    paths = [HERE / name for name in SOURCES[module]]
    return [str(p) if absolute else os.path.relpath(p) for p in paths]


def include_dirs() -> list[str]:
    """Include directories for the headers of this directory."""
    return [str(HERE)]


def _main(argv: list[str]) -> int:
    if argv == ["cflags"]:
        macros = [f"-D{name}={value}" for name, value in DEFINE_MACROS]
        print(*cflags(), *macros, sep="\n")
        return 0
    if len(argv) == 2 and argv[0] == "sources" and argv[1] in SOURCES:
        print(*sources(argv[1]), sep="\n")
        return 0
    print(
        f"usage: {sys.argv[0]} cflags | sources {{{','.join(SOURCES)}}}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
