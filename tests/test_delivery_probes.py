"""Delivery probes on a direct connection (``delivery_probes=True``).

Behind a pooler the probes are automatic (tests/test_poolers.py); here they
are forced on a direct connection to check their mechanics: markers wait for
the first probe, the private probe channel never shows, and the periodic
probes of the health check keep a healthy session alive.
"""

from __future__ import annotations

import logging

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, listen_ready, wait_until

Conn = psycopg.Connection[TupleRow]


def test_forced_probes_deliver_and_stay_private(dsn: str, conn: Conn) -> None:
    with pgl.Listener(dsn, delivery_probes=True) as listener:
        sub = listen_ready(listener, "probed")
        assert listener.channels == {"probed"}
        pgl.notify(conn, "probed", "hello")
        n = sub.get(timeout=TIMEOUT)
        assert (n.channel, n.payload) == ("probed", "hello")
        # The second session LISTENs nothing and is the listener's own.
        rows = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
            "'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
        assert rows is not None and rows[0] >= 2


def test_periodic_probes_keep_a_healthy_session(
    dsn: str, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pglisten_fast")
    with pgl.Listener(dsn, delivery_probes=True, health_check_interval=0.1,
                      health_check_timeout=2) as listener:
        sub = listen_ready(listener, "probed_often")
        pid = listener.backend_pid
        wait_until(lambda: len(_probes(caplog)) >= 4,
                   message="the first probe and three periodic ones arrived")
        assert listener.connected and listener.backend_pid == pid
        assert listener.stats.reconnects == 0
        pgl.notify(conn, "probed_often", "still here")
        assert sub.get(timeout=TIMEOUT).payload == "still here"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _probes(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == "probe_arrived"]
