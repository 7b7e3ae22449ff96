"""``pglisten-fast demo``: a burst sent in one transaction, received and checked.

The flow:

1. connect: to ``--dsn`` / ``$PGLISTEN_FAST_DSN``, or else to an embedded
   throwaway server (:class:`pglisten_fast.testing.TempCluster`), removed
   afterwards, also on Ctrl-C or SIGTERM;
2. start a Listener and wait for the channel's ``"listen"`` marker;
3. queue ``--count`` unique payloads with ``notify_many`` in one open
   transaction (nothing is delivered before COMMIT);
4. COMMIT on another thread while this one receives with ``get_batch``,
   checking completeness and order (overflow markers account for drops);
5. print the result table; exit status 0 when everything arrived in order,
   1 otherwise.

The progress bar and the table are drawn by :mod:`._render`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import psycopg

import pglisten_fast as pgl

from .._names import MAX_PAYLOAD_BYTES
from ._common import (
    DSN_ENV_VAR,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    RECEIVE_BATCH,
    AddCommand,
    ConnectProblem,
    Failed,
    UsageError,
    add_buffer_options,
    error,
    libpq_version,
    one_line,
    positive_float,
    positive_int,
    sigterm_as_interrupt,
)
from ._connect import connect, start_listener
from ._render import Progress, draw_table, human_size, isatty
from ._tally import Tally

if TYPE_CHECKING:
    from pglisten_fast.testing import TempCluster


def register(add_command: AddCommand) -> None:
    """Add the ``demo`` command and its options."""
    p = add_command(
        "demo", run,
        help="burst demo: publish N in one transaction, receive, verify",
        description=(
            "Start a Listener, publish N notifications in one "
            "transaction (notify_many), receive them with get_batch while showing "
            "progress, check that every one arrived in order, and print a table "
            "(time from COMMIT to the last receipt, rate, versions...).  Without "
            f"--dsn or ${DSN_ENV_VAR} (plain PG* variables are ignored here) an "
            "embedded throwaway PostgreSQL server is started and removed "
            "afterwards, also on Ctrl-C.  Exit status 0 when everything arrived, "
            "1 otherwise."),
    )
    p.add_argument("--count", type=positive_int, metavar="N", default=1_000_000,
                   help="notifications to send (default: 1,000,000)")
    p.add_argument("--payload-size", type=int, metavar="B", default=32,
                   help="payload size in bytes (default: 32)")
    add_buffer_options(
        p,
        buffer_help="subscription buffer size (default: 16M)",
        overflow="block",
        overflow_help="overflow policy (default: block, so that the demo "
        "never loses anything; 'drop' is the library default and "
        "reports what a slow consumer lost)",
    )
    p.add_argument("--timeout", type=positive_float, metavar="S", default=60.0,
                   help="give up when nothing arrives for S seconds (default: 60)")


def run(args: argparse.Namespace) -> int:
    """Check the options, find or start a server, run the demo."""
    count: int = args.count
    size: int = args.payload_size
    digits = len(str(count - 1))
    if size < digits:
        raise UsageError(
            f"--payload-size {size} is too small for {count:,} distinct payloads: "
            f"at least {digits} bytes are needed (PostgreSQL folds identical "
            "payloads sent in one transaction, so each must be unique)"
        )
    if size > MAX_PAYLOAD_BYTES:
        raise UsageError(
            f"--payload-size must be at most {MAX_PAYLOAD_BYTES} "
            "(PostgreSQL's payload limit)"
        )
    dsn = args.dsn if args.dsn is not None else os.environ.get(DSN_ENV_VAR)
    out = sys.stdout
    cluster: TempCluster | None = None
    with sigterm_as_interrupt():
        try:
            if not dsn:
                cluster = _start_embedded(out)
                dsn = cluster.dsn
                where = "embedded throwaway PostgreSQL"
            else:
                where = "from --dsn" if args.dsn is not None else f"from ${DSN_ENV_VAR}"
            return _run_demo(args, dsn, where, out)
        except KeyboardInterrupt:
            print(("\n" if isatty(out) else "") + "interrupted", file=out, flush=True)
            return EXIT_INTERRUPTED
        finally:
            if cluster is not None:
                cluster.close()


def _start_embedded(out: TextIO) -> TempCluster:
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
        raise ConnectProblem(
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


@dataclass
class _Timings:
    """When things happened (``time.perf_counter()``; 0.0: never)."""

    queued_in: float = 0.0    # seconds spent queueing the burst
    commit_at: float = 0.0    # COMMIT sent
    commit_took: float = 0.0  # until the server answered it
    first_at: float = 0.0     # first notification received
    last_at: float = 0.0      # last notification received
    stalled: float = 0.0      # seconds of silence before giving up


def _run_demo(args: argparse.Namespace, dsn: str, where: str, out: TextIO) -> int:
    count: int = args.count
    channel = f"pglisten_fast_demo_{os.getpid()}"
    listener = start_listener(
        dsn, buffer_size=args.buffer_size, overflow=args.overflow
    )
    try:
        sub = listener.listen(channel)
        try:
            first = sub.get(timeout=30)
        except pgl.Empty:
            error("LISTEN did not take effect within 30 s")
            return EXIT_FAILED
        tally = Tally(count)
        tally.add([first])

        with connect(dsn, autocommit=False) as conn:
            server_version = conn.info.parameter_status("server_version") or "?"
            where = f"{conn.info.host}:{conn.info.port} ({where})"
            timings = _Timings()
            timings.queued_in = _queue(conn, channel, count, args.payload_size, out)
            publisher = _Publisher(conn)
            _receive(sub, publisher, tally, timings, timeout=args.timeout, out=out)
        if publisher.error is not None:
            raise Failed(f"COMMIT failed: {one_line(str(publisher.error))}")
        return _report(
            args, tally, timings, where=where, server_version=server_version,
            out=out,
        )
    finally:
        listener.stop()


def _queue(
    conn: psycopg.Connection[Any], channel: str, count: int, size: int, out: TextIO
) -> float:
    """Queue ``count`` unique payloads in the open transaction; seconds taken.

    Nothing is delivered before COMMIT.
    """
    digits = len(str(count - 1))
    pad = " " * (size - digits)
    queue_bar = Progress("queueing ", count, out)
    step = 50_000
    try:
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            pgl.notify_many(
                conn, channel, (f"{i:0{digits}d}{pad}" for i in range(lo, hi))
            )
            queue_bar.update(hi)
    except psycopg.Error as e:
        raise Failed(f"pg_notify failed: {one_line(str(e))}") from None
    queue_bar.finish(count)
    return time.perf_counter() - queue_bar.start


def _receive(
    sub: pgl.Subscription,
    publisher: _Publisher,
    tally: Tally,
    timings: _Timings,
    *,
    timeout: float,
    out: TextIO,
) -> None:
    """COMMIT on the publisher's thread; receive here until all arrived.

    Gives up after ``timeout`` seconds without anything (2 s after a
    reconnect: the rest is lost for good) or when COMMIT failed.
    """
    publisher.start()
    publisher.begun.wait()
    bar = Progress("receiving", tally.total, out)
    bar.start = publisher.started_at
    first_at = last_at = 0.0
    idle_since = time.perf_counter()
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
        elif now - idle_since > timeout or (
            # After a reconnect the rest is lost for good.
            "reconnect" in tally.markers and now - idle_since > 2.0
        ):
            timings.stalled = now - idle_since
            break
        bar.update(tally.received)
    # Anything beyond the count would be a duplicate.
    tally.add(sub.get_batch(RECEIVE_BATCH, timeout=0))
    bar.finish(
        tally.received,
        (last_at - publisher.started_at) if last_at else None,
    )
    publisher.join()
    timings.first_at, timings.last_at = first_at, last_at
    timings.commit_at = publisher.started_at
    timings.commit_took = publisher.finished_at - publisher.started_at


def _report(
    args: argparse.Namespace,
    tally: Tally,
    t: _Timings,
    *,
    where: str,
    server_version: str,
    out: TextIO,
) -> int:
    """Print the result table and notes; the exit status."""
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
    elapsed = t.last_at - t.commit_at if t.last_at else 0.0
    rate = tally.received / elapsed if elapsed > 0 else 0.0
    span = t.last_at - t.first_at if t.last_at and t.first_at else 0.0
    stream = (tally.received - 1) / span if span > 0 else 0.0
    markers = ", ".join(f"{k} {v}" for k, v in sorted(tally.markers.items()))
    total_markers = sum(tally.markers.values())
    rows: list[tuple[str, str]] = [
        ("result", "OK: all received, in order" if ok
         else "FAILED: " + ", ".join(problems)),
        ("server", f"{where}"),
        ("sent", f"{count:,} in one transaction (queued in {t.queued_in:.2f} s)"),
        ("received", f"{tally.received:,}"),
        ("dropped", f"{tally.dropped:,}"),
        ("markers", f"{total_markers} ({markers})" if markers else "0"),
        ("COMMIT duration", f"{t.commit_took:.3f} s (the server queues them all)"),
        ("COMMIT -> first receipt",
         f"{(t.first_at - t.commit_at) * 1e3:.1f} ms (from sending COMMIT)"
         if t.first_at else "-"),
        ("COMMIT -> last receipt", f"{elapsed:.3f} s" if t.last_at else "-"),
        ("rate", f"{rate:,.0f} notifications/s (from sending COMMIT)"
         if rate else "-"),
        ("stream rate", f"{stream:,.0f} notifications/s (first to last receipt)"
         if stream else "-"),
        ("payload size", f"{args.payload_size} bytes"),
        ("buffer / overflow",
         f"{human_size(args.buffer_size)} / {args.overflow}"),
        ("read path", pgl.__impl__),
        ("versions",
         f"pglisten_fast {pgl.__version__}, psycopg {psycopg.__version__} "
         f"({psycopg.pq.__impl__}), libpq {libpq_version()}, "
         f"server {server_version}"),
    ]
    draw_table(rows, out)
    if tally.order_errors:
        for err in tally.order_errors:
            print(f"  order error: {err}", file=out)
    if tally.dropped:
        print(
            f"  {tally.dropped:,} notifications were dropped because the "
            f"{human_size(args.buffer_size)} buffer was full; use a larger "
            "--buffer-size or --overflow block",
            file=out,
        )
    if t.stalled:
        print(f"  nothing arrived for {t.stalled:.1f} s; gave up", file=out)
    if "reconnect" in tally.markers:
        print(
            "  the connection was lost and re-established during the run: "
            "notifications committed meanwhile are lost (NOTIFY is not durable)",
            file=out,
        )
    out.flush()
    return EXIT_OK if ok else EXIT_FAILED


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
