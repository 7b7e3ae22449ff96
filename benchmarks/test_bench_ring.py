"""Micro-benchmarks of the ring buffer and the Notification type.

pytest-benchmark suite, not part of the test-suite; run with::

    python -m pytest benchmarks -p no:cacheprovider --benchmark-only

Every benchmark handles a batch of :data:`BATCH` records of 32-byte
payloads, so the per-record cost is the reported time / 10,000.

* ``write``: :meth:`Ring.write` from Python, one cffi call per record (the
  library's producer is the C router; this shows the cffi call cost);
* ``drain``: :meth:`Ring.drain`, records to :class:`Notification` objects in
  C (what ``get_batch`` does), vs :meth:`Ring.drain_raw` (cffi, tuples);
* ``build``: the C-built Notifications of ``drain`` vs building the same
  objects in Python, from raw records or from ready-made values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pglisten_fast import Notification
from pglisten_fast._ring import Ring, Status

BATCH = 10_000
CHANNELS = ("bench",)
PAYLOADS = [b"%032d" % i for i in range(BATCH)]


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring(16 * 2**20)
    yield r
    r.close()


def fill(ring: Ring) -> None:
    write = ring.write
    for p in PAYLOADS:
        write(p, pid=42)


def empty(ring: Ring) -> None:
    while ring.drain_raw(1 << 20):
        pass


@pytest.mark.benchmark(group="ring-write")
def test_write_32b_from_python(benchmark: Any, ring: Ring) -> None:
    def setup() -> tuple[tuple[Ring], dict[str, Any]]:
        empty(ring)
        return (ring,), {}

    benchmark.pedantic(fill, setup=setup, rounds=100, iterations=1)
    assert ring.write(b"x") == Status.OK
    assert len(ring.drain(CHANNELS, 2 * BATCH)) == BATCH + 1


@pytest.mark.benchmark(group="ring-drain")
def test_drain_to_notifications(benchmark: Any, ring: Ring) -> None:
    def setup() -> tuple[tuple[()], dict[str, Any]]:
        empty(ring)
        fill(ring)
        return (), {}

    out = benchmark.pedantic(lambda: ring.drain(CHANNELS, 65536), setup=setup,
                             rounds=100, iterations=1)
    assert len(out) == BATCH
    assert out[-1] == Notification("bench", f"{BATCH - 1:032d}", 42)


@pytest.mark.benchmark(group="ring-drain")
def test_drain_raw(benchmark: Any, ring: Ring) -> None:
    def setup() -> tuple[tuple[()], dict[str, Any]]:
        empty(ring)
        fill(ring)
        return (), {}

    out = benchmark.pedantic(lambda: ring.drain_raw(65536), setup=setup,
                             rounds=100, iterations=1)
    assert len(out) == BATCH
    assert out[-1].payload == PAYLOADS[-1]


@pytest.mark.benchmark(group="notification-build")
def test_build_in_c(benchmark: Any, ring: Ring) -> None:
    """The C drain: decode and build every Notification without Python code."""

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        empty(ring)
        fill(ring)
        return (), {}

    out = benchmark.pedantic(lambda: ring.drain(CHANNELS, 65536), setup=setup,
                             rounds=100, iterations=1)
    assert len(out) == BATCH


@pytest.mark.benchmark(group="notification-build")
def test_build_in_python_from_raw(benchmark: Any, ring: Ring) -> None:
    """drain_raw, then decode and construct each Notification in Python."""

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        empty(ring)
        fill(ring)
        return (), {}

    def build() -> list[Notification]:
        chans = CHANNELS
        return [Notification(chans[r.chan], r.payload.decode(), r.pid)
                for r in ring.drain_raw(65536)]

    out = benchmark.pedantic(build, setup=setup, rounds=100, iterations=1)
    assert len(out) == BATCH
    assert out[-1] == Notification("bench", f"{BATCH - 1:032d}", 42)


@pytest.mark.benchmark(group="notification-build")
def test_build_in_python_from_values(benchmark: Any) -> None:
    """Only the constructor calls, from ready-made str values."""
    values = [p.decode() for p in PAYLOADS]

    def build() -> list[Notification]:
        return [Notification("bench", v, 42) for v in values]

    out = benchmark(build)
    assert len(out) == BATCH
