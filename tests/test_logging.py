"""Structured log records: every record of logger ``pglisten_fast`` carries
``extra`` fields (event, backend pid, channel, retry delay, error class), so
that JSON formatters get them without parsing the text."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, expect_marker, listen_ready, wait_until

Conn = psycopg.Connection[Any]


class JsonFormatter(logging.Formatter):
    """What a user's JSON formatter does: message plus the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"message": record.getMessage(), "level": record.levelname}
        for key in ("event", "backend_pid", "channel", "retry_delay",
                    "error_class", "queue_usage"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        return json.dumps(out)


def _by_event(caplog: pytest.LogCaptureFixture) -> dict[str, logging.LogRecord]:
    return {r.event: r for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "pglisten_fast"}


def test_records_carry_structured_fields(
    dsn: str, conn: Conn, caplog: pytest.LogCaptureFixture,
    terminate_backend: Callable[[int], bool],
) -> None:
    caplog.set_level(logging.DEBUG, logger="pglisten_fast")

    def handler(n: pgl.Notification) -> None:
        if n.payload == "boom":
            raise RuntimeError("on purpose")

    with pgl.Listener(dsn, reconnect_delay=0.05) as listener:
        sub = listen_ready(listener, "logged")
        listener.listen("logged", handler=handler)
        pid = listener.backend_pid
        assert pid is not None
        pgl.notify(conn, "logged", "boom")
        wait_until(lambda: "handler_error" in _by_event(caplog))
        assert sub.get(timeout=TIMEOUT).payload == "boom"
        terminate_backend(pid)
        expect_marker(sub, "logged", "reconnect", TIMEOUT)

    records = [r for r in caplog.records if r.name == "pglisten_fast"]
    assert records and all(hasattr(r, "event") for r in records), [
        r.getMessage() for r in records if not hasattr(r, "event")]
    events = _by_event(caplog)
    connected = events["connected"]
    assert isinstance(connected.backend_pid, int)  # type: ignore[attr-defined]
    lost = events["connection_lost"]
    assert lost.backend_pid == pid  # type: ignore[attr-defined]
    assert 0 < lost.retry_delay < 1  # type: ignore[attr-defined]
    assert events["handler_error"].channel == "logged"  # type: ignore[attr-defined]

    line = json.loads(JsonFormatter().format(lost))
    assert line["event"] == "connection_lost" and line["backend_pid"] == pid
    assert "reconnecting in" in line["message"]


def test_connect_failures_name_the_error_class(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pglisten_fast")
    listener = pgl.Listener("host=127.0.0.1 port=1 connect_timeout=2",
                            reconnect_delay=0.05)
    listener.start(wait=False)
    try:
        wait_until(lambda: "connect_failed" in _by_event(caplog))
    finally:
        listener.stop()
    failed = _by_event(caplog)["connect_failed"]
    assert failed.error_class == "OperationalError"  # type: ignore[attr-defined]
    assert failed.retry_delay > 0  # type: ignore[attr-defined]
    assert failed.levelno == logging.WARNING
