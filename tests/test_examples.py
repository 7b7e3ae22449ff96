"""Run every script in ``examples/`` to completion against the test server.

Each example has a ``--demo-once`` mode in which it produces its own
traffic, checks the outcome and exits (status 0 when the check passes).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl

from .helpers import Worker, wait_until

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
    "fastapi_app.py": [
        "client: reload (connect), ",
        ": hello 2",
        "demo: terminated the listener's backend",
        "client: reload (reconnect), ",
        "sent while down is in it: yes",
        "health: connected=True, reconnects=1",
    ],
    "reconcile_worker.py": [
        "(marker (listen)): added while stopped 0",
        ": with notify 2",
        "(reconcile): without notify 1",
        "8 tasks, each processed once: yes; OK",
    ],
}

#: script -> modules it needs beyond the package (its test is skipped without).
REQUIRES: dict[str, list[tuple[str, ...]]] = {
    # FastAPI's TestClient runs on httpx2 (new Starlette) or httpx (older).
    "fastapi_app.py": [("fastapi",), ("httpx2", "httpx")],
}


def skip_unless_installed(script: str) -> None:
    for alternatives in REQUIRES.get(script, []):
        if not any(importlib.util.find_spec(m) for m in alternatives):
            pytest.skip(f"{script} needs {' or '.join(alternatives)}")


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
    skip_unless_installed(script)
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


# -- examples/fastapi_app.py, in-process with FastAPI's TestClient ---------------
def load_example(script: str) -> ModuleType:
    """Import ``examples/<script>`` as a module (once per test session)."""
    name = f"pglf_example_{script.removesuffix('.py')}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fastapi_app() -> Iterator[ModuleType]:
    skip_unless_installed("fastapi_app.py")
    yield load_example("fastapi_app.py")


def test_client(app: Any) -> Any:
    with warnings.catch_warnings():
        # Starlette asks for httpx2 where httpx is what is installed.
        warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
        from fastapi.testclient import TestClient
    return TestClient(app)


test_client.__test__ = False  # type: ignore[attr-defined]  # not a test


@pytest.mark.timeout(60)  # a message that never comes blocks receive_json()
def test_fastapi_app_pushes_items_and_reloads_on_a_marker(
    fastapi_app: ModuleType,
    dsn: str,
    conn: psycopg.Connection[Any],
    terminate_backend: Callable[[int], bool],
) -> None:
    app = fastapi_app.create_app(dsn, reconnect_delay=0.2)
    with test_client(app) as client, client.websocket_connect("/ws") as ws1, \
            client.websocket_connect("/ws") as ws2:
        clients = (ws1, ws2)
        for ws in clients:  # the current state first
            first = ws.receive_json()
            assert first["type"] == "reload" and first["reason"] == "connect"
        health = client.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["connected"] is True and body["listening"] == ["feed"]
        assert body["clients"] == 2 and body["reloads"] == 1
        assert body["listener"]["connects"] == 1

        # A committed row reaches every client through its NOTIFY.
        row = conn.execute(
            "INSERT INTO feed_items (body) VALUES ('first') RETURNING id"
        ).fetchone()
        assert row is not None
        for ws in clients:
            assert ws.receive_json() == {
                "type": "item", "item": {"id": row[0], "body": "first"}}
        assert client.get("/health").json()["subscription"]["delivered"] == 1

        # The listener's connection dies; a row committed around then may
        # never be notified, but the "reconnect" reload has it.
        listener = app.state.listener
        assert terminate_backend(listener.backend_pid)
        lost = conn.execute(
            "INSERT INTO feed_items (body) VALUES ('around the loss') RETURNING id"
        ).fetchone()
        assert lost is not None
        for ws in clients:
            while (msg := ws.receive_json())["type"] != "reload":
                assert msg["item"]["id"] == lost[0]  # notified before the loss
            assert msg["reason"] == "reconnect"
            ids = [item["id"] for item in msg["items"]]
            assert row[0] in ids
            if lost[0] not in ids:  # committed after the reload: notified
                assert ws.receive_json()["item"]["id"] == lost[0]
        body = client.get("/health").json()
        assert body["connected"] is True
        assert body["listener"]["reconnects"] == 1 and body["reloads"] == 2
    assert not listener.connected  # the lifespan stopped it


def test_fastapi_app_health_is_503_while_disconnected(
    fastapi_app: ModuleType, dsn: str
) -> None:
    app = fastapi_app.create_app(dsn)
    with test_client(app) as client:
        app.state.listener.stop()
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["connected"] is False


def test_fastapi_app_takes_the_dsn_from_the_environment(
    fastapi_app: ModuleType, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGLISTEN_FAST_DSN", dsn)
    with test_client(fastapi_app.create_app()) as client:
        assert client.get("/health").json()["connected"] is True


def test_fastapi_app_sends_a_slow_client_a_reload_instead_of_a_backlog(
    fastapi_app: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastapi_app, "CLIENT_QUEUE", 3)
    feed = fastapi_app.Feed("", sub=None)
    feed.latest = {1: "a"}
    queue = feed.connect()
    for i in range(2, 6):
        feed.latest[i] = f"item {i}"
        feed.broadcast({"type": "item", "item": {"id": i, "body": f"item {i}"}})
    messages = [queue.get_nowait() for _ in range(queue.qsize())]
    assert messages[0] == {
        "type": "reload", "reason": "slow-client",
        "items": [{"id": 1, "body": "a"}] + [
            {"id": i, "body": f"item {i}"} for i in range(2, 5)],
    }
    assert messages[1:] == [{"type": "item", "item": {"id": 5, "body": "item 5"}}]


# -- examples/reconcile_worker.py -----------------------------------------------
@pytest.fixture
def reconcile() -> ModuleType:
    return load_example("reconcile_worker.py")


class Processed:
    """A thread-safe record of what the workers' handlers were called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def __call__(self, task_id: int, body: str, how: str) -> None:
        with self._lock:
            self.calls.append((task_id, how))

    def how(self, task_id: int) -> str | None:
        with self._lock:
            return next((h for i, h in self.calls if i == task_id), None)

    def done(self, ids: list[int]) -> bool:
        return all(self.how(i) is not None for i in ids)


