"""Getting a connection: sources, bounded attempts, reconnect backoff.

- :func:`connection_source` turns the Listener's ``conninfo`` / ``pool`` /
  ``connect`` argument into a :class:`Source`: how to open a connection,
  how to give it back, and the bound on one attempt.
- :class:`ConnectAttempt` opens one on a helper thread, so that ``stop()``
  never waits for a slow server.
- :class:`Backoff` spaces the retries: exponential with jitter, reset once
  a connection has stayed healthy for a while.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from ._log import fields, logger
from ._urls import libpq_conninfo

__all__ = [
    "HEALTHY_AFTER",
    "Backoff",
    "ConnectAttempt",
    "Connector",
    "SessionLost",
    "Source",
    "connection_source",
    "describe",
]


#: A connection that stayed up this long resets the reconnect backoff.
HEALTHY_AFTER = 10.0

_KEEPALIVE_KEYS = ("keepalives", "keepalives_idle", "keepalives_interval",
                   "keepalives_count")

Connector = Callable[[], "psycopg.Connection[Any]"]


class SessionLost(Exception):
    """The listener's session is unusable; the message says why."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where connections come from and where they go back."""

    #: Opens a new connection (runs on a helper thread).
    connect: Connector
    #: Closes a connection or gives it back; never raises.
    release: Callable[[Any], None]
    #: Seconds one attempt may take before it is abandoned (None: the driver
    #: bounds it itself).
    attempt_bound: float | None


def connection_source(
    conninfo: str,
    pool: Any,
    connect: Callable[[], psycopg.Connection[Any]] | None,
    timeout: float,
) -> Source:
    """The :class:`Source` for one of the Listener's three arguments.

    :raises ValueError: ``conninfo`` cannot be parsed.
    """
    if pool is not None:
        def from_pool() -> psycopg.Connection[Any]:
            conn: psycopg.Connection[Any] = pool.getconn(timeout=timeout)
            return conn

        def give_back(conn: Any) -> None:
            # Ended at the libpq level first: a session that ran LISTEN
            # must never serve anyone else (conn.close() would hand it
            # back as it is to a pool made with close_returns=True).
            conn.pgconn.finish()
            pool.putconn(conn)

        return Source(from_pool, _quietly(give_back), timeout)
    if connect is not None:
        user_connect = connect

        def checked_connect() -> psycopg.Connection[Any]:
            conn = user_connect()
            if not isinstance(conn, psycopg.Connection):
                raise TypeError(
                    "connect must return a psycopg.Connection, got "
                    f"{type(conn).__name__}"
                )
            return conn

        return Source(checked_connect, _close, timeout)
    conninfo = libpq_conninfo(conninfo)   # SQLAlchemy-style URLs too
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as e:
        raise ValueError(f"invalid conninfo: {e}") from e
    extra: dict[str, Any] = {}
    if "connect_timeout" not in params:
        # libpq takes whole seconds (and treats 1 as 2).
        extra["connect_timeout"] = max(2, math.ceil(timeout))
    hosts = str(params.get("host") or params.get("hostaddr")
                or os.environ.get("PGHOST", ""))
    if "," in hosts and "target_session_attrs" not in params and \
            "PGTARGETSESSIONATTRS" not in os.environ:
        # Several hosts: LISTEN needs the primary (a standby refuses it), so
        # let libpq skip standbys instead of failing on the first one.
        extra["target_session_attrs"] = \
            "primary" if pq.version() >= 140000 else "read-write"
    if not any(k in params for k in _KEEPALIVE_KEYS):
        # Let the kernel notice dead peers too; health checks do the rest.
        extra.update(keepalives=1, keepalives_idle=30, keepalives_interval=10,
                     keepalives_count=3)

    def open_conn() -> psycopg.Connection[Any]:
        return psycopg.Connection.connect(conninfo, autocommit=True, **extra)

    # psycopg bounds every attempt (each host and address in turn) by
    # connect_timeout itself; no second, coarser bound on top.
    return Source(open_conn, _close, None)


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # pragma: no cover - closing a broken connection
        logger.debug("error closing a connection", exc_info=True,
                     extra=fields("close_failed"))


def _quietly(release: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a connection release so that its failure never ends a thread."""

    def release_quietly(conn: Any) -> None:
        try:
            release(conn)
        except Exception:
            logger.warning("error while closing a connection", exc_info=True,
                           extra=fields("close_failed"))

    return release_quietly


class ConnectAttempt:
    """A connection being opened on a helper thread (so stop never waits).

    The helper signals ``wake`` when done; the selector thread then reads
    :attr:`conn` / :attr:`error`.  :meth:`abandon` gives up: a connection
    that arrives later is released by the helper.
    """

    def __init__(self, source: Source, wake: Callable[[], None]) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        self.error: BaseException | None = None
        self.done = False
        self._abandoned = False
        self._lock = threading.Lock()
        self._source = source
        self._wake = wake
        self.started = time.monotonic()
        self.thread = threading.Thread(
            target=self._run, name="pglisten-fast-connect", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        conn = None
        err: BaseException | None = None
        try:
            conn = self._source.connect()
        except BaseException as e:  # reported to the selector thread
            err = e
        with self._lock:
            abandoned = self._abandoned
            self.conn, self.error, self.done = conn, err, True
        if abandoned:
            if conn is not None:
                self._source.release(conn)
        else:
            self._wake()

    def overdue(self, now: float) -> float | None:
        """Seconds left before the attempt is abandoned (<= 0: now); None:
        no bound of ours (the driver bounds it)."""
        bound = self._source.attempt_bound
        if bound is None:
            return None
        return self.started + bound + 1.0 - now

    def abandon(self) -> None:
        """Give up on the attempt; a late connection is closed by the helper."""
        with self._lock:
            self._abandoned = True
            conn, self.conn = self.conn, None
        if conn is not None:
            self._source.release(conn)


class Backoff:
    """Reconnect delays: ``first * 2**n`` up to ``most``, +/-20 % jitter."""

    __slots__ = ("_failures", "first", "most")

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = most
        self._failures = 0

    def next(self) -> float:
        """The delay before the next attempt (counts one more failure)."""
        base = min(self.most, self.first * (2 ** min(self._failures, 30)))
        self._failures += 1
        return float(min(self.most, base * random.uniform(0.8, 1.2)))

    def reset(self) -> None:
        """A connection proved healthy: start again from ``first``."""
        self._failures = 0


def describe(err: BaseException | None) -> str:
    """One line naming an error: ``Class: message``."""
    if err is None:
        return "unknown error"
    text = " ".join(str(err).split())
    name = type(err).__name__
    if isinstance(err, SessionLost):
        return text or "connection lost"
    return f"{name}: {text}" if text else name
