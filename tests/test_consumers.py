"""Ways to consume a subscription: several consumer threads, a handler.

Four threads share one subscription through ``get``, ``get_batch`` and
iteration (nothing lost, nothing twice); a handler subscription runs on its
own thread, survives a handler exception (logged) and ends with
``unlisten()``.

Passes under both read paths (``PGLISTEN_FAST_IMPL=python`` runs the Python one).
"""

from __future__ import annotations

import logging
import threading

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from pglisten_fast._ring import Ring
from pglisten_fast.subscription import Subscription
from tests.helpers import TIMEOUT, Worker, listen_ready, wait_until

Conn = psycopg.Connection[TupleRow]


# ---------------------------------------------------------------------------
# several consumers
# ---------------------------------------------------------------------------


def test_items_put_back_by_an_iterator_reach_a_sleeping_consumer() -> None:
    """An iterator keeps the rest of its batch in the subscription; a
    consumer already asleep in ``get_batch`` gets those items when it wakes
    (here: on close) instead of ``Closed`` while items remain."""
    ring = Ring(4096)
    sub = Subscription(("ch",), ring, "drop", lambda: None)
    kept = [pgl.Notification("ch", "kept", 7)]
    result: list[object] = []
    sleeper = threading.Thread(
        target=lambda: result.append(sub.get_batch(10, timeout=TIMEOUT)))
    sleeper.start()
    # wake_consumer() is True only once the consumer announced its sleep.
    wait_until(ring.wake_consumer, message="the consumer sleeps")
    sub._keep(kept)
    ring.close()
    sleeper.join(TIMEOUT)
    assert result == [kept]
    with pytest.raises(pgl.Closed):
        sub.get_batch(10, timeout=0)


def test_several_consumers_share_one_subscription(
    listener: pgl.Listener, conn: Conn
) -> None:
    total = 20_000
    sub = listener.listen("consumers")
    lock = threading.Lock()
    per_consumer: list[list[pgl.Notification]] = [[] for _ in range(4)]

    def keep(k: int, items: list[pgl.Notification]) -> None:
        with lock:
            per_consumer[k].extend(items)

    def by_batch(k: int) -> None:
        while True:
            try:
                batch = sub.get_batch(max_items=64, timeout=0.5)
            except pgl.Closed:
                return
            keep(k, batch)

    def by_get(k: int) -> None:
        while True:
            try:
                n = sub.get(timeout=0.5)
            except pgl.Empty:
                continue
            except pgl.Closed:
                return
            keep(k, [n])

    def by_iter(k: int) -> None:
        for n in sub:
            keep(k, [n])

    workers = [
        Worker(lambda: by_batch(0)), Worker(lambda: by_batch(1)),
        Worker(lambda: by_get(2)), Worker(lambda: by_iter(3)),
    ]

    def count() -> int:
        with lock:
            return sum(len(x) for x in per_consumer)

    wait_until(lambda: count() >= 1, message="the listen marker")
    pgl.notify_many(conn, "consumers", [str(i) for i in range(total)])
    wait_until(lambda: count() >= total + 1, timeout=60,
               message="every notification consumed")
    sub.unlisten()
    for w in workers:
        w.join()

    everything = [n for items in per_consumer for n in items]
    markers = [n for n in everything if n.connection_reset]
    assert len(markers) == 1
    assert markers[0].reason == "listen"
    got = [int(n.payload) for n in everything if not n.connection_reset]
    assert len(got) == total                       # no duplicates...
    assert set(got) == set(range(total))           # ...and nothing lost
    # Order is only promised to a single consumer: an iterator parks the rest
    # of its batch after another consumer may have taken newer items, so
    # per-consumer order is not checked here.
    assert sub.stats.delivered == total


# ---------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------


def test_handler_subscription(
    listener: pgl.Listener, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pglisten_fast")
    calls: list[tuple[pgl.Notification, threading.Thread]] = []
    seen_end = threading.Event()

    def handler(n: pgl.Notification) -> None:
        calls.append((n, threading.current_thread()))
        if n.payload == "boom":
            raise RuntimeError("handler failure on purpose")
        if n.payload == "end":
            seen_end.set()

    sub = listener.listen("handled", handler=handler)
    wait_until(lambda: len(calls) >= 1, message="handler called for the marker")
    marker = calls[0][0]
    assert marker.connection_reset
    assert marker.reason == "listen"

    pgl.notify_many(conn, "handled", ["1", "boom", "2", "end"])
    assert seen_end.wait(TIMEOUT)
    assert [n.payload for n, _ in calls[1:]] == ["1", "boom", "2", "end"]
    worker = calls[0][1]
    assert worker is not threading.main_thread()
    assert worker is not threading.current_thread()
    assert all(t is worker for _, t in calls)

    failures = [r for r in caplog.records if r.exc_info is not None
                and isinstance(r.exc_info[1], RuntimeError)]
    assert len(failures) == 1
    assert failures[0].name == "pglisten_fast"
    assert failures[0].levelno == logging.ERROR
    assert "handler failure on purpose" in str(failures[0].exc_info[1])  # type: ignore[index]

    assert worker.is_alive()
    sub.unlisten()
    worker.join(TIMEOUT)
    assert not worker.is_alive(), "the handler thread did not end after unlisten()"

    # Nothing more reaches the handler: a witness subscription sees it instead.
    witness = listen_ready(listener, "handled")
    before = len(calls)
    pgl.notify(conn, "handled", "after-unlisten")
    assert witness.get(timeout=TIMEOUT).payload == "after-unlisten"
    assert len(calls) == before


def _handler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("pglisten-fast-handler-")]


def test_stop_waits_for_handlers_to_finish_what_was_buffered(
    dsn: str, conn: Conn
) -> None:
    seen: list[pgl.Notification] = []
    gate = threading.Event()

    def handler(n: pgl.Notification) -> None:
        gate.wait()          # hold the handler until everything is buffered
        seen.append(n)

    listener = pgl.Listener(dsn).start()
    listener.listen("handled_at_stop", handler=handler)
    wait_until(lambda: "handled_at_stop" in listener.channels)
    pgl.notify_many(conn, "handled_at_stop", [str(i) for i in range(50)])
    wait_until(lambda: listener.stats.received >= 50, message="all routed")
    gate.set()
    listener.stop()
    assert [n.payload for n in seen if not n.connection_reset] == [
        str(i) for i in range(50)
    ]
    assert _handler_threads() == []


def test_stop_timeout_bounds_the_wait_for_a_stuck_handler(dsn: str) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def handler(n: pgl.Notification) -> None:
        entered.set()
        gate.wait()

    listener = pgl.Listener(dsn).start()
    sub = listener.listen("stuck_handler", handler=handler)
    assert entered.wait(TIMEOUT), "the handler got the listen marker"
    listener.stop(timeout=0.2)           # returns although the handler is stuck
    assert sub.closed
    assert [t.is_alive() for t in _handler_threads()] == [True]
    gate.set()                            # the handler ends once released
    wait_until(lambda: _handler_threads() == [], message="handler thread ended")
