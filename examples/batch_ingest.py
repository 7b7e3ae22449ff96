"""Batch ingest: drain notification bursts with get_batch, one COPY per batch.

A worker listens on the ``events`` channel and stores every payload in an
``events`` table.  Instead of one INSERT per notification it takes whatever
is buffered with ``sub.get_batch(max_items=5000, timeout=1.0)`` (waiting up
to a second for the first item, then taking up to 5,000 without waiting)
and writes the batch with a single ``COPY`` in one transaction.  Under load
batches grow and the per-notification cost falls; when idle the worker
wakes once a second to report.

Markers are logged: ``"overflow"`` ones carry the number of notifications
lost because the buffer was full (re-fetch them from their source if they
matter); ``"reconnect"`` ones say that notifications sent while the
connection was down are lost (NOTIFY is not durable).

Usage::

    python examples/batch_ingest.py [DSN]                 # worker; Ctrl-C
    python examples/batch_ingest.py [DSN] --demo-once [--count N]

    # feed it from another terminal:
    seq 100000 | pglisten-fast notify events

With ``--demo-once`` a producer thread sends N events (default 20,000) in
bursts of 2,000 per transaction; the worker exits once all are stored and
checks the table (exit status 0 if every event is there exactly once).

The DSN is the first argument, else ``$PGLISTEN_FAST_DSN``, else libpq's
``PG*`` variables.  The table is created if missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any

import psycopg

import pglisten_fast as pgl

CHANNEL = "events"
MAX_BATCH = 5000

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    payload text NOT NULL,
    sender_pid integer NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
)
"""


class Ingester:
    """Counts and stores batches; prints progress about once a second."""

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.db = db
        self.stored = 0
        self.batches = 0
        self.lost = 0
        self.started = time.monotonic()
        self._last_report = self.started
        self._reported = 0

    def store(self, batch: list[pgl.Notification]) -> list[pgl.Notification]:
        """Write the notifications of ``batch`` with one COPY; return them."""
        items = []
        for n in batch:
            if n.connection_reset:
                if n.reason == "overflow":
                    self.lost += n.dropped
                    print(f"marker: {n.dropped} notifications lost (buffer full)")
                else:
                    print(f"marker: {n.reason} on {n.channel!r}")
            else:
                items.append(n)
        if items:
            with self.db.transaction(), self.db.cursor() as cur, cur.copy(
                "COPY events (channel, payload, sender_pid) FROM STDIN"
            ) as copy:
                for n in items:
                    copy.write_row((n.channel, n.payload, n.pid))
            self.stored += len(items)
            self.batches += 1
        return items

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < 1.0:
            return
        rate = (self.stored - self._reported) / max(now - self._last_report, 1e-9)
        avg = self.stored / self.batches if self.batches else 0.0
        print(
            f"stored {self.stored:,} events in {self.batches:,} batches "
            f"(avg {avg:,.0f}/batch, {rate:,.0f}/s now), lost {self.lost:,}",
            flush=True,
        )
        self._last_report, self._reported = now, self.stored


def produce(
    dsn: str, ready: threading.Event, run_id: str, count: int, burst: int = 2000
) -> None:
    """Demo producer: ``count`` unique payloads, ``burst`` per transaction."""
    if not ready.wait(30):
        return
    with psycopg.connect(dsn) as conn:
        for lo in range(0, count, burst):
            hi = min(count, lo + burst)
            pgl.notify_many(conn, CHANNEL, (f"{run_id}:{i}" for i in range(lo, hi)))
            conn.commit()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", nargs="?",
                        default=os.environ.get("PGLISTEN_FAST_DSN", ""))
    parser.add_argument("--demo-once", action="store_true",
                        help="send events to ourselves, store them, check, exit")
    parser.add_argument("--count", type=int, default=20_000,
                        help="events sent by --demo-once (default 20,000)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")

    try:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        db = psycopg.connect(args.dsn, autocommit=True)
    except psycopg.OperationalError as e:
        print(f"batch_ingest: cannot connect: {e}", file=sys.stderr)
        return 2

    run_id = uuid.uuid4().hex[:12]
    ready = threading.Event()
    ingester = Ingester(db)
    mine = 0  # demo: our own events stored so far
    try:
        with db, pgl.Listener(args.dsn) as listener:
            sub = listener.listen(CHANNEL)
            if args.demo_once:
                threading.Thread(
                    target=produce, args=(args.dsn, ready, run_id, args.count),
                    daemon=True,
                ).start()
            idle_since = time.monotonic()
            while True:
                batch = sub.get_batch(max_items=MAX_BATCH, timeout=1.0)
                if any(n.reason == "listen" for n in batch):
                    ready.set()  # LISTEN is in effect: the producer may start
                stored = ingester.store(batch)
                ingester.report()
                if not args.demo_once:
                    continue
                mine += sum(1 for n in stored if n.payload.startswith(run_id + ":"))
                if batch:
                    idle_since = time.monotonic()
                if mine >= args.count:
                    break
                if time.monotonic() - idle_since > 30:
                    print("nothing arrived for 30 s; giving up", file=sys.stderr)
                    break
            ingester.report(force=True)
            if not args.demo_once:
                return 0
            row = db.execute(
                "SELECT count(*), count(DISTINCT payload) FROM events "
                "WHERE payload LIKE %s",
                (run_id + ":%",),
            ).fetchone()
            total, distinct = row if row is not None else (0, 0)
            ok = total == distinct == args.count and ingester.lost == 0
            print(
                f"table holds {total:,} events of this run ({distinct:,} distinct) "
                f"of {args.count:,} sent: {'OK' if ok else 'MISMATCH'}",
                flush=True,
            )
            return 0 if ok else 1
    except pgl.ConnectError as e:
        print(f"batch_ingest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        ingester.report(force=True)
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
