"""Reconcile worker: process every row exactly once, even when NOTIFY is lost.

NOTIFY is not durable: notifications sent while the worker is stopped or
disconnected are gone, a full buffer drops some, and a sender can commit
its row and crash before its NOTIFY (or forget to send one).  A worker that
must not miss a row therefore treats notifications as a *hint* and the
table as the truth:

* each row of ``reconcile_tasks`` has ``done_at``, NULL while the row is
  pending; processing a row *claims* it in the same transaction
  (``UPDATE ... SET done_at = now() WHERE done_at IS NULL ... RETURNING``),
  so a row is processed once however many times it is seen, and by one
  worker when several run (``FOR UPDATE SKIP LOCKED``);
* a notification (payload: the row id) claims that row at once;
* a *marker* (``connection_reset``: LISTEN took effect, a reconnect, an
  overflow) claims every pending row: whatever was missed is there;
* and every ``--reconcile-every`` seconds a full pass does the same, which
  catches rows whose NOTIFY never existed.

One loop drives all three with ``sub.get_batch(timeout=...)``: the timeout
is the time left until the next full pass, and an empty batch means it is
due.  (Why a ``done_at IS NULL`` flag and not ``updated_at > last_seen``?
Timestamps and sequence values are taken before commit, so a slow
transaction can commit a row "in the past", behind a high-water mark.)

Usage::

    python examples/reconcile_worker.py [DSN] [--reconcile-every S]  # Ctrl-C
    python examples/reconcile_worker.py [DSN] --demo-once

    # in psql: a task with its hint, one without, a forced full pass
    WITH t AS (INSERT INTO reconcile_tasks (body) VALUES ('a') RETURNING id)
        SELECT pg_notify('reconcile_tasks', id::text) FROM t;
    INSERT INTO reconcile_tasks (body) VALUES ('b');
    NOTIFY reconcile_tasks, '*';

With ``--demo-once``: tasks are added while no worker runs, then the worker
starts and picks them up on its ``"listen"`` marker; tasks added with a
NOTIFY are processed at once; tasks added without one are processed by the
next periodic pass; at the end every task must have been processed exactly
once (exit status 0).

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
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg

import pglisten_fast as pgl

CHANNEL = "reconcile_tasks"
BATCH = 500  # rows claimed per transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS reconcile_tasks (
    id bigserial PRIMARY KEY,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz                      -- NULL: still to be processed
);
CREATE INDEX IF NOT EXISTS reconcile_tasks_pending
    ON reconcile_tasks (id) WHERE done_at IS NULL;
"""

# Claim pending rows (all of them, or only %(ids)s) and return them.
CLAIM = """
UPDATE reconcile_tasks SET done_at = now()
WHERE id IN (
    SELECT id FROM reconcile_tasks
    WHERE done_at IS NULL AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
RETURNING id, body
"""

log = logging.getLogger("reconcile_worker")
#: handle(task_id, body, how): how = "notify", "reconcile" or "marker (<reason>)"
Handler = Callable[[int, str, str], None]


def ensure_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('reconcile_tasks'))")
        conn.execute(SCHEMA)


