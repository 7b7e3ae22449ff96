"""Build hooks only: metadata lives in pyproject.toml.

Compiler flags, macros and source lists of both extension modules come from
csrc/build_settings.py (the cffi module is described in csrc/build_ffi.py).
"""

import sys
from pathlib import Path

from setuptools import Extension, setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "csrc"))
import build_settings

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    ext_modules=[
        Extension(
            "pglisten_fast._records",
            sources=build_settings.sources("_records"),
            include_dirs=build_settings.include_dirs(),
            define_macros=build_settings.DEFINE_MACROS,
            extra_compile_args=build_settings.cflags(),
        )
    ],
)
