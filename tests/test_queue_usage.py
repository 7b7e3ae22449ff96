"""The server's notification queue, watched through the health checks.

One cluster-wide queue holds every notification until the slowest
listening session has read it; a session that LISTENs and then sits in a
long transaction holds it back.  Here such a session fills the queue
measurably: the listener's ``stats.queue_usage`` shows it, a WARNING says
so past ``queue_warning``, and an INFO line follows once it drains.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import listen_ready, wait_until

Conn = psycopg.Connection[TupleRow]

#: 3,000 payloads of 8,000 bytes: about 24 MB, 0.3 % of the default 8 GB.
N, SIZE = 3000, 7990


@pytest.fixture
def holder(dsn: str) -> Iterator[Conn]:
    """A session that LISTENs, then holds the queue back in a transaction."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("LISTEN held_back")
        c.execute("BEGIN")
        c.execute("SELECT 1")
        yield c


def _usage(listener: pgl.Listener) -> float:
    usage = listener.stats.queue_usage
    assert usage is not None
    return usage


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def test_queue_usage_is_sampled_and_warned(
    dsn: str, conn: Conn, holder: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pglisten_fast")
    with pgl.Listener(dsn, health_check_interval=0.1,
                      queue_warning=0.001) as listener:
        listen_ready(listener, "held_back", buffer_size=64 * 2**20)
        wait_until(lambda: listener.stats.queue_usage is not None,
                   message="a first sample")
        before = listener.stats.queue_usage
        assert before is not None and before < 0.001

        pgl.notify_many(conn, "held_back",
                        [f"{i:06d}" + "x" * SIZE for i in range(N)])
        wait_until(lambda: _usage(listener) > 0.002,
                   message="the queue fills while a session holds it back")
        usage = listener.stats.queue_usage
        assert usage is not None and 0.002 < usage < 0.05
        wait_until(lambda: _events(caplog, "queue_high"))
        (high,) = _events(caplog, "queue_high")
        assert high.levelno == logging.WARNING
        assert "notification queue" in high.getMessage()

        holder.execute("ROLLBACK")        # the held-back session reads again
        holder.close()
        pgl.notify(conn, "held_back", "nudge")
        wait_until(lambda: _usage(listener) < 0.001,
                   message="the queue drains once nobody holds it back")
        wait_until(lambda: _events(caplog, "queue_normal"))
        # The listener itself read everything all along.
        wait_until(lambda: listener.stats.received == N + 1)


def test_queue_usage_is_sampled_under_steady_traffic(dsn: str, conn: Conn) -> None:
    # Notifications every few milliseconds never leave the connection idle
    # for a whole health-check interval: the checks run on a schedule anyway.
    import threading

    stop = threading.Event()

    def trickle() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            i = 0
            while not stop.wait(0.005):
                pgl.notify(c, "busy", str(i))
                i += 1

    with pgl.Listener(dsn, health_check_interval=0.2) as listener:
        listen_ready(listener, "busy")
        t = threading.Thread(target=trickle)
        t.start()
        try:
            wait_until(lambda: listener.stats.received > 20, message="traffic")
            wait_until(lambda: listener.stats.queue_usage is not None,
                       message="a queue sample despite the traffic")
        finally:
            stop.set()
            t.join()