def add_task(conn: psycopg.Connection[Any], body: str, *, notify: bool = True) -> int:
    """Producer: insert a task and (normally) NOTIFY its id in one transaction."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO reconcile_tasks (body) VALUES (%s) RETURNING id", (body,)
        ).fetchone()
        assert row is not None
        if notify:
            pgl.notify(conn, CHANNEL, str(row[0]))
    return int(row[0])


def print_task(task_id: int, body: str, how: str) -> None:
    print(f"task {task_id} ({how}): {body}", flush=True)


class ReconcileWorker:
    """``run()`` processes tasks until ``stop()`` (from any thread)."""

    def __init__(
        self, dsn: str, *, reconcile_every: float = 30.0, handle: Handler = print_task
    ) -> None:
        self.dsn = dsn
        self.reconcile_every = reconcile_every
        self.handle = handle
        self.listener = pgl.Listener(dsn)
        self.full_passes = 0  # completed; the first one is the "listen" marker's

    def stop(self) -> None:
        self.listener.stop()  # get_batch() raises pgl.Closed once drained

    def run(self) -> None:
        conn = psycopg.connect(self.dsn, autocommit=True)
        try:
            with self.listener:  # start() raises pgl.ConnectError
                self._loop(conn, self.listener.listen(CHANNEL))
        finally:
            conn.close()

    def _loop(self, conn: psycopg.Connection[Any], sub: pgl.Subscription) -> None:
        next_pass: float | None = None  # the "listen" marker brings the first pass
        while True:
            # Wait for hints until the next full pass is due ([] then).
            timeout = None
            if next_pass is not None:
                timeout = max(0.0, next_pass - time.monotonic())
            try:
                batch = sub.get_batch(max_items=BATCH, timeout=timeout)
            except pgl.Closed:
                return
            ids: set[int] = set()
            full = ""
            for n in batch:
                if n.connection_reset:
                    full = f"marker ({n.reason})"  # we may have missed anything
                elif n.payload.isdigit():
                    ids.add(int(n.payload))
                else:
                    full = "reconcile"              # e.g. NOTIFY ..., '*'
            if not full and next_pass is not None and time.monotonic() >= next_pass:
                full = "reconcile"                  # the periodic pass is due
            try:
                if full:
                    self.claim(conn, None, full)   # every pending row, ids included
                    self.full_passes += 1
                    next_pass = time.monotonic() + self.reconcile_every
                elif ids:
                    self.claim(conn, sorted(ids), "notify")
            except psycopg.OperationalError as e:
                log.warning("database error (%s); full pass in 1 s", e)
                conn.close()
                time.sleep(1)
                conn = psycopg.connect(self.dsn, autocommit=True)
                next_pass = time.monotonic()

    def claim(
        self, conn: psycopg.Connection[Any], ids: list[int] | None, how: str
    ) -> int:
        """Claim and handle pending rows (``ids=None``: all), BATCH at a time.

        Each batch is one transaction: if ``handle`` raises, its claims are
        rolled back and the next full pass retries them.
        """
        done = 0
        while True:
            try:
                with conn.transaction():
                    rows = conn.execute(CLAIM, {"ids": ids, "limit": BATCH}).fetchall()
                    for task_id, body in rows:
                        self.handle(task_id, body, how)
            except psycopg.OperationalError:
                raise
            except Exception:
                log.exception("handling failed; the batch is retried later")
                return done
            done += len(rows)
            if len(rows) < BATCH:
                return done


def demo(dsn: str, reconcile_every: float) -> int:
    """Lose NOTIFYs on purpose; check that every task is processed once."""
    seen: Counter[int] = Counter()
    how: dict[int, str] = {}
    lock = threading.Lock()

    def handle(task_id: int, body: str, via: str) -> None:
        print_task(task_id, body, via)
        with lock:
            seen[task_id] += 1
            how[task_id] = via

    def wait_for(ids: list[int], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not all(i in how for i in ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks {ids} not processed within {timeout} s")
            time.sleep(0.02)

    with psycopg.connect(dsn, autocommit=True) as conn:
        before = [add_task(conn, f"added while stopped {i}") for i in range(3)]
        print("demo: 3 tasks added while no worker runs (their NOTIFY is lost)")
        worker = ReconcileWorker(dsn, reconcile_every=reconcile_every, handle=handle)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            wait_for(before)
            hinted = [add_task(conn, f"with notify {i}") for i in range(3)]
            wait_for(hinted)
            silent = [add_task(conn, f"without notify {i}", notify=False)
                      for i in range(2)]
            print("demo: 2 tasks added without NOTIFY", flush=True)
            wait_for(silent)
        finally:
            worker.stop()
            thread.join(30)
    mine = before + hinted + silent
    once = all(seen[i] == 1 for i in mine)
    ok = (once and all(how[i] == "marker (listen)" for i in before)
          and all(how[i] == "reconcile" for i in silent))
    print(f"{len(mine)} tasks, each processed once: {'yes' if once else 'NO'}; "
          f"{'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", nargs="?",
                        default=os.environ.get("PGLISTEN_FAST_DSN", ""))
    parser.add_argument("--reconcile-every", type=float, default=None, metavar="S",
                        help="seconds between full passes (30; --demo-once: 1)")
    parser.add_argument("--demo-once", action="store_true",
                        help="add tasks, lose some NOTIFYs, check, exit")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        ensure_schema(args.dsn)
        if args.demo_once:
            return demo(args.dsn, args.reconcile_every or 1.0)
        ReconcileWorker(args.dsn, reconcile_every=args.reconcile_every or 30.0).run()
    except (pgl.ConnectError, psycopg.OperationalError) as e:
        print(f"reconcile_worker: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