def start_worker(
    reconcile: ModuleType, dsn: str, processed: Processed, every: float
) -> tuple[Any, Worker]:
    worker = reconcile.ReconcileWorker(dsn, reconcile_every=every, handle=processed)
    return worker, Worker(worker.run, name="reconcile-worker")


def test_reconcile_worker_processes_every_row_once(
    reconcile: ModuleType, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    reconcile.ensure_schema(dsn)
    processed = Processed()
    add = reconcile.add_task

    # Added while no worker runs: their NOTIFYs are lost; the first marker
    # of the next worker picks them up.
    offline = [add(conn, f"offline {i}") for i in range(3)]
    worker, thread = start_worker(reconcile, dsn, processed, every=3600)
    wait_until(lambda: processed.done(offline))
    assert {processed.how(i) for i in offline} == {"marker (listen)"}

    # With a NOTIFY: processed at once (no periodic pass for an hour).
    hinted = [add(conn, f"hinted {i}") for i in range(5)]
    wait_until(lambda: processed.done(hinted))
    assert {processed.how(i) for i in hinted} == {"notify"}
    worker.stop()
    thread.join()

    # Stopped again; then two workers share the table with SKIP LOCKED.
    offline2 = [add(conn, f"offline again {i}") for i in range(50)]
    workers = [start_worker(reconcile, dsn, processed, every=0.3) for _ in range(2)]
    wait_until(lambda: processed.done(offline2))
    wait_until(lambda: all(w.full_passes for w, _ in workers))  # "listen" passes

    # Without any NOTIFY (a sender that crashed after COMMIT): processed by
    # the periodic pass.
    silent = [add(conn, f"silent {i}", notify=False) for i in range(5)]
    wait_until(lambda: processed.done(silent))
    assert {processed.how(i) for i in silent} == {"reconcile"}
    mixed = [add(conn, f"mixed {i}", notify=i % 2 == 0) for i in range(40)]
    wait_until(lambda: processed.done(mixed))
    for w, t in workers:
        w.stop()
        t.join()

    mine = offline + hinted + offline2 + silent + mixed
    counts = Counter(i for i, _ in processed.calls if i in set(mine))
    assert counts == dict.fromkeys(mine, 1), "a task was processed twice"
    row = conn.execute(
        "SELECT count(*) FROM reconcile_tasks WHERE id = ANY(%s) AND done_at IS NULL",
        (mine,),
    ).fetchone()
    assert row == (0,)


def test_reconcile_worker_retries_a_failed_batch_on_the_next_pass(
    reconcile: ModuleType, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    reconcile.ensure_schema(dsn)
    processed = Processed()
    failures = {"left": 1}

    def flaky(task_id: int, body: str, how: str) -> None:
        if body == "flaky" and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("handler failed")
        processed(task_id, body, how)

    worker = reconcile.ReconcileWorker(dsn, reconcile_every=3600, handle=flaky)
    thread = Worker(worker.run, name="reconcile-worker")
    try:
        wait_until(lambda: worker.full_passes == 1)  # LISTEN is in effect
        task = reconcile.add_task(conn, "flaky")
        wait_until(lambda: failures["left"] == 0)  # the NOTIFY's try failed...
        pgl.notify(conn, reconcile.CHANNEL, "*")   # ...a forced full pass
        wait_until(lambda: processed.done([task]))
        assert processed.how(task) == "reconcile"
        assert worker.full_passes == 2
    finally:
        worker.stop()
        thread.join()
