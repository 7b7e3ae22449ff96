"""Resilience: reconnects, health checks, overflow policies, stop() under faults.

Every test runs against a real PostgreSQL server: the session cluster of
``tests/fix_db.py``, a TCP proxy in front of it (``tests/fix_proxy.py``) to
black-hole or reset the path, or a private cluster that starts late.  The
checks follow the contract of DESIGN.md, "Ordering and marker rules" and
"Precise semantics":

- one ``"reconnect"`` marker per channel after every reconnect, queued after
  LISTEN is back in effect, so nothing committed after it is missed;
- the first marker of a channel is ``"listen"``, also when the subscription
  was made while the server was down;
- ``overflow="drop"`` loses notifications only where an ``"overflow"``
  marker stands, whose ``dropped`` is exactly the size of the gap there;
  ``overflow="block"`` loses nothing while the connection holds;
- memory stays bounded by the buffers, and ``stop()`` returns promptly in
  every state.

Notifications carry sequence numbers as payloads so that order, gaps and
accounting can be checked exactly.  Timing only enters assertions as
generous upper bounds.

Not covered here: recovery from an unexpected exception inside the
selector thread (no clean way to provoke one from outside the library), and
LISTEN refused by a hot standby (needs a streaming replica).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from pglisten_fast.testing import TempCluster
from tests.fix_db import PgServer
from tests.fix_proxy import Proxy
from tests.helpers import (
    TIMEOUT,
    Worker,
    collect,
    expect_marker,
    expect_markers,
    listen_ready,
    wait_until,
)

#: Bound on each connection attempt in these tests (libpq's minimum is 2 s).
CONNECT_TIMEOUT = 2.0
#: Fast reconnects for tests: the first retry after 50 ms, never above 0.5 s.
FAST_RECONNECT: dict[str, Any] = {
    "reconnect_delay": 0.05,
    "max_reconnect_delay": 0.5,
    "connect_timeout": CONNECT_TIMEOUT,
}
#: Health checks tight enough for a black-holed path to be found in < 1 s.
HC_INTERVAL = 0.3
HC_TIMEOUT = 0.5
#: Upper bound on stop() in every state (the contract says "about a second").
STOP_BOUND = 3.0
#: What ``last_error`` says when the server side of the connection went away.
LOSS_RE = re.compile(r"terminat|closed|lost|reset|EOF|shut", re.IGNORECASE)
#: Width of the zero-padded sequence number at the start of the payloads.
SEQ_WIDTH = 7
MIB = 2**20


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def running_listener(
    conninfo: str, *, wait: bool = True, **kwargs: Any
) -> Iterator[pgl.Listener]:
    """A started Listener with fast reconnects (overridable), stopped afterwards."""
    options: dict[str, Any] = {**FAST_RECONNECT, **kwargs}
    listener = pgl.Listener(conninfo, **options)
    listener.start(wait=wait)
    try:
        yield listener
    finally:
        listener.stop(timeout=10)


def seq_payloads(start: int, count: int, size: int = 0) -> list[str]:
    """Payloads ``start .. start+count-1``, zero-padded, right-filled to ``size``."""
    fill = max(0, size - SEQ_WIDTH - 1)
    tail = ":" + "x" * fill if size else ""
    return [f"{i:0{SEQ_WIDTH}d}{tail}" for i in range(start, start + count)]


def seq_of(n: pgl.Notification) -> int:
    """The sequence number a payload of :func:`seq_payloads` starts with."""
    return int(n.payload[:SEQ_WIDTH])


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def drain_until(
    sub: pgl.Subscription,
    done: Callable[[list[pgl.Notification]], bool],
    timeout: float = TIMEOUT,
) -> list[pgl.Notification]:
    """Read items with ``get_batch`` until ``done(items)`` holds."""
    items: list[pgl.Notification] = []
    deadline = time.monotonic() + timeout
    while not done(items):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"condition not met within {timeout} s after {len(items)} items"
            )
        items += sub.get_batch(max_items=4096, timeout=min(left, 1.0))
    return items


def assert_quiet(sub: pgl.Subscription, wait: float = 0.2) -> None:
    """Nothing more is buffered or arrives within ``wait`` seconds."""
    with pytest.raises(pgl.Empty):
        extra = sub.get(timeout=wait)
        raise AssertionError(f"unexpected extra item {extra!r}")


def notify_interleaved(
    conn: psycopg.Connection[TupleRow], channels: Iterable[str], count: int
) -> list[tuple[str, str]]:
    """Send ``count`` rounds over ``channels`` in one transaction; return them."""
    sent: list[tuple[str, str]] = []
    with conn.transaction():
        for i in range(count):
            for ch in channels:
                pgl.notify(conn, ch, str(i))
                sent.append((ch, str(i)))
    return sent


class ConnectedWatcher:
    """Record every change of ``listener.connected`` seen by a 2 ms poller."""

    def __init__(self, listener: pgl.Listener) -> None:
        self._listener = listener
        self.values: list[bool] = [listener.connected]
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="connected-watcher", daemon=True
        )

    def _run(self) -> None:
        stopping = False
        while not stopping:
            stopping = self._stop.wait(0.002)  # one last sample after stop
            value = self._listener.connected
            if value != self.values[-1]:
                self.values.append(value)

    def __enter__(self) -> ConnectedWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


def assert_stopped(listener: pgl.Listener, *subs: pgl.Subscription) -> None:
    """The state DESIGN.md promises after ``stop()``."""
    assert not listener.running
    assert not listener.connected
    assert listener.backend_pid is None
    assert listener.channels == frozenset()
    for sub in subs:
        assert sub.closed, sub
    with pytest.raises(pgl.Closed):
        listener.listen("fault_after_stop")


def timed_stop(listener: pgl.Listener) -> float:
    """Call ``stop()`` and return how long it took."""
    t0 = time.monotonic()
    listener.stop()
    return time.monotonic() - t0


def backend_alive(conn: psycopg.Connection[TupleRow], pid: int) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return row is not None and row[0] > 0


# ---------------------------------------------------------------------------
# 1-2. reconnect after a lost backend or a server restart
# ---------------------------------------------------------------------------


def test_terminated_backend_gives_one_reconnect_marker_per_channel(
    dsn: str,
    conn: psycopg.Connection[TupleRow],
    terminate_backend: Callable[[int], bool],
) -> None:
    channels = ("fault_term_a", "fault_term_b")
    with running_listener(dsn) as listener:
        sub = listen_ready(listener, *channels)
        pgl.notify(conn, channels[0], "before")
        assert sub.get(timeout=TIMEOUT).payload == "before"
        old_pid = listener.backend_pid
        assert old_pid is not None

        assert terminate_backend(old_pid)
        markers = expect_markers(sub, "reconnect")
        assert all(m.connection_reset for m in markers)

        new_pid = listener.backend_pid
        assert new_pid is not None and new_pid != old_pid
        assert listener.connected
        assert listener.channels == frozenset(channels)

        # Everything committed after the markers arrives, in order, and no
        # second marker shows up among (or after) them.
        sent = notify_interleaved(conn, channels, 100)
        items = collect(sub, len(sent))
        assert [(n.channel, n.payload) for n in items] == sent
        assert not any(n.connection_reset for n in items)
        assert_quiet(sub)

        stats = listener.stats
        assert stats.connects == 2
        assert stats.reconnects == 1
        assert stats.last_error is not None and LOSS_RE.search(stats.last_error), (
            stats.last_error
        )
        assert stats.dropped == 0
        sub_stats = sub.stats
        assert sub_stats.markers == 4  # two "listen", two "reconnect"
        assert sub_stats.delivered == 1 + len(sent)
        assert sub_stats.dropped == 0


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_reconnects_with_markers(
    dsn: str, restart_server: Callable[..., None], mode: str
) -> None:
    channels = ("fault_restart_a", "fault_restart_b")
    with running_listener(dsn) as listener:
        sub = listen_ready(listener, *channels)
        old_pid = listener.backend_pid
        with ConnectedWatcher(listener) as watcher:
            restart_server(mode)  # returns once the server accepts connections
            expect_markers(sub, "reconnect", timeout=30)
        assert watcher.values == [True, False, True]
        assert listener.connected
        assert listener.backend_pid not in (None, old_pid)
        assert listener.channels == frozenset(channels)

        # The old `conn` fixture would be dead after the restart: new sender.
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as sender:
            sent = notify_interleaved(sender, channels, 50)
        items = collect(sub, len(sent))
        assert [(n.channel, n.payload) for n in items] == sent
        assert_quiet(sub)

        stats = listener.stats
        assert stats.connects == 2
        assert stats.reconnects == 1
        # The loss, or a later attempt refused while the server was down.
        assert stats.last_error is not None


# ---------------------------------------------------------------------------
# 3. a black-holed or reset network path
# ---------------------------------------------------------------------------


def test_blackholed_path_is_found_by_the_health_check(
    proxy: Proxy, conn: psycopg.Connection[TupleRow]
) -> None:
    with running_listener(
        proxy.dsn, health_check_interval=HC_INTERVAL, health_check_timeout=HC_TIMEOUT
    ) as listener:
        sub = listen_ready(listener, "fault_blackhole")
        pgl.notify(conn, "fault_blackhole", "through the proxy")
        assert sub.get(timeout=TIMEOUT).payload == "through the proxy"
        old_pid = listener.backend_pid

        # The proxy's kernel keeps ACKing: no TCP error will ever come, only
        # the unanswered ping can tell.
        proxy.blackhole()
        seen: list[str] = []

        def detected() -> bool:
            err = listener.stats.last_error or ""
            if not listener.connected and "health check" in err:
                seen.append(err)
                return True
            return False

        with contextlib.suppress(AssertionError):  # reported just below
            wait_until(detected, timeout=HC_INTERVAL + HC_TIMEOUT + 5)
        assert seen, (
            f"black hole not detected: connected={listener.connected}, "
            f"last_error={listener.stats.last_error!r}"
        )
        assert listener.backend_pid is None
        assert listener.channels == frozenset()
        # Reconnect attempts go into the black hole too: no marker meanwhile.
        assert_quiet(sub, wait=0.5)

        proxy.restore()
        expect_markers(sub, "reconnect", timeout=15)
        assert listener.connected
        assert listener.backend_pid not in (None, old_pid)

        sent = seq_payloads(0, 200)
        pgl.notify_many(conn, "fault_blackhole", sent)
        assert [n.payload for n in collect(sub, len(sent))] == sent
        assert_quiet(sub)
        stats = listener.stats
        assert stats.reconnects == 1
        assert stats.connects == 2


def test_reset_connection_is_detected_promptly(
    proxy: Proxy, conn: psycopg.Connection[TupleRow]
) -> None:
    # Health checks far away: only the socket error can reveal the reset.
    with running_listener(
        proxy.dsn, health_check_interval=60, health_check_timeout=5
    ) as listener:
        sub = listen_ready(listener, "fault_rst_a", "fault_rst_b")
        old_pid = listener.backend_pid
        t0 = time.monotonic()
        proxy.disconnect()
        expect_markers(sub, "reconnect", timeout=TIMEOUT)
        assert time.monotonic() - t0 < 5.0
        assert listener.backend_pid not in (None, old_pid)

        sent = notify_interleaved(conn, ("fault_rst_a", "fault_rst_b"), 50)
        items = collect(sub, len(sent))
        assert [(n.channel, n.payload) for n in items] == sent
        assert_quiet(sub)
        stats = listener.stats
        assert stats.reconnects == 1
        assert stats.last_error is not None and LOSS_RE.search(stats.last_error), (
            stats.last_error
        )


# ---------------------------------------------------------------------------
# 4. server down at start
# ---------------------------------------------------------------------------


def test_server_down_at_start_then_up_gives_listen_marker() -> None:
    cluster = TempCluster(port=free_port())  # created, not started: nothing listens
    try:
        with running_listener(cluster.dsn, wait=False) as listener:
            assert not listener.connected
            assert listener.backend_pid is None
            sub = listener.listen("fault_late")
            assert sub.channels == ("fault_late",)
            with pytest.raises(pgl.Empty):
                sub.get(timeout=0.2)
            wait_until(
                lambda: listener.stats.last_error is not None,
                message="failed connection attempts are not reported",
            )
            assert listener.stats.connects == 0
            assert not listener.connected

            cluster.start()  # initdb + start: the listener keeps retrying meanwhile
            # The first marker is always "listen", never "reconnect".
            expect_marker(sub, "fault_late", "listen", timeout=30)
            assert listener.connected
            assert listener.backend_pid is not None
            assert listener.channels == frozenset({"fault_late"})

            with cluster.connect() as sender:
                sent = seq_payloads(0, 100)
                pgl.notify_many(sender, "fault_late", sent)
            assert [n.payload for n in collect(sub, len(sent))] == sent
            assert_quiet(sub)
            stats = listener.stats
            assert stats.connects == 1
            assert stats.reconnects == 0
    finally:
        cluster.close()


def test_start_wait_raises_connect_error_when_refused() -> None:
    listener = pgl.Listener(
        f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres",
        **FAST_RECONNECT,
    )
    t0 = time.monotonic()
    with pytest.raises(pgl.ConnectError) as info:
        listener.start(wait=True)
    assert time.monotonic() - t0 < CONNECT_TIMEOUT + 3
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert_stopped(listener)


def test_start_wait_raises_connect_error_when_blackholed(proxy: Proxy) -> None:
    proxy.blackhole()  # the TCP handshake succeeds, the startup never answers
    listener = pgl.Listener(proxy.dsn, **FAST_RECONNECT)
    t0 = time.monotonic()
    with pytest.raises(pgl.ConnectError) as info:
        listener.start(wait=True)
    assert time.monotonic() - t0 < CONNECT_TIMEOUT + 3
    assert info.value.__cause__ is not None
    assert_stopped(listener)


# ---------------------------------------------------------------------------
# 5-7. slow consumers: "drop", "block", bounded memory
# ---------------------------------------------------------------------------


def audit_drop_stream(
    items: list[pgl.Notification], channel: str
) -> tuple[int, int, int, int]:
    """Check order and gap accounting of a ``"drop"`` stream starting at seq 0.

    The overflow markers must account exactly for the gap where they stand:
    the notification after a run of adjacent markers has sequence number
    ``previous + 1 + sum(dropped)``.  Returns ``(delivered, dropped,
    markers, episodes)``, where an episode is a run of adjacent overflow
    markers (one gap); ``delivered + dropped`` is the next sequence number.
    """
    expected = 0
    delivered = dropped = markers = episodes = 0
    previous_was_marker = False
    for pos, n in enumerate(items):
        assert n.channel == channel, n
        if n.connection_reset:
            assert n.reason == "overflow", (pos, n)
            assert n.dropped > 0, (pos, n)
            assert n.payload == "" and n.pid == 0, (pos, n)
            expected += n.dropped
            dropped += n.dropped
            markers += 1
            episodes += not previous_was_marker
            previous_was_marker = True
        else:
            assert n.reason is None and n.dropped == 0, (pos, n)
            assert seq_of(n) == expected, (
                f"item {pos}: seq {seq_of(n)}, expected {expected} "
                "(a gap without a marker, or a marker with a wrong count)"
            )
            expected += 1
            delivered += 1
            previous_was_marker = False
    return delivered, dropped, markers, episodes


def test_drop_policy_marks_every_gap_exactly(
    dsn: str, conn: psycopg.Connection[TupleRow]
) -> None:
    channel = "fault_drop"
    rounds = (30_000, 10_000, 10_000)
    total = sum(rounds)
    with running_listener(dsn) as listener:
        small = listen_ready(listener, channel, buffer_size=64 * 1024, overflow="drop")
        big = listen_ready(listener, channel, buffer_size=16 * MIB)
        assert small.buffer_size == 64 * 1024
        received0 = listener.stats.received

        items: list[pgl.Notification] = []
        sent = 0
        for count in rounds:
            # One transaction per round, ~100-byte payloads, consumer idle.
            pgl.notify_many(conn, channel, seq_payloads(sent, count, size=100))
            sent += count
            target = received0 + sent
            wait_until(lambda: listener.stats.received >= target, timeout=30)  # noqa: B023
            assert small.stats.buffered_bytes <= small.buffer_size
            if sent < total:
                # Free some space: the owed overflow marker goes there, then
                # the next round fills the ring again.
                items += small.get_batch(max_items=150, timeout=TIMEOUT)

        # Everything was routed; nothing new will be sent.  Draining must
        # also bring the overflow marker owed at the very end of the stream.
        def accounted(got: list[pgl.Notification]) -> bool:
            done = items + got
            n_notes = sum(1 for n in done if not n.connection_reset)
            return n_notes + sum(n.dropped for n in done) >= total

        items += drain_until(small, accounted, timeout=30)
        assert_quiet(small)

        delivered, dropped, markers, episodes = audit_drop_stream(items, channel)
        assert delivered + dropped == total
        # Each round overflowed the ring once: one gap per round.  (Several
        # adjacent markers may share one gap, see the test below.)
        assert episodes == len(rounds)
        last = items[-1]
        assert last.reason == "overflow", f"final gap has no marker: {last!r}"

        sub_stats = small.stats
        assert sub_stats.delivered == delivered
        assert sub_stats.dropped == dropped
        assert sub_stats.markers == markers + 1  # + the "listen" marker
        assert sub_stats.buffered_bytes == 0
        assert listener.stats.dropped == dropped

        # Isolation: the big subscription on the same channel got everything.
        everything = collect(big, total, timeout=30)
        assert not any(n.connection_reset for n in everything)
        assert [seq_of(n) for n in everything] == list(range(total))
        assert big.stats.dropped == 0
        assert_quiet(big)
        assert listener.stats.reconnects == 0


def test_drop_policy_one_marker_per_gap(
    dsn: str, conn: psycopg.Connection[TupleRow]
) -> None:
    total = 5_000
    channel = "fault_drop_one"
    with running_listener(dsn) as listener:
        sub = listen_ready(listener, channel, buffer_size=64 * 1024, overflow="drop")
        pgl.notify_many(conn, channel, seq_payloads(0, total, size=100))
        wait_until(lambda: listener.stats.received >= total)

        def accounted(got: list[pgl.Notification]) -> bool:
            n_notes = sum(1 for n in got if not n.connection_reset)
            return n_notes + sum(n.dropped for n in got) >= total

        items = drain_until(sub, accounted)
        assert_quiet(sub)
        delivered, dropped, _, _ = audit_drop_stream(items, channel)
        assert delivered + dropped == total and dropped > 0
        # DESIGN rule 4: a marker "with the count" stands where the gap is:
        # the ring overflowed once, so the stream is 0..k-1 then ONE marker
        # whose count is the whole gap.
        markers = [n for n in items if n.connection_reset]
        assert [m.dropped for m in markers] == [total - delivered]
        assert items[-1].connection_reset


def test_block_policy_loses_nothing(
    dsn: str, conn: psycopg.Connection[TupleRow]
) -> None:
    total = 50_000
    # A query outstanding when the ring fills is covered by
    # test_listen_while_block_ring_full_keeps_connection.
    with running_listener(dsn) as listener:
        blocked = listen_ready(
            listener, "fault_block", buffer_size=64 * 1024, overflow="block"
        )
        other = listen_ready(listener, "fault_block_other", overflow="drop")
        pgl.notify_many(conn, "fault_block", seq_payloads(0, total, size=100))
        pgl.notify_many(conn, "fault_block_other", seq_payloads(0, 100))

        # The consumer does not read until its ring is full.
        capacity = blocked.buffer_size
        wait_until(
            lambda: blocked.stats.buffered_bytes >= capacity - 4096,
            timeout=30,
            message="the block ring never filled",
        )
        assert blocked.stats.dropped == 0
        # While the ring is full the selector stops reading the socket, so
        # `other` is stalled as well: expected (DESIGN.md rule 4); no timing
        # is asserted about it, only that it is served once the ring drains.
        items = collect(blocked, total, timeout=60)
        assert not any(n.connection_reset for n in items)
        assert [seq_of(n) for n in items] == list(range(total))
        assert_quiet(blocked)
        assert blocked.stats.dropped == 0
        assert blocked.stats.delivered == total

        assert [seq_of(n) for n in collect(other, 100, timeout=30)] == list(range(100))
        assert_quiet(other)
        stats = listener.stats
        assert stats.dropped == 0
        assert stats.reconnects == 0


def test_listen_while_block_ring_full_keeps_connection(
    dsn: str, conn: psycopg.Connection[TupleRow]
) -> None:
    total = 50_000
    with running_listener(
        dsn, health_check_interval=HC_INTERVAL, health_check_timeout=HC_TIMEOUT
    ) as listener:
        blocked = listen_ready(
            listener, "fault_block_listen", buffer_size=64 * 1024, overflow="block"
        )
        pgl.notify_many(conn, "fault_block_listen", seq_payloads(0, total))
        wait_until(lambda: blocked.stats.buffered_bytes >= blocked.buffer_size - 4096)

        # A new subscription while reading is paused.  Its LISTEN cannot be
        # confirmed before the block consumer frees space: that must not be
        # mistaken for a dead connection.
        late = listener.listen("fault_block_late")
        early: pgl.Notification | None
        try:
            early = late.get(timeout=HC_TIMEOUT * 4)
        except pgl.Empty:
            early = None
        stats = listener.stats
        assert stats.reconnects == 0, f"connection dropped: {stats.last_error}"
        assert early is None, f"LISTEN confirmed while reading was paused: {early!r}"

        items = collect(blocked, total, timeout=60)
        # Nothing may be lost while the server connection is healthy.
        assert [n.reason for n in items if n.connection_reset] == []
        assert [seq_of(n) for n in items] == list(range(total))
        expect_marker(late, "fault_block_late", "listen")
        assert listener.stats.reconnects == 0


def test_memory_stays_bounded_with_stalled_drop_consumer(
    dsn: str, conn: psycopg.Connection[TupleRow]
) -> None:
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm (Linux)")
    total, batch = 200_000, 20_000
    with running_listener(dsn) as listener:
        sub = listen_ready(
            listener, "fault_memory", buffer_size=1 * MIB, overflow="drop"
        )
        # Warm-up: first-use allocations of the sender and the selector.
        pgl.notify_many(conn, "fault_memory", [f"w{i}" for i in range(batch)])
        wait_until(lambda: listener.stats.received >= batch, timeout=30)

        before = rss_bytes()
        for start in range(0, total, batch):
            pgl.notify_many(conn, "fault_memory", seq_payloads(start, batch, size=100))
        wait_until(lambda: listener.stats.received >= batch + total, timeout=60)
        growth = rss_bytes() - before

        assert growth <= sub.buffer_size + 20 * MIB, (
            f"RSS grew by {growth / MIB:.1f} MiB"
        )
        stats = sub.stats
        assert stats.buffered_bytes <= sub.buffer_size
        assert stats.dropped > 0  # the consumer really was stalled
        assert stats.dropped == listener.stats.dropped


# ---------------------------------------------------------------------------
# 8. stop() in every state
# ---------------------------------------------------------------------------


def test_stop_when_connected_and_idle(
    dsn: str, conn: psycopg.Connection[TupleRow]
) -> None:
    listener = pgl.Listener(dsn, **FAST_RECONNECT).start()
    sub = listen_ready(listener, "fault_stop_idle")
    pid = listener.backend_pid
    assert pid is not None
    assert timed_stop(listener) < STOP_BOUND
    assert_stopped(listener, sub)
    with pytest.raises(pgl.Closed):
        sub.get(timeout=1)
    # The server session is closed too.
    wait_until(lambda: not backend_alive(conn, pid), message="backend still alive")
    listener.stop()  # idempotent
    assert_stopped(listener, sub)


def test_stop_during_long_reconnect_backoff(
    dsn: str, terminate_backend: Callable[[int], bool]
) -> None:
    listener = pgl.Listener(dsn, reconnect_delay=30, max_reconnect_delay=30).start()
    sub = listen_ready(listener, "fault_stop_backoff")
    pid = listener.backend_pid
    assert pid is not None
    assert terminate_backend(pid)
    wait_until(lambda: not listener.connected)
    assert listener.stats.connects == 1  # waiting ~30 s before the next attempt
    assert timed_stop(listener) < STOP_BOUND
    assert_stopped(listener, sub)
    assert listener.stats.connects == 1


def test_stop_while_connection_attempt_hangs(proxy: Proxy) -> None:
    proxy.blackhole()  # accepted, never answered: the attempt hangs 10 s
    listener = pgl.Listener(proxy.dsn, reconnect_delay=0.05, connect_timeout=10)
    listener.start(wait=False)
    sub = listener.listen("fault_stop_connecting")
    wait_until(lambda: proxy.connection_count >= 1, message="no connection attempt")
    assert not listener.connected
    assert timed_stop(listener) < STOP_BOUND
    assert_stopped(listener, sub)
    with pytest.raises(pgl.Closed):
        sub.get(timeout=1)


def test_stop_wakes_a_consumer_blocked_in_get(dsn: str) -> None:
    listener = pgl.Listener(dsn, **FAST_RECONNECT).start()
    sub = listen_ready(listener, "fault_stop_consumer")
    waiter = Worker(sub.get, name="blocked-consumer")
    assert not waiter.done.wait(0.2), "get() returned with nothing sent"
    assert timed_stop(listener) < STOP_BOUND
    with pytest.raises(pgl.Closed):
        waiter.join(STOP_BOUND)
    assert_stopped(listener, sub)


def test_stop_with_block_ring_full_and_reading_paused(
    dsn: str, conn: psycopg.Connection[TupleRow]
) -> None:
    listener = pgl.Listener(dsn, **FAST_RECONNECT).start()
    sub = listen_ready(
        listener, "fault_stop_block", buffer_size=64 * 1024, overflow="block"
    )
    pgl.notify_many(conn, "fault_stop_block", seq_payloads(0, 5_000, size=100))
    wait_until(lambda: sub.stats.buffered_bytes >= sub.buffer_size - 4096)
    assert timed_stop(listener) < STOP_BOUND
    assert_stopped(listener, sub)
    # What was buffered can still be read, in order, then Closed.
    items: list[pgl.Notification] = []
    with pytest.raises(pgl.Closed):
        while True:
            items += sub.get_batch(max_items=4096, timeout=1)
    assert items, "the full ring was emptied by stop()"
    assert [seq_of(n) for n in items] == list(range(len(items)))


# ---------------------------------------------------------------------------
# 9. logging
# ---------------------------------------------------------------------------


def test_connection_loss_logs_a_warning(
    dsn: str,
    terminate_backend: Callable[[int], bool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pglisten_fast")
    with running_listener(dsn) as listener:
        sub = listen_ready(listener, "fault_log")
        pid = listener.backend_pid
        assert pid is not None
        assert terminate_backend(pid)
        expect_markers(sub, "reconnect")
    warnings = [
        r
        for r in caplog.records
        if r.name == "pglisten_fast"
        and r.levelno == logging.WARNING
        and "reconnecting" in r.getMessage()
    ]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert LOSS_RE.search(warnings[0].getMessage())


# ---------------------------------------------------------------------------
# 10. soak: millions of notifications with backends killed along the way
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_with_repeated_backend_kills(pg_server: PgServer) -> None:
    total, batch = 2_000_000, 20_000
    kill_every = 300_000
    max_kills = (total - 1) // kill_every  # at seq 300k, 600k, ... 1.8M
    window = 100_000  # the producer stays at most this far ahead of the consumer
    channel = "fault_soak"

    with (
        running_listener(pg_server.dsn) as listener,
        psycopg.connect(pg_server.dsn, autocommit=True, connect_timeout=10) as control,
    ):
        sub = listen_ready(listener, channel, buffer_size=8 * MIB)
        cond = threading.Condition()
        progress = {"ack": 0, "sent": 0}
        stop = threading.Event()

        def produce() -> None:
            with psycopg.connect(
                pg_server.dsn, autocommit=True, connect_timeout=10
            ) as c:
                for start in range(0, total, batch):
                    with cond:
                        cond.wait_for(
                            lambda: (
                                start - progress["ack"] <= window  # noqa: B023
                                or stop.is_set()
                            )
                        )
                    if stop.is_set():
                        return
                    # One transaction per batch (autocommit statement).
                    pgl.notify_many(
                        c, channel, [str(i) for i in range(start, start + batch)]
                    )
                    with cond:
                        progress["sent"] = start + batch

        producer = Worker(produce, name="soak-producer")
        try:
            last = -1  # last sequence number seen
            gap_ok = False  # a reconnect marker came since the last notification
            delivered = kills = reconnect_markers = 0
            rss_first: int | None = None
            end_sent = False
            deadline = time.monotonic() + 120
            while True:
                assert time.monotonic() < deadline, f"soak stuck at seq {last}"
                finished = False
                for n in sub.get_batch(max_items=4096, timeout=0.5):
                    if n.connection_reset:
                        assert n.reason == "reconnect", n
                        reconnect_markers += 1
                        gap_ok = True
                        with cond:  # what was in flight is lost: let the producer go on
                            progress["ack"] = max(progress["ack"], progress["sent"])
                            cond.notify_all()
                        continue
                    if n.payload == "end":
                        assert last == total - 1 or gap_ok, f"tail lost after {last}"
                        finished = True
                        break
                    seq = int(n.payload)
                    assert seq > last, f"order broken: {seq} after {last}"
                    assert seq == last + 1 or gap_ok, (
                        f"gap {last} -> {seq} without a reconnect marker"
                    )
                    last, gap_ok = seq, False
                    delivered += 1
                if finished:
                    break
                with cond:
                    progress["ack"] = max(progress["ack"], last + 1)
                    cond.notify_all()
                if rss_first is None and delivered >= 500_000:
                    rss_first = rss_bytes()
                if last >= (kills + 1) * kill_every and kills < max_kills:
                    pid = listener.backend_pid
                    if pid is not None and pg_server.terminate_backend(pid):
                        kills += 1
                if (
                    not end_sent
                    and producer.done.is_set()
                    and reconnect_markers == kills
                ):
                    # LISTEN is in effect again after the last kill: the end
                    # marker committed now is certain to arrive.
                    pgl.notify(control, channel, "end")
                    end_sent = True
            rss_last = rss_bytes()
        finally:
            stop.set()
            with cond:
                cond.notify_all()
        producer.join(30)

        assert kills == max_kills
        assert reconnect_markers == kills
        stats = listener.stats
        assert stats.reconnects == kills
        assert stats.connects == kills + 1
        assert stats.dropped == 0 and sub.stats.dropped == 0
        # Only what was committed while disconnected may be missing.
        assert delivered >= total // 2, f"only {delivered} of {total} delivered"
        assert rss_first is not None
        drift = rss_last - rss_first
        assert abs(drift) <= 30 * MIB, f"RSS drifted by {drift / MIB:.1f} MiB"
