"""Reaching PostgreSQL: the DSN, connections, started listeners, log set-up.

Every failure here ends as a :class:`~._common.ConnectProblem` with a
one-line reason (exit status 2).  While a listener makes its first
connection, the library's own log lines about that attempt are hidden:
the command reports the failure itself, once.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

import pglisten_fast as pgl

from ._common import DSN_ENV_VAR, PROG, ConnectProblem, one_line


def resolve_dsn(given: str | None) -> str:
    """``--dsn``, else ``$PGLISTEN_FAST_DSN``, else ``""`` (libpq's PG* variables)."""
    if given is not None:
        return given
    return os.environ.get(DSN_ENV_VAR, "")


def _conninfo_params(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise ConnectProblem(f"invalid DSN: {one_line(str(e))}") from None


def connect(dsn: str, *, autocommit: bool) -> psycopg.Connection[Any]:
    """A psycopg connection, or :class:`ConnectProblem` with a one-line reason."""
    extra: dict[str, Any] = {}
    if "connect_timeout" not in _conninfo_params(dsn):
        extra["connect_timeout"] = 10
    try:
        return psycopg.Connection.connect(dsn, autocommit=autocommit, **extra)
    except psycopg.Error as e:
        raise ConnectProblem(
            f"cannot connect to PostgreSQL: {one_line(str(e))}"
        ) from None


class _StartupQuiet(logging.Filter):
    """Hide the library's own log lines about a failing first connection.

    The command reports that failure itself, on one line; once connected,
    the library's warnings (lost connection, reconnecting...) get through.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and record.name == "pglisten_fast")


#: Active only while :func:`start_listener` makes the first connection.
startup_quiet = _StartupQuiet()


def setup_logging(verbose: int) -> None:
    """Log to stderr: warnings only, ``-v`` info, ``-vv`` debug."""
    level = logging.WARNING if verbose <= 0 else (
        logging.INFO if verbose == 1 else logging.DEBUG
    )
    handler = logging.StreamHandler(sys.stderr)
    if verbose > 0:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        fmt = f"{PROG}: %(levelname)s: %(message)s"
        handler.addFilter(startup_quiet)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    # main() may run more than once in a process (tests): replace our handler.
    for old in [h for h in root.handlers if getattr(h, "_pglisten_fast_cli", False)]:
        root.removeHandler(old)
    handler._pglisten_fast_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def start_listener(
    dsn: str, *, buffer_size: int, overflow: Literal["drop", "block"]
) -> pgl.Listener:
    """A started Listener, or :class:`ConnectProblem` with a one-line reason."""
    _conninfo_params(dsn)  # a clear message for an unparsable DSN
    try:
        listener = pgl.Listener(dsn, buffer_size=buffer_size, overflow=overflow)
    except ValueError as e:
        raise ConnectProblem(one_line(str(e))) from None
    startup_quiet.active = True
    try:
        listener.start(wait=True)
    except pgl.ConnectError as e:
        cause = e.__cause__
        reason = str(cause) if cause is not None else str(e)
        raise ConnectProblem(
            f"cannot connect to PostgreSQL: {one_line(reason)}"
        ) from None
    startup_quiet.active = False
    return listener
