"""Behind a real PgBouncer: what a listener must do when a pooler is in the way.

Every test runs PgBouncer (``tests/fix_pgbouncer.py``) in front of the test
cluster; they are skipped when it is not installed.  The contract is
DESIGN.md, "Input rules" (LISTEN only works on a session the client keeps;
a transaction-mode PgBouncer must end in a clear error or log line, never in
a listener that quietly receives nothing) and "Additions (second release)":

- behind a connection pooler, markers are queued only after delivery from
  another session has been proven, and while pooled, health checks prove
  delivery;
- a transaction pooler ends in ``ConnectError`` (``start(wait=True)``) or a
  logged, retried error (``wait=False``), never in silence;
- publishing (``notify``/``notify_many``) works through a transaction pooler
  with psycopg's defaults: no server-side prepared statements.

What PgBouncer 1.18 does, as observed (and checked by the first tests here):

- ``pool_mode`` changed from ``session`` to ``transaction`` followed by
  ``RELOAD`` applies to clients already connected: at the end of a client's
  next transaction its server connection goes back to the pool, and from
  then on its transactions are multiplexed.  A LISTENing client that sends
  any query (a health-check ping) after the switch keeps an open socket, and
  as long as it runs alone it is even handed the *same* backend again
  (PgBouncer reuses the last released server first): ``pg_backend_pid()`` is
  unchanged and ``pg_listening_channels()`` still lists its channel - but a
  notification that reaches that backend while it sits idle in the pool is
  dropped by PgBouncer ("got packet 'A' from server when not linked"), so
  the client silently stops receiving.  This is the faithful way to make a
  live pooled session stop receiving, used by the periodic-check test.
- ``pg_terminate_backend()`` on the server backend behind a session-mode
  client, and the admin command ``KILL <db>``, close the client's connection
  too: the client sees "server closed the connection unexpectedly".
- ``RECONNECT <db>`` does not touch a session-mode client until it
  disconnects (it keeps receiving); ``PAUSE <db>`` waits for session clients
  to leave (they keep receiving); ``SUSPEND`` holds the traffic and delivers
  it after ``RESUME``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow

import pglisten_fast as pgl
from tests.fix_pgbouncer import Bouncer
from tests.helpers import (
    TIMEOUT,
    Worker,
    collect,
    expect_markers,
    listen_ready,
    payloads,
    wait_until,
)

Conn = psycopg.Connection[TupleRow]
MakeBouncer = Callable[..., Bouncer]

#: Small health-check values, so that the pooler cases are found quickly.
HC_INTERVAL = 1.0
HC_TIMEOUT = 2.0
#: Slack on top of interval + timeout for scheduling, reconnects and CI noise.
MARGIN = 7.0
#: Libpq's minimum connect_timeout.
CONNECT_TIMEOUT = 2.0
FAST: dict[str, Any] = {
    "reconnect_delay": 0.05,
    "max_reconnect_delay": 0.5,
    "connect_timeout": CONNECT_TIMEOUT,
    "health_check_interval": HC_INTERVAL,
    "health_check_timeout": HC_TIMEOUT,
}
#: What the library must say about a transaction pooler.
TRANSACTION_RE = re.compile(r"transaction", re.IGNORECASE)
LOGGER = "pglisten_fast"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def running(conninfo: str, wait: bool = True, **kwargs: Any) -> Iterator[pgl.Listener]:
    """A started listener (``FAST`` settings), stopped on exit."""
    listener = pgl.Listener(conninfo, **{**FAST, **kwargs})
    try:
        listener.start(wait=wait)
        yield listener
    finally:
        listener.stop(timeout=5)


def pooled(bouncer: Bouncer, **kwargs: Any) -> Conn:
    """A psycopg connection through the pooler (psycopg defaults, autocommit)."""
    return psycopg.connect(bouncer.dsn, autocommit=True, connect_timeout=10, **kwargs)


def library_records(
    caplog: pytest.LogCaptureFixture, level: int = logging.WARNING
) -> list[logging.LogRecord]:
    """Records from the library's logger at ``level`` or above."""
    return [
        r for r in caplog.records
        if r.name.split(".")[0] == LOGGER and r.levelno >= level
    ]


def messages(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.levelname}: {r.getMessage()}" for r in records]


def pending_notifies(conn: Conn, timeout: float) -> list[tuple[str, str]]:
    """Notifications a raw psycopg connection receives within ``timeout``."""
    out: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([conn.pgconn.socket], [], [], left)
        if ready:
            conn.pgconn.consume_input()
            while (n := conn.pgconn.notifies()) is not None:
                out.append((n.relname.decode(), n.extra.decode()))
    return out


