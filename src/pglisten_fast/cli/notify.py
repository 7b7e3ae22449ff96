"""``pglisten-fast notify CHANNEL [PAYLOAD]``: send notifications.

With PAYLOAD, one notification.  Without it, every line of stdin (line
terminator removed) is one notification, sent with ``notify_many`` up to
``--batch-size`` per round trip, each batch its own transaction; a batch
goes out as soon as stdin has nothing more ready, so that ``tail -f`` works.
The count is printed on stderr, with a note when PostgreSQL folded
identical payloads of one transaction.
"""

from __future__ import annotations

import argparse
import codecs
import os
import select
import sys
from collections.abc import Iterator

import psycopg

import pglisten_fast as pgl

from ._common import (
    EXIT_OK,
    AddCommand,
    ConnectProblem,
    Failed,
    UsageError,
    check_channels,
    check_payload,
    logger,
    note,
    one_line,
    positive_int,
    sigterm_as_interrupt,
)
from ._connect import connect, resolve_dsn

#: Payloads per ``notify_many`` round trip when reading stdin.
NOTIFY_BATCH = 10_000


def register(add_command: AddCommand) -> None:
    """Add the ``notify`` command and its options."""
    p = add_command(
        "notify", run,
        help="send a notification, or one per stdin line",
        description=(
            "Send one notification with PAYLOAD.  Without PAYLOAD, "
            "every line of stdin is sent as one notification (line "
            "terminator removed), up to --batch-size per round trip, each batch "
            "its own transaction; the count is printed on stderr.  PostgreSQL "
            "delivers identical payloads sent in one transaction only once."),
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("payload", metavar="PAYLOAD", nargs="?", default=None,
                   help="the payload (< 8000 bytes); omit to read stdin")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   default=NOTIFY_BATCH,
                   help=f"stdin lines per round trip (default: {NOTIFY_BATCH:,})")


def run(args: argparse.Namespace) -> int:
    """Send PAYLOAD, or every line of stdin."""
    (channel,) = check_channels([args.channel])
    dsn = resolve_dsn(args.dsn)
    with sigterm_as_interrupt():
        if args.payload is not None:
            try:
                check_payload(args.payload)
            except ValueError as e:
                raise UsageError(f"invalid payload: {e}") from None
            with connect(dsn, autocommit=True) as conn:
                try:
                    pgl.notify(conn, channel, args.payload)
                except ValueError as e:  # not encodable in the client encoding
                    raise UsageError(f"invalid payload: {e}") from None
                except psycopg.Error as e:
                    raise Failed(f"NOTIFY failed: {one_line(str(e))}") from None
            logger.info("sent 1 notification on %r", channel)
            return EXIT_OK
        return _notify_stdin(dsn, channel, args.batch_size)


def _notify_stdin(dsn: str, channel: str, batch_size: int) -> int:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        raise UsageError("no PAYLOAD given and stdin is not readable") from None
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    if os.isatty(fd):
        note("reading payloads from the terminal, one per line; end with Ctrl-D")
    sent = trips = duplicates = 0
    lineno = 0
    with connect(dsn, autocommit=True) as conn:
        try:
            client_encoding = conn.info.encoding
            for batch in _stdin_batches(fd, encoding, batch_size):
                for payload in batch:
                    lineno += 1
                    try:
                        check_payload(payload, client_encoding)
                    except ValueError as e:
                        raise UsageError(
                            f"stdin line {lineno}: {e} ({sent:,} notifications "
                            "were sent before it)"
                        ) from None
                duplicates += len(batch) - len(set(batch))
                # Autocommit: each batch is one statement, one transaction.
                sent += pgl.notify_many(conn, channel, batch)
                trips += 1
        except UnicodeDecodeError as e:
            raise UsageError(
                f"stdin is not valid {encoding} after line {lineno}: {e.reason} "
                f"({sent:,} notifications were sent before it)"
            ) from None
        except psycopg.OperationalError as e:
            raise ConnectProblem(
                f"lost the connection after sending {sent:,} notifications: "
                f"{one_line(str(e))}"
            ) from None
        except psycopg.Error as e:
            raise Failed(
                f"NOTIFY failed after {sent:,} notifications: {one_line(str(e))}"
            ) from None
        except KeyboardInterrupt:
            note(f"interrupted: sent {sent:,} notifications on {channel!r}")
            raise
    noun = "notification" if sent == 1 else "notifications"
    msg = f"sent {sent:,} {noun} on {channel!r} in {trips:,} round trip"
    msg += "" if trips == 1 else "s"
    if duplicates:
        msg += (
            f" ({duplicates:,} repeated payloads within a batch reach listeners "
            "once: PostgreSQL folds identical notifications of one transaction)"
        )
    note(msg)
    return EXIT_OK


def _stdin_batches(fd: int, encoding: str, size: int) -> Iterator[list[str]]:
    """Lines of ``fd`` (terminator removed), in batches of at most ``size``.

    A partial batch is handed out as soon as no more input is ready, so
    that ``tail -f log | pglisten-fast notify ch`` sends without delay.
    """
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    pending = ""
    batch: list[str] = []
    while True:
        chunk = os.read(fd, 1 << 16)
        text = decoder.decode(chunk, final=not chunk)
        if text:
            pending += text
            *lines, pending = pending.split("\n")
            for ln in lines:
                batch.append(ln[:-1] if ln.endswith("\r") else ln)
                if len(batch) >= size:
                    yield batch
                    batch = []
        if not chunk:
            if pending:
                batch.append(pending[:-1] if pending.endswith("\r") else pending)
            if batch:
                yield batch
            return
        if batch and not _stdin_ready(fd):
            yield batch
            batch = []


def _stdin_ready(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):  # pragma: no cover - unselectable stdin
        return True
