"""The choice of read path: ``PGLISTEN_FAST_IMPL`` and ``__impl__``.

A child interpreter forced to the Python read path receives in order, a
bogus value fails the import with a clear message, and ``__impl__`` reports
the path in use.  (``tests/test_python_path.py`` runs the listener test
modules on the Python read path.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pglisten_fast as pgl

_ROUND_TRIP = r"""
import os, psycopg, pglisten_fast as pgl
assert pgl.__impl__ == "python", pgl.__impl__
dsn = os.environ["PGLF_TEST_DSN"]
with pgl.Listener(dsn) as lst, psycopg.connect(dsn, autocommit=True) as c:
    sub = lst.listen("impl_python")
    m = sub.get(timeout=10)
    assert m.connection_reset and m.reason == "listen", m
    pgl.notify_many(c, "impl_python", [str(i) for i in range(1000)])
    got = []
    while len(got) < 1000:
        got += [n.payload for n in sub.get_batch(timeout=10)]
    assert got == [str(i) for i in range(1000)], got[:5]
print("impl", pgl.__impl__, "ok")
"""


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
        timeout=60, check=False, cwd=os.path.dirname(os.path.dirname(__file__)),
    )


def test_forced_python_read_path(dsn: str) -> None:
    proc = _run_python(_ROUND_TRIP, PGLISTEN_FAST_IMPL="python", PGLF_TEST_DSN=dsn)
    assert proc.returncode == 0, proc.stderr
    assert "impl python ok" in proc.stdout


def test_bogus_read_path_fails_import() -> None:
    proc = _run_python(
        "import pglisten_fast\n", PGLISTEN_FAST_IMPL="bogus"
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "PGLISTEN_FAST_IMPL" in proc.stderr
    assert "bogus" in proc.stderr


def test_current_read_path_is_reported() -> None:
    assert pgl.__impl__ in ("c", "python")
    forced = os.environ.get("PGLISTEN_FAST_IMPL", "").strip().lower()
    if forced:
        assert pgl.__impl__ == forced
