"""The ``pglisten-fast`` command line (also ``python -m pglisten_fast``).

Subcommands:

``listen CHANNEL...``
    print every notification and marker as one JSON line on stdout;
``notify CHANNEL [PAYLOAD]``
    send one notification, or one per line of stdin;
``demo``
    publish a burst of notifications in one transaction and receive it,
    against an embedded throwaway PostgreSQL unless a DSN is given;

Exit status: 0 success (``listen`` also ends with 0 on Ctrl-C, SIGTERM or a
closed stdout), 1 the demo found missing or out-of-order notifications or
the server refused a statement, 2 PostgreSQL unreachable or the DSN is
invalid (also: embedded server unavailable), 64 usage error (bad option,
invalid channel name or payload), 130 interrupted (``notify``, ``demo``).

The peer comparison (pglisten_fast against other LISTEN clients and a
minimal C libpq loop) is not part of the installed package: it lives in the
source repository and runs from a checkout, ``python benchmarks/compare.py``.

Only the standard library is used here (argparse; the progress bar and the
table are drawn by hand) so that the command works wherever the package
does.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import math
import os
import re
import select
import shutil
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from json.encoder import encode_basestring_ascii as _json_str
from types import FrameType
from typing import Any, NoReturn, TextIO

import psycopg
from psycopg.conninfo import conninfo_to_dict

import pglisten_fast as pgl

__all__ = [
    "DSN_ENV_VAR",
    "EXIT_CONNECT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

PROG = "pglisten-fast"

#: Environment variable holding the default DSN of every subcommand.
DSN_ENV_VAR = "PGLISTEN_FAST_DSN"

EXIT_OK = 0
#: The demo found missing, extra or out-of-order notifications; a statement failed.
EXIT_FAILED = 1
#: Cannot connect (bad DSN, server unreachable), no embedded server.
EXIT_CONNECT = 2
#: Usage error (``EX_USAGE`` from sysexits.h): bad option, channel name, payload.
EXIT_USAGE = 64
#: Interrupted by Ctrl-C or SIGTERM (``notify``, ``demo``).
EXIT_INTERRUPTED = 130

#: Payloads per ``notify_many`` round trip when reading stdin.
NOTIFY_BATCH = 10_000
#: Items taken per ``get_batch`` call by ``listen`` and ``demo``.
RECEIVE_BATCH = 65_536

logger = logging.getLogger("pglisten_fast.cli")


class _UsageError(Exception):
    """A user mistake: reported on one line, exit status 64."""


class _ConnectProblem(Exception):
    """PostgreSQL cannot be reached: reported on one line, exit status 2."""


class _Failed(Exception):
    """The server refused something: reported on one line, exit status 1."""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines, tabs) made one space."""
    return " ".join(text.split())


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _resolve_dsn(given: str | None) -> str:
    """``--dsn``, else ``$PGLISTEN_FAST_DSN``, else ``""`` (libpq's PG* variables)."""
    if given is not None:
        return given
    return os.environ.get(DSN_ENV_VAR, "")


