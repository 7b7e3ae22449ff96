"""asyncio: consume subscriptions with ``async for`` and ``get_batch_async``.

The Listener runs its own selector thread, so an asyncio program does not
need an async driver to receive notifications: subscriptions can be read
from coroutines and never block the event loop.

* ``jobs``: a worker task iterates ``async for n in sub`` and handles one
  job at a time;
* ``metrics``: an aggregator task drains bursts with
  ``await sub.get_batch_async(max_items=1000, timeout=1.0)`` (``[]`` after
  a second without data, so it can do periodic work).

``Listener.start()`` and ``stop()`` block briefly (connect, join the
thread): call them through ``asyncio.to_thread``.  Cancelling a task that
waits in ``get_async``/``get_batch_async`` loses nothing.

Usage::

    python examples/asyncio_consumer.py [DSN]               # Ctrl-C to stop
    python examples/asyncio_consumer.py [DSN] --demo-once   # sends 5 jobs and
                                   # 5,000 metrics itself, exits when all arrived

    # from another terminal:
    pglisten-fast notify jobs build-42
    seq 1000 | pglisten-fast notify metrics

The DSN is the first argument, else ``$PGLISTEN_FAST_DSN``, else libpq's
``PG*`` variables.
"""

from __future__ import annotations

import asyncio
import os
import sys

import psycopg

import pglisten_fast as pgl


async def job_worker(
    sub: pgl.Subscription, ready: asyncio.Event, expected: int | None
) -> int:
    """Handle jobs one by one with ``async for``."""
    done = 0
    async for n in sub:
        if n.connection_reset:
            print(f"[jobs] marker ({n.reason}): re-scan pending jobs here", flush=True)
            ready.set()
            continue
        print(f"[jobs] running job {n.payload!r}", flush=True)
        await asyncio.sleep(0)  # the job's own awaits go here
        done += 1
        if expected is not None and done >= expected:
            break
    return done


async def metrics_aggregator(
    sub: pgl.Subscription, ready: asyncio.Event, expected: int | None
) -> tuple[int, float]:
    """Sum numeric payloads, a batch at a time, with ``get_batch_async``."""
    count, total = 0, 0.0
    while expected is None or count < expected:
        batch = await sub.get_batch_async(max_items=1000, timeout=1.0)
        if not batch:
            print(f"[metrics] idle; {count:,} values so far", flush=True)
            continue
        for n in batch:
            if n.connection_reset:
                print(f"[metrics] marker ({n.reason})", flush=True)
                ready.set()
            else:
                count += 1
                total += float(n.payload)
        print(f"[metrics] batch of {len(batch):,}: {count:,} values, "
              f"sum {total:,.0f}", flush=True)
    return count, total


async def produce(
    dsn: str, ready: list[asyncio.Event], n_jobs: int, n_metrics: int
) -> None:
    """Demo producer using psycopg's own asyncio connection."""
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 30)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for i in range(n_jobs):
            await conn.execute("SELECT pg_notify('jobs', %s)", (f"job-{i}",))
        # One statement, one transaction: a burst of n_metrics notifications.
        await conn.execute(
            "SELECT count(pg_notify('metrics', v::text)) "
            "FROM generate_series(1, %s) AS v",
            (n_metrics,),
        )


async def amain(dsn: str, demo: bool) -> int:
    listener = pgl.Listener(dsn)
    await asyncio.to_thread(listener.start)  # raises pgl.ConnectError
    try:
        jobs = listener.listen("jobs")
        metrics = listener.listen("metrics")
        jobs_ready, metrics_ready = asyncio.Event(), asyncio.Event()
        n_jobs, n_metrics = (5, 5000) if demo else (None, None)
        jobs_task = asyncio.create_task(job_worker(jobs, jobs_ready, n_jobs))
        metrics_task = asyncio.create_task(
            metrics_aggregator(metrics, metrics_ready, n_metrics)
        )
        if demo:
            assert n_jobs is not None and n_metrics is not None
            await produce(dsn, [jobs_ready, metrics_ready], n_jobs, n_metrics)
        # Runs until Ctrl-C, or (demo) until everything arrived.
        await asyncio.wait_for(
            asyncio.gather(jobs_task, metrics_task), 60 if demo else None
        )
        done, (count, total) = jobs_task.result(), metrics_task.result()
        expected_sum = 5000 * 5001 / 2
        ok = done == n_jobs and count == n_metrics and total == expected_sum
        print(f"{done} jobs, {count:,} metrics (sum {total:,.0f}): "
              f"{'OK' if ok else 'MISMATCH'}", flush=True)
        return 0 if ok else 1
    finally:
        await asyncio.to_thread(listener.stop)


def main(argv: list[str]) -> int:
    demo = "--demo-once" in argv
    args = [a for a in argv if a != "--demo-once"]
    dsn = args[0] if args else os.environ.get("PGLISTEN_FAST_DSN", "")
    try:
        return asyncio.run(amain(dsn, demo))
    except pgl.ConnectError as e:
        print(f"asyncio_consumer: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
