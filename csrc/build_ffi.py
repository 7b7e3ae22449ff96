"""Build recipe of the cffi extension ``pglisten_fast._pglf`` (API mode, out of line).

Used by ``setup.py`` through ``cffi_modules``; run directly
(``python csrc/build_ffi.py``) to compile in place for development.  The
declarations cffi sees live in ``pglf.cdef``; the C code in ``pglf_*.c``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def _pg_config(what: str) -> str | None:
    exe = os.environ.get("PG_CONFIG") or shutil.which("pg_config")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, what], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out or None


def libpq_dirs() -> tuple[list[str], list[str]]:
    """Include and library directories of libpq (pg_config, else Debian's)."""
    inc = _pg_config("--includedir")
    lib = _pg_config("--libdir")
    includes = [inc] if inc else []
    libs = [lib] if lib else []
    for guess in ("/usr/include/postgresql", "/usr/local/include/postgresql"):
        if (Path(guess) / "libpq-fe.h").exists() and guess not in includes:
            includes.append(guess)
    if not any((Path(d) / "libpq-fe.h").exists() for d in includes):
        raise RuntimeError(
            "libpq-fe.h not found: install the libpq development package "
            "(Debian/Ubuntu: apt-get install libpq-dev; Fedora: libpq-devel) "
            "or put pg_config on PATH"
        )
    return includes, libs


CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
CFLAGS += os.environ.get("PGLF_EXTRA_CFLAGS", "").split()

includes, libdirs = libpq_dirs()

ffibuilder = FFI()
ffibuilder.cdef((HERE / "pglf.cdef").read_text())
ffibuilder.set_source(
    "pglisten_fast._pglf",
    # libpq-fe.h: PQlibVersion is declared in the cdef and called from Python.
    '#include <libpq-fe.h>\n'
    '#include "pglf_ring.h"\n#include "pglf_router.h"\n#include "pglf_readloop.h"\n',
    sources=[
        os.path.relpath(HERE / f)
        for f in ("pglf_ring.c", "pglf_chanmap.c", "pglf_router.c", "pglf_readloop.c")
    ],
    include_dirs=[str(HERE), *includes],
    library_dirs=libdirs,
    libraries=["pq"],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), verbose=True)