def _conninfo_params(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise _ConnectProblem(f"invalid DSN: {_one_line(str(e))}") from None


def _connect(dsn: str, *, autocommit: bool) -> psycopg.Connection[Any]:
    """A psycopg connection, or :class:`_ConnectProblem` with a one-line reason."""
    extra: dict[str, Any] = {}
    if "connect_timeout" not in _conninfo_params(dsn):
        extra["connect_timeout"] = 10
    try:
        return psycopg.Connection.connect(dsn, autocommit=autocommit, **extra)
    except psycopg.Error as e:
        raise _ConnectProblem(
            f"cannot connect to PostgreSQL: {_one_line(str(e))}"
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


_startup_quiet = _StartupQuiet()


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else (
        logging.INFO if verbose == 1 else logging.DEBUG
    )
    handler = logging.StreamHandler(sys.stderr)
    if verbose > 0:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        fmt = f"{PROG}: %(levelname)s: %(message)s"
        handler.addFilter(_startup_quiet)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    # main() may run more than once in a process (tests): replace our handler.
    for old in [h for h in root.handlers if getattr(h, "_pglisten_fast_cli", False)]:
        root.removeHandler(old)
    handler._pglisten_fast_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def _start_listener(dsn: str, **kwargs: Any) -> pgl.Listener:
    """A started Listener, or :class:`_ConnectProblem` with a one-line reason."""
    _conninfo_params(dsn)  # a clear message for an unparsable DSN
    try:
        listener = pgl.Listener(dsn, **kwargs)
    except ValueError as e:
        raise _ConnectProblem(_one_line(str(e))) from None
    _startup_quiet.active = True
    try:
        listener.start(wait=True)
    except pgl.ConnectError as e:
        cause = e.__cause__
        reason = str(cause) if cause is not None else str(e)
        raise _ConnectProblem(
            f"cannot connect to PostgreSQL: {_one_line(reason)}"
        ) from None
    _startup_quiet.active = False
    return listener


#: PostgreSQL identifiers are at most 63 bytes (NAMEDATALEN - 1); the server
#: would silently truncate a longer channel name.
MAX_NAME_BYTES = 63
#: A NOTIFY payload must be shorter than 8000 bytes (PostgreSQL's default).
MAX_PAYLOAD_BYTES = 7999


def _channel_problem(name: str) -> str | None:
    """Why PostgreSQL cannot take ``name`` as a channel, or None if it can.

    The library refuses the same names (``listen``, ``notify``); checking
    here first reports them before any connection is attempted.
    """
    if not name:
        return "channel name must not be empty"
    if "\x00" in name:
        return f"channel name must not contain NUL: {name!r}"
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"channel name is not valid Unicode: {name!r}"
    if n > MAX_NAME_BYTES:
        return (
            f"channel name is {n} bytes in UTF-8; PostgreSQL allows at most "
            f"{MAX_NAME_BYTES} (it would silently truncate it): {name!r}"
        )
    return None


def _check_channels(names: Sequence[str]) -> list[str]:
    """``names``, or :class:`_UsageError` for the first unusable one."""
    for name in names:
        problem = _channel_problem(name)
        if problem is not None:
            raise _UsageError(f"invalid channel name: {problem}")
    return list(names)


def _check_payload(payload: str, encoding: str = "utf-8") -> None:
    """:class:`ValueError` unless PostgreSQL accepts ``payload`` in ``encoding``."""
    if "\x00" in payload:
        raise ValueError("payload must not contain NUL")
    size = len(payload.encode(encoding))
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"payload is {size} bytes; PostgreSQL allows at most "
            f"{MAX_PAYLOAD_BYTES} bytes"
        )


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
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


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # pragma: no cover - stdout without a fd
        pass


def _parse_size(text: str) -> int:
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


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _human_size(n: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n:,} bytes"


def _human_rate(per_second: float) -> str:
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f} M/s"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f} k/s"
    return f"{per_second:.0f}/s"


def _pg_version(num: int) -> str:
    """libpq/server version number (``150004``) as text (``15.4``)."""
    if num >= 100_000:
        return f"{num // 10_000}.{num % 10_000}"
    return f"{num // 10_000}.{num // 100 % 100}.{num % 100}"


def _libpq_version() -> str:
    try:
        return _pg_version(psycopg.pq.version())
    except Exception:  # pragma: no cover - exotic libpq
        return "unknown"


def _version_text() -> str:
    return (
        f"{PROG} {pgl.__version__} (read path: {pgl.__impl__}; psycopg "
        f"{psycopg.__version__} [{psycopg.pq.__impl__}]; libpq {_libpq_version()})"
    )


def _unicode_ok(stream: TextIO) -> bool:
    enc = (getattr(stream, "encoding", None) or "ascii").lower().replace("-", "")
    return enc in ("utf8", "utf_8")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------
# listen
# ---------------------------------------------------------------------------


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


def _cmd_listen(args: argparse.Namespace) -> int:
    channels = _check_channels(args.channels)
    dsn = _resolve_dsn(args.dsn)
    limit: int | None = args.count
    out = sys.stdout
    line = _json_line_maker()
    with _sigterm_as_interrupt():
        listener = _start_listener(
            dsn, buffer_size=args.buffer_size, overflow=args.overflow
        )
        try:
            try:
                sub = listener.listen(*channels)
            except (TypeError, ValueError) as e:  # refused by the library
                raise _UsageError(f"invalid channel name: {e}") from None
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


