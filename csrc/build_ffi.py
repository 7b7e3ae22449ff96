"""Build recipe of the cffi extension ``pglisten_fast._pglf`` (API mode, out of line).

Used by ``setup.py`` through ``cffi_modules``; run directly
(``python csrc/build_ffi.py``) to compile in place for development.  The
declarations cffi sees live in ``pglf.cdef``; the C code in ``pglf_*.c``;
flags, macros and the source list in ``build_settings.py`` (shared with the
``_records`` module built by ``setup.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# cffi runs this file by path (setup.py's cffi_modules), not as a package
# module: make its neighbour importable however it is started.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import build_settings  # noqa: E402

ffibuilder = FFI()
ffibuilder.cdef((HERE / "pglf.cdef").read_text())
ffibuilder.set_source(
    "pglisten_fast._pglf",
    # No libpq header and no link with libpq: the read loop calls the libpq
    # that psycopg loaded, bound at run time (pglf_libpq.h).
    '#include "pglf_ring.h"\n#include "pglf_router.h"\n'
    '#include "pglf_libpq.h"\n#include "pglf_readloop.h"\n',
    # Run directly, FFI.compile() works in its tmpdir: absolute paths then.
    sources=build_settings.sources("_pglf", absolute=__name__ == "__main__"),
    include_dirs=build_settings.include_dirs(),
    libraries=build_settings.libraries("_pglf"),
    define_macros=build_settings.DEFINE_MACROS,
    extra_compile_args=build_settings.cflags(),
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), verbose=True)
