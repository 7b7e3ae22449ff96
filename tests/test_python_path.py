"""The Python read path passes the same tests as the C read path.

The read path is chosen once, at import (``PGLISTEN_FAST_IMPL``), so the
listener test modules run again in a child pytest with
``PGLISTEN_FAST_IMPL=python``; the child starts its own throwaway cluster
(or uses ``PGLISTEN_TEST_DSN`` like this run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pglisten_fast

ROOT = Path(__file__).resolve().parent.parent

#: Modules whose tests exercise the read path end to end.
MODULES = [
    "tests/test_listener.py",
    "tests/test_async.py",
    "tests/test_publish.py",
    "tests/test_faults.py",
]


@pytest.mark.skipif(
    os.environ.get("PGLISTEN_FAST_IMPL") == "python",
    reason="this run already uses the Python read path",
)
def test_listener_suite_on_the_python_read_path() -> None:
    assert pglisten_fast.__impl__ == "c", "the C read path should be usable here"
    env = dict(os.environ, PGLISTEN_FAST_IMPL="python")
    modules = [m for m in MODULES if (ROOT / m).exists()]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"Python read path failed:\n{tail}"
    assert " passed" in proc.stdout, tail