# ---------------------------------------------------------------------------
# notify
# ---------------------------------------------------------------------------


def _stdin_ready(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):  # pragma: no cover - unselectable stdin
        return True


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


def _cmd_notify(args: argparse.Namespace) -> int:
    (channel,) = _check_channels([args.channel])
    dsn = _resolve_dsn(args.dsn)
    with _sigterm_as_interrupt():
        if args.payload is not None:
            try:
                _check_payload(args.payload)
            except ValueError as e:
                raise _UsageError(f"invalid payload: {e}") from None
            with _connect(dsn, autocommit=True) as conn:
                try:
                    pgl.notify(conn, channel, args.payload)
                except ValueError as e:  # not encodable in the client encoding
                    raise _UsageError(f"invalid payload: {e}") from None
                except psycopg.Error as e:
                    raise _Failed(f"NOTIFY failed: {_one_line(str(e))}") from None
            logger.info("sent 1 notification on %r", channel)
            return EXIT_OK
        return _notify_stdin(dsn, channel, args.batch_size)


def _notify_stdin(dsn: str, channel: str, batch_size: int) -> int:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        raise _UsageError("no PAYLOAD given and stdin is not readable") from None
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    if os.isatty(fd):
        _note("reading payloads from the terminal, one per line; end with Ctrl-D")
    sent = trips = duplicates = 0
    lineno = 0
    with _connect(dsn, autocommit=True) as conn:
        try:
            client_encoding = conn.info.encoding
            for batch in _stdin_batches(fd, encoding, batch_size):
                for payload in batch:
                    lineno += 1
                    try:
                        _check_payload(payload, client_encoding)
                    except ValueError as e:
                        raise _UsageError(
                            f"stdin line {lineno}: {e} ({sent:,} notifications "
                            "were sent before it)"
                        ) from None
                duplicates += len(batch) - len(set(batch))
                # Autocommit: each batch is one statement, one transaction.
                sent += pgl.notify_many(conn, channel, batch)
                trips += 1
        except UnicodeDecodeError as e:
            raise _UsageError(
                f"stdin is not valid {encoding} after line {lineno}: {e.reason} "
                f"({sent:,} notifications were sent before it)"
            ) from None
        except psycopg.OperationalError as e:
            raise _ConnectProblem(
                f"lost the connection after sending {sent:,} notifications: "
                f"{_one_line(str(e))}"
            ) from None
        except psycopg.Error as e:
            raise _Failed(
                f"NOTIFY failed after {sent:,} notifications: {_one_line(str(e))}"
            ) from None
        except KeyboardInterrupt:
            _note(f"interrupted: sent {sent:,} notifications on {channel!r}")
            raise
    noun = "notification" if sent == 1 else "notifications"
    msg = f"sent {sent:,} {noun} on {channel!r} in {trips:,} round trip"
    msg += "" if trips == 1 else "s"
    if duplicates:
        msg += (
            f" ({duplicates:,} repeated payloads within a batch reach listeners "
            "once: PostgreSQL folds identical notifications of one transaction)"
        )
    _note(msg)
    return EXIT_OK


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar; on a non-terminal, only the final line."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.tty = _isatty(stream)
        self.unicode = _unicode_ok(stream)
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_len = 0

    def update(self, done: int) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._draw(done, now - self.start, final=False)

    def finish(self, done: int, elapsed: float | None = None) -> None:
        if elapsed is None:
            elapsed = time.perf_counter() - self.start
        if self.tty:
            self._draw(done, elapsed, final=True)
        else:
            rate = done / elapsed if elapsed > 0 else 0.0
            print(
                f"{self.label} {done:,}/{self.total:,} in {elapsed:.2f} s "
                f"({_human_rate(rate)})",
                file=self.stream, flush=True,
            )

    def _draw(self, done: int, elapsed: float, *, final: bool) -> None:
        frac = min(1.0, done / self.total) if self.total else 1.0
        rate = done / elapsed if elapsed > 0 else 0.0
        tail = (
            f" {done:,}/{self.total:,} {frac * 100:5.1f}%  {_human_rate(rate)}"
            f"  {elapsed:.1f} s"
        )
        cols = shutil.get_terminal_size((80, 24)).columns
        width = max(10, min(40, cols - len(self.label) - len(tail) - 4))
        filled = int(frac * width)
        full, empty = ("█", "░") if self.unicode else ("#", "-")
        bar = full * filled + empty * (width - filled)
        text = f"{self.label} [{bar}]{tail}"
        # Pad over the remains of a longer previous line.
        shown = text.ljust(self._last_len)
        self._last_len = len(text)
        self.stream.write("\r" + shown + ("\n" if final else ""))
        self.stream.flush()


