"""Build hooks only: metadata lives in pyproject.toml."""

import os

from setuptools import Extension, setup

CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
CFLAGS += os.environ.get("PGLF_EXTRA_CFLAGS", "").split()

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    ext_modules=[
        Extension(
            "pglisten_fast._records",
            sources=["csrc/pglf_records.c", "csrc/pglf_ring.c"],
            include_dirs=["csrc"],
            define_macros=[("_GNU_SOURCE", "1")],
            extra_compile_args=CFLAGS,
        )
    ],
)
