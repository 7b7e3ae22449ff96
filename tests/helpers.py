"""Shared helpers for the pglisten_fast test-suite.

Waiting on state without an event (``wait_until``), reading markers and
notifications from a subscription with a deadline, and starting
subscriptions that are known to be in effect on the server.
Also: a temporary database in a given encoding (``temp_database``).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pglisten_fast as pgl

#: Default bound on every wait in the tests: generous, never hit when all is well.
TIMEOUT = 10.0


def wait_until(
    predicate: Callable[[], object],
    timeout: float = TIMEOUT,
    interval: float = 0.01,
    message: str = "",
) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it is truthy.

    :raises AssertionError: it stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"condition not met within {timeout} s"
                + (f": {message}" if message else "")
            )
        time.sleep(interval)


def expect_marker(
    sub: pgl.Subscription,
    channel: str | None = None,
    reason: str = "listen",
    timeout: float = TIMEOUT,
) -> pgl.Notification:
    """Read the next item and check that it is a marker with ``reason``."""
    n = sub.get(timeout=timeout)
    assert n.connection_reset, f"expected a {reason!r} marker, got {n!r}"
    assert n.reason == reason, n
    assert n.payload == (b"" if sub.payload_type is bytes else "")
    assert n.pid == 0
    assert n.dropped == 0
    if channel is not None:
        assert n.channel == channel, n
    return n


def expect_markers(
    sub: pgl.Subscription, reason: str = "listen", timeout: float = TIMEOUT
) -> list[pgl.Notification]:
    """Read one marker per channel of ``sub`` (in any channel order)."""
    markers = [expect_marker(sub, None, reason, timeout) for _ in sub.channels]
    assert sorted(m.channel for m in markers) == sorted(sub.channels)
    return markers


def expect_markers_amid_traffic(
    sub: pgl.Subscription, timeout: float = TIMEOUT
) -> list[pgl.Notification]:
    """Read until every channel of ``sub`` had its ``"listen"`` marker.

    Notifications may already flow on channels whose marker came first;
    they are returned.  A notification on a channel before that channel's
    marker fails the check.
    """
    waiting = set(sub.channels)
    seen: list[pgl.Notification] = []
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no listen marker for {sorted(waiting)}")
        n = sub.get(timeout=left)
        if n.connection_reset:
            assert n.reason == "listen", n
            assert n.channel in waiting, f"second marker for {n.channel!r}"
            waiting.discard(n.channel)
        else:
            assert n.channel not in waiting, f"{n!r} came before its channel's marker"
            seen.append(n)
    return seen


def listen_ready(
    listener: pgl.Listener, *channels: str, timeout: float = TIMEOUT, **kwargs: Any
) -> pgl.Subscription:
    """``listener.listen(*channels)`` and wait until LISTEN is in effect.

    The ``"listen"`` marker of every channel is consumed.
    """
    sub = listener.listen(*channels, **kwargs)
    expect_markers(sub, "listen", timeout)
    return sub


def collect(
    sub: pgl.Subscription, count: int, timeout: float = TIMEOUT
) -> list[pgl.Notification]:
    """Read exactly ``count`` items (markers included) within ``timeout``."""
    out: list[pgl.Notification] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(out)} of {count} items within {timeout} s")
        out += sub.get_batch(max_items=count - len(out), timeout=left)
    return out


def collect_until(
    sub: pgl.Subscription,
    last_payload: str,
    timeout: float = TIMEOUT,
    max_items: int = 4096,
) -> list[pgl.Notification]:
    """Read items until a notification with ``last_payload`` (excluded) arrives."""
    out: list[pgl.Notification] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no {last_payload!r} within {timeout} s ({len(out)} items before)"
            )
        for n in sub.get_batch(max_items=max_items, timeout=left):
            if not n.connection_reset and n.payload == last_payload:
                return out
            out.append(n)


def payloads(items: Iterable[pgl.Notification]) -> list[str]:
    """The payloads of the notifications in ``items`` (markers left out)."""
    return [n.payload for n in items if not n.connection_reset]


class Barrier:
    """A sync point with the selector thread, through a witness subscription.

    ``sync()`` sends a notification on a private channel and waits for it.
    The selector thread routes notifications one after another, in server
    order, so when the witness has it every notification committed before
    (on any channel of the listener) is in its subscriptions' buffers.
    The barrier's own notifications and marker count in ``listener.stats``.
    """

    def __init__(
        self,
        listener: pgl.Listener,
        conn: psycopg.Connection[Any],
        channel: str = "pglf_test_barrier",
    ) -> None:
        self.channel = channel
        self._conn = conn
        self._count = 0
        self._sub = listen_ready(listener, channel)

    def sync(self, timeout: float = TIMEOUT) -> None:
        """Return once everything committed before this call is buffered."""
        self._count += 1
        token = f"sync-{self._count}"
        pgl.notify(self._conn, self.channel, token)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"barrier {token} not reached in {timeout} s")
            if self._sub.get(timeout=left).payload == token:
                return


def settle(listener: pgl.Listener, channel: str = "pglf_test_settle") -> None:
    """Return once the selector has processed every earlier listen/unlisten.

    Commands reach the selector thread in order; the marker of a new
    subscription is queued after every command sent before it was processed.
    """
    sub = listen_ready(listener, channel)
    sub.unlisten()


class Worker:
    """Run a callable on a daemon thread and keep what it returned or raised."""

    def __init__(self, fn: Callable[[], object], name: str = "test-worker") -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._fn = fn
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # inspected by the test
            self.error = exc
        finally:
            self.done.set()

    def join(self, timeout: float = TIMEOUT) -> object:
        """Wait for the callable; re-raise its exception; return its result."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self._thread.name} did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@contextlib.contextmanager
def temp_database(pg_server: Any, encoding: str) -> Iterator[str]:
    """A database in ``encoding`` (C locale) for one module; dropped after."""
    name = f"pglf_{encoding.lower()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn, autocommit=True, connect_timeout=10) as c:
        c.execute(sql.SQL(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING {} "
            "LC_COLLATE 'C' LC_CTYPE 'C'").format(
                sql.Identifier(name), sql.Literal(encoding)))
    try:
        yield make_conninfo(pg_server.dsn, dbname=name)
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True, connect_timeout=10) as c:
            c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                sql.Identifier(name)))