def _draw_table(rows: Sequence[tuple[str, str]], stream: TextIO) -> None:
    w1 = max(len(k) for k, _ in rows)
    w2 = max(len(v) for _, v in rows)
    if _unicode_ok(stream):
        h, v, tl, tm, tr, ml, mm, mr, bl, bm, br = "─│┌┬┐├┼┤└┴┘"
    else:
        h, v, tl, tm, tr, ml, mm, mr, bl, bm, br = "-|+++++++++"
    top = f"{tl}{h * (w1 + 2)}{tm}{h * (w2 + 2)}{tr}"
    mid = f"{ml}{h * (w1 + 2)}{mm}{h * (w2 + 2)}{mr}"
    bottom = f"{bl}{h * (w1 + 2)}{bm}{h * (w2 + 2)}{br}"
    lines = [top]
    for i, (key, value) in enumerate(rows):
        lines.append(f"{v} {key.ljust(w1)} {v} {value.ljust(w2)} {v}")
        if i == 0:
            lines.append(mid)
    lines.append(bottom)
    print("\n".join(lines), file=stream, flush=True)


class _Publisher(threading.Thread):
    """COMMITs the demo transaction while the main thread receives."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        super().__init__(name="pglisten-fast-demo-commit", daemon=True)
        self.conn = conn
        self.started_at = 0.0
        self.finished_at = 0.0
        self.error: BaseException | None = None
        self.begun = threading.Event()

    def run(self) -> None:
        try:
            self.started_at = time.perf_counter()
            self.begun.set()
            self.conn.commit()
            self.finished_at = time.perf_counter()
        except BaseException as e:
            self.error = e
        finally:
            self.begun.set()


class _Tally:
    """Checks the received stream: completeness, order, gaps, markers."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.expected = 0          # the next index we should see
        self.received = 0
        self.dropped = 0           # reported by overflow markers
        self.markers: dict[str, int] = {}
        self.order_errors: list[str] = []
        self.bad_payloads = 0
        self.extra = 0

    def add(self, batch: list[pgl.Notification]) -> None:
        # Fast path: no marker, exactly the next consecutive indexes.
        try:
            values = list(map(int, [n.payload for n in batch]))
        except ValueError:
            pass
        else:
            start = self.expected
            if values == list(range(start, start + len(values))):
                self.expected += len(values)
                self.received += len(values)
                return
        for n in batch:
            if n.connection_reset:
                reason = n.reason or "?"
                self.markers[reason] = self.markers.get(reason, 0) + 1
                if reason == "overflow":
                    self.dropped += n.dropped
                    self.expected += n.dropped
                continue
            try:
                value = int(n.payload)
            except ValueError:
                self.bad_payloads += 1
                continue
            if value >= self.total:
                self.extra += 1
                continue
            if value != self.expected and len(self.order_errors) < 5:
                self.order_errors.append(f"got #{value} where #{self.expected} was due")
            self.expected = value + 1
            self.received += 1

    @property
    def complete(self) -> bool:
        return self.received + self.dropped >= self.total


