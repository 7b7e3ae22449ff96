"""End-to-end benchmarks of a Listener against a real server.

pytest-benchmark suite, not part of the test-suite; run with::

    python -m pytest benchmarks -p no:cacheprovider --benchmark-only

Uses the ``pg_server`` fixture of ``tests/fix_db.py`` (a private cluster, or
``PGLISTEN_FAST_TEST_DSN``).  Each round is a burst of :data:`N` notifications of
32 bytes queued in one transaction:

* ``from_commit``: the timed part is COMMIT + receiving all N through
  ``get_batch`` (the notifications were generated, uncommitted, in the
  untimed setup);
* ``drain_buffered``: the burst is committed and fully buffered in the
  subscription's ring during setup; the timed part is only ``get_batch``
  turning the records into Notification objects.

``extra_info`` holds the rate in notifications per second of each round's
minimum time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl

N = 100_000
CHANNEL = "bench_e2e"
BURST_SQL = (
    "SELECT count(pg_notify(%s, lpad(i::text, 32, '0'))) "
    "FROM generate_series(1, %s) AS i"
)


@pytest.fixture(scope="module")
def subscription(pg_server: Any) -> Iterator[tuple[pgl.Listener, pgl.Subscription]]:
    with pgl.Listener(pg_server.dsn) as listener:
        sub = listener.listen(CHANNEL)
        marker = sub.get(timeout=30)
        assert marker.reason == "listen"
        yield listener, sub


@pytest.fixture(scope="module")
def sender(pg_server: Any) -> Iterator[psycopg.Connection[TupleRow]]:
    conn = psycopg.connect(pg_server.dsn)
    try:
        yield conn
    finally:
        conn.close()


def receive(sub: pgl.Subscription, n: int) -> int:
    got = 0
    while got < n:
        batch = sub.get_batch(max_items=65536, timeout=30)
        if not batch:
            raise AssertionError(f"only {got} of {n} notifications in 30 s")
        for item in batch:
            if not item.connection_reset:
                got += 1
    return got


def record_rate(benchmark: Any) -> None:
    """Store N / fastest round in ``extra_info`` (absent with --benchmark-disable)."""
    if benchmark.stats is not None:
        benchmark.extra_info["notifications_per_s"] = N / benchmark.stats.stats.min


@pytest.mark.benchmark(group="listener-burst-100k")
def test_burst_from_commit(
    benchmark: Any,
    subscription: tuple[pgl.Listener, pgl.Subscription],
    sender: psycopg.Connection[TupleRow],
) -> None:
    _listener, sub = subscription

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        sender.execute(BURST_SQL, (CHANNEL, N))  # queued, not yet committed
        return (), {}

    def run() -> int:
        sender.commit()
        return receive(sub, N)

    assert benchmark.pedantic(run, setup=setup, rounds=5, iterations=1) == N
    record_rate(benchmark)
    assert sub.stats.dropped == 0


@pytest.mark.benchmark(group="listener-burst-100k")
def test_drain_buffered(
    benchmark: Any,
    subscription: tuple[pgl.Listener, pgl.Subscription],
    sender: psycopg.Connection[TupleRow],
) -> None:
    listener, sub = subscription

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        target = listener.stats.received + N
        sender.execute(BURST_SQL, (CHANNEL, N))
        sender.commit()
        deadline = time.monotonic() + 30
        while listener.stats.received < target:
            if time.monotonic() > deadline:
                raise AssertionError("the burst did not arrive within 30 s")
            time.sleep(0.005)
        return (), {}

    assert benchmark.pedantic(lambda: receive(sub, N), setup=setup, rounds=5,
                              iterations=1) == N
    record_rate(benchmark)
    assert sub.stats.dropped == 0
