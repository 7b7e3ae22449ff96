"""Life cycle beyond start/stop: fork, dropped listeners.

- After ``os.fork()``, the child's inherited Listener and Subscription
  raise :class:`pgl.Error` on every use and never touch the parent's
  connection; the parent goes on as if nothing happened.
- A running Listener the application drops (no ``stop()``) stops its
  thread, closes its connection, and says so with a ``ResourceWarning``.
"""

from __future__ import annotations

import gc
import os
import threading
import warnings
from collections.abc import Callable

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, listen_ready, wait_until

Conn = psycopg.Connection[TupleRow]


def _in_child(body: Callable[[], list[str]]) -> list[str]:
    """Run ``body`` in a forked child; return the lines it reports."""
    rfd, wfd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a multi-threaded process.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(rfd)
            out = "\n".join(body()).encode()
        except BaseException as e:
            out, code = f"child crashed: {e!r}".encode(), 1
        os.write(wfd, out)
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    return report.splitlines()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_inherited_listener_and_subscription_refuse_use_in_a_forked_child(
    dsn: str, conn: Conn
) -> None:
    with pgl.Listener(dsn) as listener:
        sub = listen_ready(listener, "forked")
        parent_pid = listener.backend_pid

        def child() -> list[str]:
            uses: dict[str, Callable[[], object]] = {
                "listen": lambda: listener.listen("other"),
                "connected": lambda: listener.connected,
                "backend_pid": lambda: listener.backend_pid,
                "channels": lambda: listener.channels,
                "stats": lambda: listener.stats,
                "start": listener.start,
                "stop": listener.stop,
                "get": lambda: sub.get(timeout=0),
                "get_batch": lambda: sub.get_batch(timeout=0),
                "iterate": lambda: next(iter(sub)),
                "sub.stats": lambda: sub.stats,
                "unlisten": sub.unlisten,
            }
            report = []
            for name, use in uses.items():
                try:
                    use()
                except pgl.Error as e:
                    ok = "os.fork()" in str(e)
                    report.append(f"{name}: {'refused' if ok else e}")
                else:
                    report.append(f"{name}: allowed")
            del uses
            gc.collect()     # the copies' finalizers must not act either
            return report

        report = _in_child(child)
        assert report == [line.split(":")[0] + ": refused" for line in report]
        assert len(report) == 12

        # The parent's session is untouched.
        assert listener.connected and listener.backend_pid == parent_pid
        pgl.notify(conn, "forked", "after the fork")
        n = sub.get(timeout=TIMEOUT)
        assert (n.payload, n.connection_reset) == ("after the fork", False)
        assert listener.stats.reconnects == 0


def _selector_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pglisten-fast-selector"]


def test_a_dropped_running_listener_stops_and_warns(dsn: str, conn: Conn) -> None:
    before = set(_selector_threads())
    listener = pgl.Listener(dsn).start()
    sub = listen_ready(listener, "dropped")
    pid = listener.backend_pid
    (thread,) = set(_selector_threads()) - before
    with pytest.warns(ResourceWarning, match="dropped while running"):
        del listener             # no gc.collect(): nothing keeps it alive
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert sub.closed
    with pytest.raises(pgl.Closed):
        sub.get(timeout=0)

    def backend_gone() -> bool:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        return row is not None and row[0] == 0

    wait_until(backend_gone, message="the listener's backend ended")


def test_a_dropped_listener_that_was_stopped_says_nothing(dsn: str) -> None:
    listener = pgl.Listener(dsn).start()
    listener.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del listener


def test_subscriptions_do_not_keep_their_listener_alive(dsn: str) -> None:
    listener = pgl.Listener(dsn).start()
    sub = listener.listen("kept")
    with pytest.warns(ResourceWarning):
        del listener
    sub.unlisten()           # harmless once the listener is gone
    assert sub.closed


# ---------------------------------------------------------------------------
# descriptors and memory end with stop() / unlisten(), no garbage collector
# ---------------------------------------------------------------------------


def _kinds() -> dict[str, int]:
    """How many open descriptors of each kind: eventfd, socket, other.

    Helper threads of earlier tests (a connection pool refilling, an
    abandoned connection attempt) may open a socket of their own while a
    test runs, but never an eventfd: those belong to listeners and their
    subscriptions alone.
    """
    out = {"eventfd": 0, "socket": 0, "other": 0}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue            # the listing's own descriptor, now closed
        kind = ("eventfd" if "eventfd" in target
                else "socket" if target.startswith("socket:") else "other")
        out[kind] += 1
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_stopped_listeners_keep_no_descriptors(dsn: str) -> None:
    gc.disable()             # prove that nothing waits for the collector
    try:
        before = _kinds()
        kept = []
        for i in range(25):
            listener = pgl.Listener(dsn).start()
            subs = [listener.listen(f"fd_{i}_{k}") for k in range(3)]
            listener.stop()
            kept.append((listener, subs))     # still referenced
        # Each listener had 1 + 3 eventfds and a socket open: 100 eventfds
        # and 25 sockets would be left (earlier tests' may only close).
        after = _kinds()
        assert after["eventfd"] <= before["eventfd"]
        # A socket left by each of 25 listeners would show; a stray one of
        # another test's helper thread may.
        assert after["socket"] <= before["socket"] + 2, (before, after)
        for _listener, subs in kept:
            assert all(s.closed for s in subs)
    finally:
        gc.enable()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_unlistened_subscriptions_keep_no_descriptors(dsn: str) -> None:
    gc.disable()
    try:
        with pgl.Listener(dsn) as listener:
            before = _kinds()["eventfd"]
            subs = [listen_ready(listener, f"fd_sub_{k}") for k in range(10)]
            assert _kinds()["eventfd"] > before    # one wake-up fd each
            for s in subs:
                s.unlisten()
            wait_until(lambda: _kinds()["eventfd"] <= before,
                       message="every closed subscription's fd is closed")
    finally:
        gc.enable()


def test_a_closed_subscription_releases_its_memory_once_drained(
    dsn: str, conn: Conn
) -> None:
    with pgl.Listener(dsn) as listener:
        sub = listen_ready(listener, "memory", buffer_size=2**20)
        pgl.notify_many(conn, "memory", [f"{i:04d}" + "x" * 1000 for i in range(500)])
        wait_until(lambda: sub.stats.buffered_bytes > 400_000)
        sub.unlisten()
        ring = sub._ring
        assert not ring.released, "buffered items are still readable"
        got = sub.get_batch(max_items=1000, timeout=0)
        assert [n.payload[:4] for n in got] == [f"{i:04d}" for i in range(500)]
        with pytest.raises(pgl.Closed):
            sub.get(timeout=0)
        wait_until(lambda: ring.released, message="the ring's memory is freed")
        assert sub.stats.delivered == 500     # stats survive the release
        assert sub.stats.buffered_bytes == 0


def test_consumers_blocked_at_stop_wake_up_and_end(dsn: str) -> None:
    listener = pgl.Listener(dsn).start()
    sub = listen_ready(listener, "blocked_at_stop")
    outcome: list[object] = []

    def consume() -> None:
        try:
            sub.get()
        except pgl.Closed as e:
            outcome.append(e)

    t = threading.Thread(target=consume)
    t.start()
    listener.stop()
    t.join(TIMEOUT)
    assert not t.is_alive() and isinstance(outcome[0], pgl.Closed)
    wait_until(lambda: sub._ring.released)