def _cmd_demo(args: argparse.Namespace) -> int:
    count: int = args.count
    size: int = args.payload_size
    digits = len(str(count - 1))
    if size < digits:
        raise _UsageError(
            f"--payload-size {size} is too small for {count:,} distinct payloads: "
            f"at least {digits} bytes are needed (PostgreSQL folds identical "
            "payloads sent in one transaction, so each must be unique)"
        )
    if size > MAX_PAYLOAD_BYTES:
        raise _UsageError(
            f"--payload-size must be at most {MAX_PAYLOAD_BYTES} "
            "(PostgreSQL's payload limit)"
        )
    dsn = args.dsn if args.dsn is not None else os.environ.get(DSN_ENV_VAR)
    out = sys.stdout
    cluster: Any = None
    with _sigterm_as_interrupt():
        try:
            if not dsn:
                cluster = _start_embedded(out)
                dsn = cluster.dsn
                where = "embedded throwaway PostgreSQL"
            else:
                where = "from --dsn" if args.dsn is not None else f"from ${DSN_ENV_VAR}"
            return _run_demo(args, dsn, where, out)
        except KeyboardInterrupt:
            print(("\n" if _isatty(out) else "") + "interrupted", file=out, flush=True)
            return EXIT_INTERRUPTED
        finally:
            if cluster is not None:
                cluster.close()


def _start_embedded(out: TextIO) -> Any:
    from pglisten_fast.testing import (  # noqa: PLC0415 - only for the demo
        ClusterError,
        TempCluster,
    )

    print(
        f"No --dsn and no ${DSN_ENV_VAR}: starting an embedded throwaway "
        "PostgreSQL server (removed on exit)...",
        file=out, flush=True,
    )
    t0 = time.perf_counter()
    cluster = TempCluster()
    try:
        cluster.start()
    except ClusterError as e:
        cluster.close()
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise _ConnectProblem(
            f"cannot start the embedded PostgreSQL server: {first} "
            "(pass --dsn to use an existing server)"
        ) from None
    except BaseException:
        cluster.close()
        raise
    print(
        f"Embedded PostgreSQL ready on 127.0.0.1:{cluster.port} "
        f"in {time.perf_counter() - t0:.1f} s.",
        file=out, flush=True,
    )
    return cluster


def _run_demo(args: argparse.Namespace, dsn: str, where: str, out: TextIO) -> int:
    count: int = args.count
    size: int = args.payload_size
    digits = len(str(count - 1))
    pad = " " * (size - digits)
    channel = f"pglisten_fast_demo_{os.getpid()}"
    listener = _start_listener(
        dsn, buffer_size=args.buffer_size, overflow=args.overflow
    )
    try:
        sub = listener.listen(channel)
        try:
            first = sub.get(timeout=30)
        except pgl.Empty:
            _error("LISTEN did not take effect within 30 s")
            return EXIT_FAILED
        tally = _Tally(count)
        tally.add([first])

        with _connect(dsn, autocommit=False) as conn:
            server_version = conn.info.parameter_status("server_version") or "?"
            where = f"{conn.info.host}:{conn.info.port} ({where})"
            # 1. Queue every notification in one transaction (nothing is
            #    delivered before COMMIT).
            queue_bar = _Progress("queueing ", count, out)
            step = 50_000
            try:
                for lo in range(0, count, step):
                    hi = min(count, lo + step)
                    pgl.notify_many(
                        conn, channel, (f"{i:0{digits}d}{pad}" for i in range(lo, hi))
                    )
                    queue_bar.update(hi)
            except psycopg.Error as e:
                raise _Failed(f"pg_notify failed: {_one_line(str(e))}") from None
            queue_bar.finish(count)
            queued_in = time.perf_counter() - queue_bar.start

            # 2. COMMIT on another thread; receive here.
            publisher = _Publisher(conn)
            publisher.start()
            publisher.begun.wait()
            bar = _Progress("receiving", count, out)
            bar.start = publisher.started_at
            first_at = last_at = 0.0
            idle_since = time.perf_counter()
            stalled = 0.0
            while not tally.complete:
                batch = sub.get_batch(RECEIVE_BATCH, timeout=0.1)
                now = time.perf_counter()
                if batch:
                    before = tally.received
                    tally.add(batch)
                    idle_since = now
                    if tally.received > before:  # not only markers
                        last_at = now
                        first_at = first_at or now
                elif publisher.error is not None:
                    break
                elif now - idle_since > args.timeout or (
                    # After a reconnect the rest is lost for good.
                    "reconnect" in tally.markers and now - idle_since > 2.0
                ):
                    stalled = now - idle_since
                    break
                bar.update(tally.received)
            # Anything beyond the count would be a duplicate.
            tally.add(sub.get_batch(RECEIVE_BATCH, timeout=0))
            bar.finish(
                tally.received,
                (last_at - publisher.started_at) if last_at else None,
            )
            publisher.join()
        if publisher.error is not None:
            raise _Failed(f"COMMIT failed: {_one_line(str(publisher.error))}")
        return _demo_report(
            args=args, tally=tally, where=where, out=out,
            queued_in=queued_in, commit_at=publisher.started_at,
            commit_took=publisher.finished_at - publisher.started_at,
            first_at=first_at, last_at=last_at, stalled=stalled,
            server_version=server_version,
        )
    finally:
        listener.stop()


