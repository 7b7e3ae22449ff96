"""Run every script in ``examples/`` to completion against the test server.

Each example has a ``--demo-once`` mode in which it produces its own
traffic, checks the outcome and exits (status 0 when the check passes).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 120

#: script -> lines (substrings) its --demo-once output must contain.
EXPECTED: dict[str, list[str]] = {
    "quickstart.py": [
        "marker: (re)load every order",
        "order 1001 (sent by backend ",
        "order 1003 (sent by backend ",
        "received 3 orders",
    ],
    "cache_invalidation.py": [
        "marker (listen): reloaded the whole table",
        "writer: terminated the listener's backend",
        "marker (reconnect): reloaded the whole table",
        "writer is done",
        "matches the table: yes",
    ],
    "batch_ingest.py": [
        "marker: listen on 'events'",
        "stored 20,000 events",
        "of 20,000 sent: OK",
    ],
    "asyncio_consumer.py": [
        "[jobs] marker (listen)",
        "[metrics] marker (listen)",
        "[jobs] running job 'job-4'",
        "5 jobs, 5,000 metrics (sum 12,502,500): OK",
    ],
    "member_list.py": [
        "watcher: marker (listen): reloaded the table",
        "crashes",
        "leaves cleanly",
        "final members: ['member2-",
        ": OK",
    ],
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PGLISTEN_FAST_DSN"}
    env.update(extra)
    return env


def run_example(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env() if env is None else env,
        cwd=ROOT,
        check=False,
    )


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_has_docstring_and_demo_mode(script: str) -> None:
    source = (EXAMPLES / script).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source))
    assert doc is not None and len(doc) > 200
    assert "--demo-once" in doc
    assert "PGLISTEN_FAST_DSN" in doc
    assert "from __future__ import annotations" in source


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_to_completion(dsn: str, script: str) -> None:
    res = run_example(script, dsn, "--demo-once")
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    for expected in EXPECTED[script]:
        assert expected in res.stdout, f"{expected!r} missing from:\n{res.stdout}"
    assert "Traceback" not in res.stderr, res.stderr


def test_example_takes_the_dsn_from_the_environment(dsn: str) -> None:
    res = run_example("quickstart.py", "--demo-once", env=_env(PGLISTEN_FAST_DSN=dsn))
    assert res.returncode == 0, res.stderr
    assert "received 3 orders" in res.stdout


def test_example_reports_an_unreachable_server() -> None:
    res = run_example(
        "quickstart.py", "host=127.0.0.1 port=1 connect_timeout=5", "--demo-once"
    )
    assert res.returncode == 2
    assert "cannot connect to PostgreSQL" in res.stderr
    assert "Traceback" not in res.stderr
