"""``pglisten-fast listen CHANNEL...``: print notifications as JSON lines.

Every item of one subscription to the channels, markers included, becomes
one line on stdout::

    {"channel": ..., "payload": ..., "pid": ..., "connection_reset": ...,
     "reason": ..., "dropped": ...}

The first line per channel is its ``"listen"`` marker, printed once LISTEN
is in effect.  The command runs until Ctrl-C, SIGTERM or a closed stdout
(exit status 0 for all three) or until ``--count`` notifications were
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str
from typing import TextIO

import pglisten_fast as pgl

from ._common import (
    EXIT_OK,
    RECEIVE_BATCH,
    AddCommand,
    UsageError,
    add_buffer_options,
    check_channels,
    logger,
    positive_int,
    sigterm_as_interrupt,
)
from ._connect import resolve_dsn, start_listener


def register(add_command: AddCommand) -> None:
    """Add the ``listen`` command and its options."""
    p = add_command(
        "listen", run,
        help="print notifications as JSON lines",
        description=(
            "LISTEN on the channels and print every item as one JSON "
            'object per line: {"channel", "payload", "pid", "connection_reset", '
            '"reason", "dropped"}.  Markers (connection_reset=true, reason '
            '"listen", "reconnect" or "overflow") are printed too; the first line '
            'per channel is its "listen" marker, printed once LISTEN is in effect.  '
            "Runs until Ctrl-C or SIGTERM (exit status 0) or until --count "
            "notifications were printed."),
    )
    p.add_argument("channels", nargs="+", metavar="CHANNEL",
                   help="channel names, used verbatim (case and spaces kept)")
    p.add_argument("--count", type=positive_int, metavar="N", default=None,
                   help="exit after N notifications (markers not counted)")
    add_buffer_options(
        p,
        buffer_help="ring buffer size, e.g. 64K, 16M (default: 16M)",
        overflow="drop",
        overflow_help="when the buffer is full: drop (print an overflow marker "
        "with the count) or block (default: drop)",
    )


def run(args: argparse.Namespace) -> int:
    """Listen and print until interrupted or ``--count`` is reached."""
    channels = check_channels(args.channels)
    dsn = resolve_dsn(args.dsn)
    limit: int | None = args.count
    out = sys.stdout
    line = _json_line_maker()
    with sigterm_as_interrupt():
        listener = start_listener(
            dsn, buffer_size=args.buffer_size, overflow=args.overflow
        )
        try:
            try:
                sub = listener.listen(*channels)
            except (TypeError, ValueError) as e:  # refused by the library
                raise UsageError(f"invalid channel name: {e}") from None
            logger.info(
                "listening on %s (backend pid %s)",
                ", ".join(channels), listener.backend_pid,
            )
            return _listen_loop(sub, out, line, limit)
        except KeyboardInterrupt:
            logger.info("interrupted; stopping")
            return EXIT_OK
        finally:
            listener.stop()


def _listen_loop(
    sub: pgl.Subscription,
    out: TextIO,
    line: Callable[[pgl.Notification], str],
    limit: int | None,
) -> int:
    seen = 0
    while True:
        try:
            batch = sub.get_batch(RECEIVE_BATCH, timeout=None)
        except pgl.Closed as e:  # the listener stopped under us
            logger.warning("subscription ended: %s", e)
            return EXIT_OK
        if limit is not None:
            cut = len(batch)
            for i, n in enumerate(batch):
                if not n.connection_reset:
                    seen += 1
                    if seen >= limit:
                        cut = i + 1
                        break
            batch = batch[:cut]
        try:
            out.write("".join(map(line, batch)))
            out.flush()
        except BrokenPipeError:
            # The reader went away (`... | head`): a normal way to end.
            _silence_stdout()
            return EXIT_OK
        if limit is not None and seen >= limit:
            return EXIT_OK


def _json_line_maker() -> Callable[[pgl.Notification], str]:
    """A fast encoder of one Notification as a JSON object line.

    Keys, in this order: channel, payload, pid, connection_reset, reason,
    dropped.  Output is pure ASCII (``\\uXXXX`` escapes), so it survives any
    locale, and stays valid for payloads with undecodable bytes.
    """
    channels: dict[str, str] = {}

    def line(n: pgl.Notification) -> str:
        ch = channels.get(n.channel)
        if ch is None:
            ch = channels[n.channel] = _json_str(n.channel)
        if n.connection_reset:
            reason = "null" if n.reason is None else _json_str(n.reason)
            return (
                f'{{"channel":{ch},"payload":{_json_str(n.payload)},"pid":{n.pid},'
                f'"connection_reset":true,"reason":{reason},"dropped":{n.dropped}}}\n'
            )
        return (
            f'{{"channel":{ch},"payload":{_json_str(n.payload)},"pid":{n.pid},'
            f'"connection_reset":false,"reason":null,"dropped":{n.dropped}}}\n'
        )

    return line


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # pragma: no cover - stdout without a fd
        pass