def _demo_report(
    *,
    args: argparse.Namespace,
    tally: _Tally,
    where: str,
    out: TextIO,
    queued_in: float,
    commit_at: float,
    commit_took: float,
    first_at: float,
    last_at: float,
    stalled: float,
    server_version: str,
) -> int:
    count: int = args.count
    missing = count - tally.received
    ok = (
        missing == 0 and tally.extra == 0 and not tally.order_errors
        and tally.bad_payloads == 0
    )
    problems = []
    if tally.dropped:
        problems.append(f"{tally.dropped:,} dropped (buffer full)")
    if missing - tally.dropped > 0:
        problems.append(f"{missing - tally.dropped:,} missing")
    if tally.extra:
        problems.append(f"{tally.extra:,} unexpected")
    if tally.order_errors:
        problems.append("out of order")
    if tally.bad_payloads:
        problems.append(f"{tally.bad_payloads:,} foreign payloads")
    elapsed = last_at - commit_at if last_at else 0.0
    rate = tally.received / elapsed if elapsed > 0 else 0.0
    span = last_at - first_at if last_at and first_at else 0.0
    stream = (tally.received - 1) / span if span > 0 else 0.0
    markers = ", ".join(f"{k} {v}" for k, v in sorted(tally.markers.items()))
    total_markers = sum(tally.markers.values())
    rows: list[tuple[str, str]] = [
        ("result", "OK: all received, in order" if ok
         else "FAILED: " + ", ".join(problems)),
        ("server", f"{where}"),
        ("sent", f"{count:,} in one transaction (queued in {queued_in:.2f} s)"),
        ("received", f"{tally.received:,}"),
        ("dropped", f"{tally.dropped:,}"),
        ("markers", f"{total_markers} ({markers})" if markers else "0"),
        ("COMMIT duration", f"{commit_took:.3f} s (the server queues them all)"),
        ("COMMIT -> first receipt",
         f"{(first_at - commit_at) * 1e3:.1f} ms (from sending COMMIT)"
         if first_at else "-"),
        ("COMMIT -> last receipt", f"{elapsed:.3f} s" if last_at else "-"),
        ("rate", f"{rate:,.0f} notifications/s (from sending COMMIT)"
         if rate else "-"),
        ("stream rate", f"{stream:,.0f} notifications/s (first to last receipt)"
         if stream else "-"),
        ("payload size", f"{args.payload_size} bytes"),
        ("buffer / overflow",
         f"{_human_size(args.buffer_size)} / {args.overflow}"),
        ("read path", pgl.__impl__),
        ("versions",
         f"pglisten_fast {pgl.__version__}, psycopg {psycopg.__version__} "
         f"({psycopg.pq.__impl__}), libpq {_libpq_version()}, "
         f"server {server_version}"),
    ]
    _draw_table(rows, out)
    if tally.order_errors:
        for err in tally.order_errors:
            print(f"  order error: {err}", file=out)
    if tally.dropped:
        print(
            f"  {tally.dropped:,} notifications were dropped because the "
            f"{_human_size(args.buffer_size)} buffer was full; use a larger "
            "--buffer-size or --overflow block",
            file=out,
        )
    if stalled:
        print(f"  nothing arrived for {stalled:.1f} s; gave up", file=out)
    if "reconnect" in tally.markers:
        print(
            "  the connection was lost and re-established during the run: "
            "notifications committed meanwhile are lost (NOTIFY is not durable)",
            file=out,
        )
    out.flush()
    return EXIT_OK if ok else EXIT_FAILED


