"""pytest configuration of the benchmark suites (pytest-benchmark).

The suites are not part of the test-suite (``testpaths = ["tests"]`` in
``pyproject.toml``); run them explicitly from the repository root::

    python -m pytest benchmarks -p no:cacheprovider --benchmark-only

They reuse the test-suite's database fixtures (``tests/fix_db.py``:
``pg_server``, ``dsn``, ``conn``), which start one private PostgreSQL
cluster per session, or use ``PGLISTEN_FAST_TEST_DSN`` when it is set.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``tests`` is a package at the repository root: make it importable however
# pytest was started (``python -m pytest`` adds the cwd, ``pytest`` does not).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ("tests.fix_db",)

# Scripts, not test modules (they do not match test_*.py anyway).
collect_ignore = ["compare.py", "peers.py", "profile_client.py"]