def assert_markers_deliver(
    sub: pgl.Subscription, conn: Conn, window: float, probe: str
) -> list[pgl.Notification]:
    """Read ``sub`` for ``window`` s; every marker must be followed by delivery.

    A marker promises that what is committed after it is delivered: for each
    one seen, a probe notification is sent through ``conn`` (a direct
    connection) and must arrive within the health-check bound.
    """
    items: list[pgl.Notification] = []
    deadline = time.monotonic() + window
    count = 0
    while (left := deadline - time.monotonic()) > 0:
        for n in sub.get_batch(timeout=left):
            items.append(n)
            if not n.connection_reset:
                continue
            count += 1
            token = f"{probe}-{count}"
            pgl.notify(conn, n.channel, token)
            bound = HC_INTERVAL + HC_TIMEOUT + MARGIN
            try:
                after = collect_payload(sub, token, bound)
            except AssertionError:
                raise AssertionError(
                    f"a {n.reason!r} marker was delivered, then silence: "
                    f"{token!r} sent directly after it never arrived within "
                    f"{bound:g} s (items so far: {items!r})"
                ) from None
            items += after
    return items


def collect_payload(
    sub: pgl.Subscription, token: str, timeout: float
) -> list[pgl.Notification]:
    """Read until the notification with payload ``token`` (included)."""
    out: list[pgl.Notification] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for n in sub.get_batch(timeout=left):
            out.append(n)
            if not n.connection_reset and n.payload == token:
                return out
    raise AssertionError(f"{token!r} not delivered within {timeout:g} s")


# ---------------------------------------------------------------------------
# 0. the fixture, and PgBouncer's own behaviour the tests rely on
# ---------------------------------------------------------------------------


def test_fixture_start_reload_restart_stop(pgbouncer: MakeBouncer, dsn: str) -> None:
    bouncer = pgbouncer("session")
    assert bouncer.is_running()
    assert bouncer.admin("SHOW VERSION")[0][0].startswith("PgBouncer")
    assert bouncer.config("pool_mode") == "session"
    with pooled(bouncer) as c, psycopg.connect(dsn, connect_timeout=10) as d:
        assert c.info.dbname == d.info.dbname
        assert c.info.user == d.info.user
        # Through the pooler: libpq's backend pid is PgBouncer's, not the server's.
        server_pid = c.execute("SELECT pg_backend_pid()").fetchone()
        assert server_pid is not None
        assert server_pid[0] != c.pgconn.backend_pid

    bouncer.set_pool_mode("transaction")
    assert bouncer.pool_mode == "transaction"
    assert bouncer.config("pool_mode") == "transaction"
    bouncer.set_pool_mode("session")
    assert bouncer.config("pool_mode") == "session"

    port, pid = bouncer.port, bouncer.pid
    with pooled(bouncer) as c:
        bouncer.restart()
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    assert bouncer.port == port
    assert bouncer.pid not in (None, pid)
    with pooled(bouncer) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)

    bouncer.stop()
    assert not bouncer.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bouncer.dsn, connect_timeout=2).close()
    bouncer.stop()  # idempotent


