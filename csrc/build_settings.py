"""Build settings shared by both extension modules of pglisten_fast.

``pglisten_fast._pglf`` (cffi, API mode: ``csrc/build_ffi.py``) and
``pglisten_fast._records`` (a plain CPython extension: ``setup.py``) are
compiled with the same flags, macros and copy of ``pglf_ring.c``: a ring
created by one is drained by the other through its address (see
``PGLF_RING_ABI`` in ``pglf_ring.h``).  This module is the one place those
settings live.

Neither module needs libpq to build or links with it: the read loop binds
the libpq that psycopg loaded at run time (``pglf_libpq.h``), through
``dlopen``/``dlsym``/``dladdr``, which only glibc before 2.34 keeps in a
library of its own (``-ldl``, see :func:`libraries`).

``setup.py`` and ``build_ffi.py`` put this directory on ``sys.path`` and
``import build_settings``.  Run as a script, it prints settings for shell
scripts (``scripts/sanitize.sh``), one per line::

    python3 csrc/build_settings.py cflags           # flags and -D macros
    python3 csrc/build_settings.py sources _pglf     # sources of one module
    python3 csrc/build_settings.py libraries _pglf   # -l flags of one module

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

#: POSIX and GNU declarations (poll, clock_gettime, posix_memalign, dladdr,
#: RTLD_DEFAULT, RTLD_NOLOAD) that strict -std=c11 hides.
DEFINE_MACROS = [("_GNU_SOURCE", "1")]

#: C sources of each module, relative to this directory.  Each module
#: compiles its own copy of pglf_ring.c.
SOURCES = {
    "_pglf": [
        "pglf_ring.c",
        "pglf_chanmap.c",
        "pglf_router.c",
        "pglf_libpq.c",
        "pglf_readloop.c",
    ],
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


def _glibc_version() -> tuple[int, int] | None:
    """The C library's version when it is glibc, else None."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def libraries(module: str) -> list[str]:
    """Libraries ``module`` links with, beyond the C library.

    ``_pglf`` binds libpq at run time with ``dlopen``/``dlsym``/``dladdr``:
    in the C library itself since glibc 2.34 (and on musl, macOS, the BSDs),
    in ``libdl`` before.  libpq is never linked.
    """
    if module == "_pglf":
        glibc = _glibc_version()
        if glibc is not None and glibc < (2, 34):
            return ["dl"]
    return []


def _main(argv: list[str]) -> int:
    if argv == ["cflags"]:
        macros = [f"-D{name}={value}" for name, value in DEFINE_MACROS]
        print(*cflags(), *macros, sep="\n")
        return 0
    if len(argv) == 2 and argv[0] == "sources" and argv[1] in SOURCES:
        print(*sources(argv[1]), sep="\n")
        return 0
    if len(argv) == 2 and argv[0] == "libraries" and argv[1] in SOURCES:
        for name in libraries(argv[1]):
            print(f"-l{name}")
        return 0
    modules = ",".join(SOURCES)
    print(
        f"usage: {sys.argv[0]} cflags | sources {{{modules}}} | libraries {{{modules}}}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