# ---------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------

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


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=min(79, shutil.get_terminal_size().columns - 2))


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 64 (EX_USAGE) for usage errors."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> _Parser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description=_wrap(
            "Fast PostgreSQL LISTEN/NOTIFY from the command line: listen, "
            "notify, and a burst demo."),
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=_version_text())
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log to stderr: -v info, -vv debug (default: warnings only)",
    )

    common = _Parser(add_help=False)
    common.add_argument(
        "--dsn", metavar="DSN", default=None,
        help=f"libpq connection string or URL (default: ${DSN_ENV_VAR}; "
        "see 'connection' below)",
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="log to stderr: -v info, -vv debug",
    )

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "listen", parents=[common], formatter_class=fmt, epilog=_EPILOG,
        help="print notifications as JSON lines",
        description=_wrap(
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
    p.add_argument("--count", type=_positive_int, metavar="N", default=None,
                   help="exit after N notifications (markers not counted)")
    p.add_argument("--buffer-size", type=_parse_size, metavar="SIZE",
                   default=16 * 2**20,
                   help="ring buffer size, e.g. 64K, 16M (default: 16M)")
    p.add_argument("--overflow", choices=("drop", "block"), default="drop",
                   help="when the buffer is full: drop (print an overflow marker "
                   "with the count) or block (default: drop)")
    p.set_defaults(func=_cmd_listen)

    p = sub.add_parser(
        "notify", parents=[common], formatter_class=fmt, epilog=_EPILOG,
        help="send a notification, or one per stdin line",
        description=_wrap(
            "Send one notification with PAYLOAD.  Without PAYLOAD, "
            "every line of stdin is sent as one notification (line "
            "terminator removed), up to --batch-size per round trip, each batch "
            "its own transaction; the count is printed on stderr.  PostgreSQL "
            "delivers identical payloads sent in one transaction only once."),
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("payload", metavar="PAYLOAD", nargs="?", default=None,
                   help="the payload (< 8000 bytes); omit to read stdin")
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   default=NOTIFY_BATCH,
                   help=f"stdin lines per round trip (default: {NOTIFY_BATCH:,})")
    p.set_defaults(func=_cmd_notify)

    p = sub.add_parser(
        "demo", parents=[common], formatter_class=fmt, epilog=_EPILOG,
        help="burst demo: publish N in one transaction, receive, verify",
        description=_wrap(
            "Start a Listener, publish N notifications in one "
            "transaction (notify_many), receive them with get_batch while showing "
            "progress, check that every one arrived in order, and print a table "
            "(time from COMMIT to the last receipt, rate, versions...).  Without "
            f"--dsn or ${DSN_ENV_VAR} (plain PG* variables are ignored here) an "
            "embedded throwaway PostgreSQL server is started and removed "
            "afterwards, also on Ctrl-C.  Exit status 0 when everything arrived, "
            "1 otherwise."),
    )
    p.add_argument("--count", type=_positive_int, metavar="N", default=1_000_000,
                   help="notifications to send (default: 1,000,000)")
    p.add_argument("--payload-size", type=int, metavar="B", default=32,
                   help="payload size in bytes (default: 32)")
    p.add_argument("--buffer-size", type=_parse_size, metavar="SIZE",
                   default=16 * 2**20,
                   help="subscription buffer size (default: 16M)")
    p.add_argument("--overflow", choices=("drop", "block"), default="block",
                   help="overflow policy (default: block, so that the demo "
                   "never loses anything; 'drop' is the library default and "
                   "reports what a slow consumer lost)")
    p.add_argument("--timeout", type=_positive_float, metavar="S", default=60.0,
                   help="give up when nothing arrives for S seconds (default: 60)")
    p.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see ``--help``)."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = _build_parser().parse_args(args_list)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _UsageError as e:
        _error(str(e))
        return EXIT_USAGE
    except _ConnectProblem as e:
        _error(str(e))
        return EXIT_CONNECT
    except _Failed as e:
        _error(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        _startup_quiet.active = False

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
