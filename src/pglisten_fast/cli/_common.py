"""What every command shares: exit statuses, errors, messages, checks, option types.

A command reports a user mistake or an unreachable server by raising one
of the :class:`CliError` subclasses below; :func:`pglisten_fast.cli.main`
turns it into a single ``pglisten-fast: error: ...`` line on stderr and
the exit status the class carries.

Channel names and payloads are checked here, with the library's rules and
messages, so that a mistake is reported before any connection is made.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn, Protocol

import psycopg

from .._names import check_channel
from .._names import check_payload as _check_payload

PROG = "pglisten-fast"

#: Environment variable holding the default DSN of every subcommand.
DSN_ENV_VAR = "PGLISTEN_FAST_DSN"

#: Success (``listen`` also on Ctrl-C, SIGTERM or a closed stdout).
EXIT_OK = 0
#: The demo found missing, extra or out-of-order notifications; a statement failed.
EXIT_FAILED = 1
#: Cannot connect (bad DSN, server unreachable), no embedded server.
EXIT_CONNECT = 2
#: Usage error (``EX_USAGE`` from sysexits.h): bad option, channel name, payload.
EXIT_USAGE = 64
#: Interrupted by Ctrl-C or SIGTERM (``notify``, ``demo``).
EXIT_INTERRUPTED = 130

#: Items taken per ``get_batch`` call by ``listen`` and ``demo``.
RECEIVE_BATCH = 65_536
#: Default ring buffer size of the subscriptions (``--buffer-size``).
DEFAULT_BUFFER_SIZE = 16 * 2**20

#: The CLI's own log lines (``-v``).
logger = logging.getLogger("pglisten_fast.cli")

Run = Callable[[argparse.Namespace], int]


class AddCommand(Protocol):
    """Adds a subcommand with the shared options, help layout and epilog."""

    def __call__(
        self, name: str, run: Run, *, help: str, description: str
    ) -> argparse.ArgumentParser: ...


# -- errors and messages -------------------------------------------------------


class CliError(Exception):
    """Reported as one ``pglisten-fast: error:`` line; exit with :attr:`status`."""

    status = EXIT_FAILED


class UsageError(CliError):
    """A user mistake (channel name, payload, option value)."""

    status = EXIT_USAGE


class ConnectProblem(CliError):
    """PostgreSQL cannot be reached, the DSN is invalid, no embedded server."""

    status = EXIT_CONNECT


class Failed(CliError):
    """The server refused a statement."""

    status = EXIT_FAILED


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines, tabs) made one space."""
    return " ".join(text.split())


def error(message: str) -> None:
    """``pglisten-fast: error: message`` on stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """``pglisten-fast: message`` on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def libpq_version() -> str:
    """The version of the libpq psycopg uses, as text (``15.4``)."""
    try:
        num = psycopg.pq.version()
    except Exception:  # pragma: no cover - exotic libpq
        return "unknown"
    if num >= 100_000:
        return f"{num // 10_000}.{num % 10_000}"
    return f"{num // 10_000}.{num // 100 % 100}.{num % 100}"


# -- channel names and payloads ------------------------------------------------


def check_channels(names: Sequence[str]) -> list[str]:
    """``names``, or :class:`UsageError` for the first unusable one.

    The library's own check (``listen`` and ``notify`` apply it too), run
    here first so that a bad name is reported before any connection.
    """
    for name in names:
        try:
            check_channel(name)
        except (TypeError, ValueError) as e:
            raise UsageError(f"invalid channel name: {e}") from None
    return list(names)


def check_payload(payload: str, encoding: str = "utf-8") -> None:
    """:class:`ValueError` unless PostgreSQL accepts ``payload`` in ``encoding``."""
    _check_payload(payload, encoding)


# -- signals -------------------------------------------------------------------


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt like Ctrl-C does.

    So that ``finally`` clauses run (listener stopped, embedded server
    removed) when a service manager or ``timeout`` ends the command.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- option types and shared options -------------------------------------------


def parse_size(text: str) -> int:
    """``"65536"``, ``"64K"``, ``"16M"``, ``"1G"`` (binary units) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (examples: 65536, 64K, 16M, 1G)"
        )
    value = int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[
        m.group(2).lower()
    ]
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def positive_int(text: str) -> int:
    """A count of at least 1; ``1,000`` and ``1_000`` are accepted."""
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_buffer_options(
    parser: argparse.ArgumentParser,
    *,
    buffer_help: str,
    overflow: str,
    overflow_help: str,
) -> None:
    """``--buffer-size`` and ``--overflow`` (the subscription's ring)."""
    parser.add_argument("--buffer-size", type=parse_size, metavar="SIZE",
                        default=DEFAULT_BUFFER_SIZE, help=buffer_help)
    parser.add_argument("--overflow", choices=("drop", "block"), default=overflow,
                        help=overflow_help)
