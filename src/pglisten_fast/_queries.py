"""The listener session's queries: what the selector thread sends, and how
it reads the answers.

Three kinds, at most one outstanding at a time: ``INIT`` once per
connection (switch to UTF-8, learn the backend pid, refuse a hot standby),
``SYNC`` for each LISTEN/UNLISTEN batch (with the backend pid again, which
unmasks a transaction pooler), and ``PING``, the health check, which also
samples the server's notification queue usage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from psycopg import pq

from ._channels import Batch
from ._router import encode_name

__all__ = [
    "PING_SQL",
    "Query",
    "QueryKind",
    "StandbyError",
    "check_init",
    "first_error",
    "init_sql",
    "is_refusal",
    "queue_usage",
    "sync_pid",
    "sync_sql",
    "text",
]

PING_SQL = b"SELECT pg_notification_queue_usage()"

_PRIMARY_HINT = ("point the listener at the primary (e.g. "
                 "target_session_attrs=read-write)")


class QueryKind(enum.Enum):
    INIT = "init query"
    SYNC = "LISTEN query"
    PING = "health check"


@dataclass(slots=True)
class Query:
    """The outstanding query, its deadline and the results read so far."""

    kind: QueryKind
    deadline: float | None
    batch: Batch = field(default_factory=Batch)
    results: list[pq.abc.PGresult] = field(default_factory=list)


class StandbyError(Exception):
    """The server is a hot standby, where LISTEN is refused."""


def init_sql(server_encoding: bytes | None) -> bytes:
    """Switch the session to UTF-8 and ask for its pid and recovery state.

    UTF-8 whatever the user's default: channel names in any script can be
    LISTENed, and payloads decode in C on the fast path.  The server
    converts from the database encoding, except from SQL_ASCII, which has
    no conversions (and would end the session on a byte that is not
    UTF-8): there the bytes come through as they are, and undecodable ones
    become U+FFFD.
    """
    enc = b"SQL_ASCII" if server_encoding == b"SQL_ASCII" else b"UTF8"
    return (b"SET client_encoding TO '" + enc + b"'; "
            b"SELECT pg_backend_pid(), pg_is_in_recovery()")


def check_init(results: list[pq.abc.PGresult]) -> int:
    """The backend pid from the init query's answer.

    :raises StandbyError: the server is in recovery.
    """
    row = results[-1]
    if (row.get_value(0, 1) or b"f") == b"t":
        raise StandbyError("the server is a hot standby (in recovery) where "
                           f"LISTEN is refused; {_PRIMARY_HINT}")
    return int(row.get_value(0, 0) or b"0")


def sync_sql(pgconn: pq.abc.PGconn, batch: Batch) -> bytes:
    """UNLISTENs, LISTENs, then the backend pid, in one round trip."""
    esc = pq.Escaping(pgconn)
    parts = [b"UNLISTEN " + esc.escape_identifier(encode_name(ch))
             for ch in batch.unlisten]
    parts += [b"LISTEN " + esc.escape_identifier(encode_name(ch))
              for ch in batch.listen]
    parts.append(b"SELECT pg_backend_pid()")
    return b";".join(parts)


def sync_pid(results: list[pq.abc.PGresult]) -> int:
    """The backend pid that ran a LISTEN batch."""
    return int(results[-1].get_value(0, 0) or b"0")


def first_error(results: list[pq.abc.PGresult]) -> tuple[str, bytes] | None:
    """``(message, sqlstate)`` of the first failed statement, or None.

    :raises StandbyError: the failure is a standby refusing LISTEN.
    """
    for r in results:
        if r.status == pq.ExecStatus.FATAL_ERROR:
            msg = text(r.error_message)
            if "recovery" in msg:
                raise StandbyError(
                    f"the server is a hot standby and refuses LISTEN ({msg}); "
                    f"{_PRIMARY_HINT}")
            return msg, r.error_field(pq.DiagnosticField.SQLSTATE) or b""
    return None


def queue_usage(results: list[pq.abc.PGresult]) -> float | None:
    """The queue usage (0.0 to 1.0) from a health check's answer."""
    if not results or results[-1].ntuples < 1:
        return None
    raw = results[-1].get_value(0, 0)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def is_refusal(sqlstate: bytes) -> bool:
    """Whether an error refuses the statement itself (retrying won't help).

    Data exceptions (22: e.g. a name with no equivalent in the database
    encoding), syntax or access rule violations (42), unsupported features
    (0A), program limits (54).  Cancellations, timeouts and resource errors
    are transient instead.
    """
    return sqlstate[:2] in (b"22", b"42", b"0A", b"54")


def text(msg: bytes | str | None) -> str:
    """A libpq message as one stripped line of text."""
    if msg is None:
        return ""
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return msg.strip()
