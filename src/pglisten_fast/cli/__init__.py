"""The ``pglisten-fast`` command line (also ``python -m pglisten_fast``).

Commands, one module each:

``listen CHANNEL...`` (:mod:`.listen`)
    print every notification and marker as one JSON line on stdout;
``notify CHANNEL [PAYLOAD]`` (:mod:`.notify`)
    send one notification, or one per line of stdin;
``demo`` (:mod:`.demo`)
    publish a burst of notifications in one transaction and receive it,
    against an embedded throwaway PostgreSQL unless a DSN is given.

Shared pieces: :mod:`._common` (exit statuses, errors, checks, option
types), :mod:`._connect` (DSN, connections, logging), :mod:`._render`
(the demo's progress bar and table), :mod:`._tally` (the demo's check).

Exit status: 0 success (``listen`` also ends with 0 on Ctrl-C, SIGTERM or a
closed stdout), 1 the demo found missing or out-of-order notifications or
the server refused a statement, 2 PostgreSQL unreachable or the DSN is
invalid (also: embedded server unavailable), 64 usage error (bad option,
invalid channel name or payload), 130 interrupted (``notify``, ``demo``).
:func:`main` is the one place where these are decided: a command raises a
:class:`~._common.CliError` for a mistake or an unreachable server, and it
becomes a single ``pglisten-fast: error: ...`` line, never a traceback.

The peer comparison (pglisten_fast against other LISTEN clients and a
minimal C libpq loop) is not part of the installed package: it lives in the
source repository and runs from a checkout, ``python benchmarks/compare.py``.

Only the standard library is used here (argparse; the progress bar and the
table are drawn by hand) so that the command works wherever the package
does.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

import psycopg

import pglisten_fast as pgl

from . import demo, listen, notify
from ._common import (
    DSN_ENV_VAR,
    EXIT_CONNECT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    Run,
    error,
    libpq_version,
)
from ._connect import setup_logging, startup_quiet

__all__ = [
    "DSN_ENV_VAR",
    "EXIT_CONNECT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

#: Each command adds itself to the parser, in the order ``--help`` lists them.
_REGISTRATIONS = (listen.register, notify.register, demo.register)

_EPILOG = f"""\
examples:
  {PROG} demo                         burst of 1,000,000 on an embedded server
  {PROG} demo --dsn postgresql://localhost/app --count 100000
  {PROG} listen orders payments --dsn "host=db dbname=app"
  {PROG} listen jobs --count 1        wait for one notification, print it, exit
  {PROG} notify orders 42
  seq 100000 | {PROG} notify orders   one notification per stdin line

connection:
  --dsn takes a libpq connection string or URL.  Without it, ${DSN_ENV_VAR}
  is used; without that, libpq's PGHOST, PGDATABASE... (listen, notify) or
  an embedded throwaway server (demo).

exit status:
  0   success; `listen` also ends with 0 on Ctrl-C, SIGTERM or a closed stdout
  1   the demo found missing or out-of-order notifications; the server
      refused a statement
  2   cannot connect to PostgreSQL or invalid DSN (also: the embedded server
      is not available)
  64  usage error: bad option, invalid channel name or payload
  130 interrupted (notify, demo)

peer comparison:
  The benchmarks against other LISTEN clients (psycopg, asyncpg...) and a
  minimal C libpq loop are not installed with the package: run
  `python benchmarks/compare.py --quick` from a checkout of the source
  repository (see benchmarks/README.md there).
"""

_FORMATTER = argparse.RawDescriptionHelpFormatter


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see ``--help``)."""
    args = _build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.verbose)
    run: Run = args.run
    try:
        return run(args)
    except CliError as e:
        error(str(e))
        return e.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        startup_quiet.active = False


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 64 (EX_USAGE) for usage errors."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description=_wrap(
            "Fast PostgreSQL LISTEN/NOTIFY from the command line: listen, "
            "notify, and a burst demo."),
        epilog=_EPILOG,
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--version", action="version", version=_version_text())
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log to stderr: -v info, -vv debug (default: warnings only)",
    )

    # Options every command takes (declared once).
    shared = _Parser(add_help=False)
    shared.add_argument(
        "--dsn", metavar="DSN", default=None,
        help=f"libpq connection string or URL (default: ${DSN_ENV_VAR}; "
        "see 'connection' below)",
    )
    shared.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="log to stderr: -v info, -vv debug",
    )

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_command(
        name: str, run: Run, *, help: str, description: str
    ) -> argparse.ArgumentParser:
        p = commands.add_parser(
            name, parents=[shared], formatter_class=_FORMATTER, epilog=_EPILOG,
            help=help, description=_wrap(description),
        )
        p.set_defaults(run=run)
        return p

    for register in _REGISTRATIONS:
        register(add_command)
    return parser


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=min(79, shutil.get_terminal_size().columns - 2))


def _version_text() -> str:
    return (
        f"{PROG} {pgl.__version__} (read path: {pgl.__impl__}; psycopg "
        f"{psycopg.__version__} [{psycopg.pq.__impl__}]; libpq {libpq_version()})"
    )
