"""Build recipe of the cffi extension ``pglisten_fast._pglf`` (API mode, out of line).

Used by ``setup.py`` through ``cffi_modules``; run directly
(``python csrc/build_ffi.py``) to compile in place for development.  The
declarations cffi sees live in ``pglf.cdef``; the C code in ``pglf_*.c``;
flags, macros and the source list in ``build_settings.py`` (shared with the
``_records`` module built by ``setup.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# cffi runs this file by path (setup.py's cffi_modules), not as a package
# module: make its neighbour importable however it is started.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import build_settings  # noqa: E402


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


includes, libdirs = libpq_dirs()

ffibuilder = FFI()
ffibuilder.cdef((HERE / "pglf.cdef").read_text())
ffibuilder.set_source(
    "pglisten_fast._pglf",
    # libpq-fe.h: PQlibVersion is declared in the cdef and called from Python.
    "#include <libpq-fe.h>\n"
    '#include "pglf_ring.h"\n#include "pglf_router.h"\n#include "pglf_readloop.h"\n',
    # Run directly, FFI.compile() works in its tmpdir: absolute paths then.
    sources=build_settings.sources("_pglf", absolute=__name__ == "__main__"),
    include_dirs=[*build_settings.include_dirs(), *includes],
    library_dirs=libdirs,
    libraries=["pq"],
    define_macros=build_settings.DEFINE_MACROS,
    extra_compile_args=build_settings.cflags(),
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), verbose=True)