def test_fixture_skips_without_pgbouncer(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGLISTEN_PGBOUNCER", "/nonexistent/pgbouncer")
    with pytest.raises(pytest.skip.Exception, match="pgbouncer not installed"):
        request.getfixturevalue("pgbouncer")


def test_reload_to_transaction_detaches_a_live_session(
    pgbouncer: MakeBouncer, conn: Conn
) -> None:
    """PgBouncer 1.18 itself: what the periodic-check test relies on."""
    bouncer = pgbouncer("session")
    with pooled(bouncer, prepare_threshold=None) as client:
        client.execute("LISTEN pooler_probe")
        before = client.execute("SELECT pg_backend_pid()").fetchone()
        pgl.notify(conn, "pooler_probe", "session")
        assert pending_notifies(client, 2.0) == [("pooler_probe", "session")]

        bouncer.set_pool_mode("transaction")
        client.execute("")  # any query (a ping) ends the client's transaction
        pgl.notify(conn, "pooler_probe", "pooled")
        assert pending_notifies(client, 2.0) == [], "delivered after the switch"
        # Nothing tells the client: same backend, LISTEN still registered.
        assert client.execute("SELECT pg_backend_pid()").fetchone() == before
        assert client.execute("SELECT pg_listening_channels()").fetchall() == [
            ("pooler_probe",)
        ]
    wait_until(lambda: "when not linked" in bouncer.log_text(), timeout=TIMEOUT,
               message="PgBouncer did not log the dropped notification")


# ---------------------------------------------------------------------------
# a. session pooling works, across a pooler restart
# ---------------------------------------------------------------------------


def test_session_pooler_delivers_in_order_and_after_restart(
    pgbouncer: MakeBouncer, conn: Conn
) -> None:
    bouncer = pgbouncer("session")
    with running(bouncer.dsn) as listener, pooled(bouncer) as via_pooler:
        sub = listen_ready(listener, "pool_a")
        assert listener.connected
        assert listener.channels == frozenset({"pool_a"})
        for i in range(5):
            pgl.notify(conn, "pool_a", f"direct-{i}")
            pgl.notify(via_pooler, "pool_a", f"pooled-{i}")
        pgl.notify_many(conn, "pool_a", [f"many-{i}" for i in range(5)])
        got = collect(sub, 15)
        assert payloads(got) == [
            *(p for i in range(5) for p in (f"direct-{i}", f"pooled-{i}")),
            *(f"many-{i}" for i in range(5)),
        ]

        connects = listener.stats.connects
        bouncer.restart()
        expect_markers(sub, "reconnect", timeout=TIMEOUT + HC_TIMEOUT)
        assert listener.stats.connects > connects
        assert listener.stats.reconnects >= 1
        with pooled(bouncer) as again:
            pgl.notify(again, "pool_a", "after-restart-pooled")
        pgl.notify(conn, "pool_a", "after-restart-direct")
        assert payloads(collect(sub, 2)) == [
            "after-restart-pooled",
            "after-restart-direct",
        ]


def test_session_pooler_backend_killed_behind_the_pooler(
    pgbouncer: MakeBouncer, conn: Conn, terminate_backend: Callable[[int], bool]
) -> None:
    """PgBouncer closes the client when its server dies: an ordinary reconnect."""
    bouncer = pgbouncer("session")
    with running(bouncer.dsn) as listener:
        sub = listen_ready(listener, "pool_kill")
        pid = listener.backend_pid
        assert pid is not None
        assert terminate_backend(pid)
        expect_markers(sub, "reconnect", timeout=TIMEOUT + HC_TIMEOUT)
        assert listener.backend_pid not in (None, pid)
        pgl.notify(conn, "pool_kill", "after-kill")
        assert payloads(collect(sub, 1)) == ["after-kill"]


# ---------------------------------------------------------------------------
# b, c. transaction pooling: an error, never a marker followed by silence
# ---------------------------------------------------------------------------


def test_transaction_pooler_start_wait_raises(
    pgbouncer: MakeBouncer, conn: Conn
) -> None:
    bouncer = pgbouncer("transaction")
    listener = pgl.Listener(bouncer.dsn, **FAST)
    sub = listener.listen("pool_b")
    try:
        worker = Worker(lambda: listener.start(wait=True), name="start-wait")
        bound = CONNECT_TIMEOUT + HC_INTERVAL + HC_TIMEOUT + MARGIN
        worker.done.wait(bound)
        assert worker.done.is_set(), f"start(wait=True) still running after {bound} s"
        if worker.error is None:
            # Show what the consumer gets instead of an error.
            items = assert_markers_deliver(sub, conn, HC_INTERVAL + HC_TIMEOUT,
                                           probe="after-start")
            pytest.fail(
                "start(wait=True) through a transaction pooler returned instead "
                f"of raising ConnectError (the subscription got {items!r})"
            )
        error = worker.error
        assert isinstance(error, pgl.ConnectError), repr(error)
        assert TRANSACTION_RE.search(str(error)), str(error)
        assert sub.stats.markers == 0, "a marker was queued before the error"
        assert not listener.connected
    finally:
        listener.stop(timeout=5)


def test_transaction_pooler_start_nowait_logs_and_retries(
    pgbouncer: MakeBouncer, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bouncer = pgbouncer("transaction")

    def errors() -> list[logging.LogRecord]:
        return [r for r in library_records(caplog)
                if TRANSACTION_RE.search(r.getMessage())]

    with running(bouncer.dsn, wait=False) as listener:
        sub = listener.listen("pool_c")
        bound = CONNECT_TIMEOUT + HC_INTERVAL + HC_TIMEOUT + MARGIN

        def reported() -> bool:
            last = listener.stats.last_error
            return last is not None and bool(TRANSACTION_RE.search(last))

        try:
            wait_until(reported, timeout=bound,
                       message="last_error does not mention transaction pooling")
        except AssertionError:
            items = sub.get_batch(timeout=0)
            raise AssertionError(
                f"no transaction-pooling error within {bound:g} s: "
                f"last_error={listener.stats.last_error!r}, "
                f"connected={listener.connected}, subscription got {items!r}, "
                f"log: {messages(library_records(caplog, logging.INFO))}"
            ) from None
        wait_until(errors, timeout=TIMEOUT,
                   message="no WARNING/ERROR log line about transaction pooling: "
                   f"{messages(library_records(caplog, logging.INFO))}")
        assert not (listener.connected and sub.stats.markers), (
            "connected with a marker delivered through a transaction pooler"
        )
        # It keeps trying: PgBouncer sees new logins (the library may also log
        # or count each attempt).
        logins = bouncer.client_logins()
        first_logged = len(errors())
        first_connects = listener.stats.connects
        wait_until(
            lambda: bouncer.client_logins() > logins
            or len(errors()) > first_logged
            or listener.stats.connects > first_connects,
            timeout=bound,
            message="the listener stopped retrying",
        )
        assert sub.stats.markers == 0
        with pytest.raises(pgl.Empty):
            n = sub.get_nowait()
            pytest.fail(f"delivered through a transaction pooler: {n!r}")


# ---------------------------------------------------------------------------
# d. publishing through a transaction pooler with psycopg's defaults
# ---------------------------------------------------------------------------


def test_publish_through_transaction_pooler(
    pgbouncer: MakeBouncer, dsn: str
) -> None:
    bouncer = pgbouncer("transaction")
    rounds = 12  # psycopg prepares a query on its 5th execution by default
    # Two publishers taking turns share the pool's server sessions: a
    # statement prepared by one would clash with, or be missing for, the other.
    with (
        running(dsn) as listener,
        pooled(bouncer) as first,
        pooled(bouncer) as second,
    ):
        assert first.prepare_threshold == 5
        if bouncer.version < (1, 21):  # no prepared-statement support yet
            # Control: a query that psycopg does prepare fails this way.
            with (
                pooled(bouncer) as x,
                pooled(bouncer) as y,
                pytest.raises((psycopg.errors.DuplicatePreparedStatement,
                               psycopg.errors.InvalidSqlStatementName)),
            ):
                for _ in range(rounds):
                    for c in (x, y):
                        c.execute("SELECT %s::int", (1,))
        sub = listen_ready(listener, "pool_d")
        expected: list[str] = []
        for i in range(rounds):
            for name, c in (("a", first), ("b", second)):
                pgl.notify(c, "pool_d", f"one-{name}-{i}")
                expected.append(f"one-{name}-{i}")
        for i in range(rounds):
            for name, c in (("a", first), ("b", second)):
                batch = [f"many-{name}-{i}-{k}" for k in range(3)]
                assert pgl.notify_many(c, "pool_d", batch) == 3
                expected += batch
        assert payloads(collect(sub, len(expected))) == expected


# ---------------------------------------------------------------------------
# e. the periodic check notices a pooled session that stopped receiving
# ---------------------------------------------------------------------------


def test_health_check_notices_session_detached_by_pooler(
    pgbouncer: MakeBouncer, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bouncer = pgbouncer("session")
    with running(bouncer.dsn) as listener:
        sub = listen_ready(listener, "pool_e")
        pgl.notify(conn, "pool_e", "before")
        assert payloads(collect(sub, 1)) == ["before"]
        before = listener.stats
        logged_before = len(library_records(caplog))

        # From the next ping on, the listener's server session sits idle in
        # the pool between its queries: notifications to it are dropped.
        bouncer.set_pool_mode("transaction")
        switched = time.monotonic()

        def noticed() -> bool:
            stats = listener.stats
            return (
                (stats.last_error is not None
                 and stats.last_error != before.last_error)
                or not listener.connected
                or stats.connects > before.connects
                or stats.reconnects > before.reconnects
                or len(library_records(caplog)) > logged_before
            )

        bound = HC_INTERVAL + HC_TIMEOUT + MARGIN
        try:
            wait_until(noticed, timeout=bound)
        except AssertionError:
            pgl.notify(conn, "pool_e", "lost")
            raise AssertionError(
                f"listener still silently 'healthy' {bound:g} s after its pooled "
                f"session stopped receiving: connected={listener.connected}, "
                f"stats={listener.stats!r}, "
                f"'lost' sent now delivered: {payloads(sub.get_batch(timeout=2))}"
            ) from None
        elapsed = time.monotonic() - switched
        assert elapsed <= bound
        # Whatever comes next (reconnect attempts against what is now a
        # transaction pooler), no marker may be followed by silence.
        assert_markers_deliver(sub, conn, HC_INTERVAL + HC_TIMEOUT, probe="probe")


# ---------------------------------------------------------------------------
# f. a healthy session pooler is logged at INFO, not WARNING
# ---------------------------------------------------------------------------


def test_session_pooler_start_logs_info_not_warning(
    pgbouncer: MakeBouncer, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bouncer = pgbouncer("session")
    with running(bouncer.dsn) as listener:
        sub = listen_ready(listener, "pool_f")
        pgl.notify(conn, "pool_f", "hello")
        assert payloads(collect(sub, 1)) == ["hello"]
    warnings = library_records(caplog, logging.WARNING)
    assert not warnings, messages(warnings)
    infos = [r for r in library_records(caplog, logging.INFO)
             if r.levelno == logging.INFO and "pooler" in r.getMessage()]
    assert infos, messages(library_records(caplog, logging.DEBUG))
