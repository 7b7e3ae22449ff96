"""Burst drain rate of pglisten_fast under different psycopg installations.

Runs a pglisten_fast burst client (the same as ``peers.py``'s: one
subscription, ``overflow="block"``, 16 MiB ring, ``get_batch(4096)``, one
Python loop iteration per notification) with one Python interpreter per
*flavour* (a virtualenv with psycopg[c], another with psycopg[binary], ...)
against the same server, rounds interleaved so that drift hits every
flavour alike::

    python benchmarks/flavours.py --binary-venv /tmp/pglf-binary \\
        [--flavour NAME=PYTHON ...] [--rounds 5] [-n 1000000] [--size 32]

Each round: the client LISTENs, the driver queues ``n`` notifications of
``size`` bytes in one transaction and commits; the rate is ``n`` divided
by the time from COMMIT's return to the client's receipt of the last one
(as ``compare.py``'s burst scenarios).  Prints, per flavour, psycopg's
implementation, the read path and libpq the client used, and the median,
min and max rate with each flavour's median relative to the first, and the
client's CPU time per notification (all its threads, from LISTEN in effect
to the last receipt: less sensitive than the rate to other load on the
machine), and its selector thread's alone (the C read loop: libpq,
routing, ring writes).

Flavours: ``--flavour NAME=PYTHON`` (repeatable); by default ``c`` is this
interpreter.  ``--binary-venv DIR`` adds ``binary``: the virtualenv at DIR,
created first when missing (psycopg[binary] and cffi from PyPI, plus the
wheel of this tree built with ``pip wheel``).

Server: ``--dsn``, else ``$PGLISTEN_FAST_TEST_DSN``, else a private
:class:`pglisten_fast.testing.TempCluster`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import BURST_SQL, CLIENT_APP, ClientError, ClientProc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHANNEL = "pglf_flavours"
MAX_ITEMS = 4096


def client(dsn: str, channel: str, n: int) -> None:
    """The burst client (``--client``): prints ``ready``, then one JSON line."""
    import pglisten_fast as pgl

    with pgl.Listener(dsn, overflow="block", buffer_size=16 * 2**20) as listener:
        sub = listener.listen(channel)
        marker = sub.get(timeout=60)
        assert marker.reason == "listen", marker
        selector = next(t for t in threading.enumerate()
                        if t.name == "pglisten-fast-selector")
        assert selector.ident is not None
        sel_clock = time.pthread_getcpuclockid(selector.ident)
        print("ready", flush=True)
        cpu0 = time.process_time()
        sel0 = time.clock_gettime(sel_clock)
        count = dropped = 0
        first = last = 0.0
        payload = ""
        while count + dropped < n:
            batch = sub.get_batch(max_items=MAX_ITEMS)
            now = time.time()
            first = first or now
            for item in batch:
                if item.connection_reset:
                    dropped += item.dropped
                    continue
                count += 1
                payload = item.payload
            last = now
        cpu = time.process_time() - cpu0
        sel = time.clock_gettime(sel_clock) - sel0
    print(json.dumps({"count": count, "dropped": dropped, "first": first,
                      "last": last, "last_payload": payload[:64],
                      "cpu_s": cpu, "selector_cpu_s": sel, "impl": pgl.__impl__}),
          flush=True)

#: Printed by each flavour's interpreter: what it runs with.
_ABOUT = (
    "import psycopg, pglisten_fast as p; from pglisten_fast import _readpath as r; "
    "print(psycopg.__version__, psycopg.pq.__impl__, psycopg.pq.version(), "
    "p.__impl__, getattr(r, 'LIBPQ', None))"
)


def make_binary_venv(path: Path) -> Path:
    """A virtualenv with psycopg[binary] and this tree's wheel; its python."""
    python = path / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {path} (psycopg[binary] + this tree's wheel)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "psycopg[binary]", "cffi"], check=True)
    with tempfile.TemporaryDirectory() as dist:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "-w", dist, str(ROOT)], check=True)
        wheel = next(Path(dist).glob("pglisten_fast-*.whl"))
        subprocess.run([*pip, "--no-deps", "--force-reinstall", str(wheel)],
                       check=True)
    return python


def describe(python: str) -> str:
    out = subprocess.run([python, "-c", _ABOUT], capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    v, impl, libpq_version, path, libpq = out.stdout.split(maxsplit=4)
    return (f"psycopg {v} [{impl}], libpq {libpq_version}, read path {path}"
            f" ({libpq.strip()})")


def wait_clients_gone(admin: psycopg.Connection[Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (CLIENT_APP,)).fetchone()
        if row is None or row[0] == 0:
            return
        time.sleep(0.02)


def one_round(python: str, dsn: str, tx: psycopg.Connection[Any], n: int,
              size: int) -> tuple[float, float, float]:
    """One burst drained by the client under ``python``: the from-COMMIT rate,
    the client's CPU time (all threads) and its selector thread's, per
    notification in us."""
    argv = [python, __file__, "--client",
            f"{dsn} application_name={CLIENT_APP}", CHANNEL, str(n)]
    proc = ClientProc(argv)
    try:
        proc.wait_line("ready", 120)
        tx.execute(BURST_SQL, (CHANNEL, size, n))
        tx.commit()
        t_commit = time.time()
        res = proc.result(120 + n / 10_000)
    finally:
        proc.close()
    if res["count"] != n or res["dropped"]:
        raise ClientError(f"received {res['count']} of {n}, dropped {res['dropped']}")
    if res["last_payload"] != str(n).zfill(size)[:64]:
        raise ClientError(f"last payload {res['last_payload']!r} is not #{n}")
    if res.get("impl") != "c":
        raise ClientError(f"the client used the {res.get('impl')} read path")
    span = res["last"] - t_commit
    return ((n / span if span > 0 else float("nan")), res["cpu_s"] / n * 1e6,
            res["selector_cpu_s"] / n * 1e6)


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        dsn, channel, n = sys.argv[2:5]
        client(dsn, channel, int(n))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavour", action="append", default=[], metavar="NAME=PYTHON")
    ap.add_argument("--binary-venv", type=Path, metavar="DIR")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--dsn", default=os.environ.get("PGLISTEN_FAST_TEST_DSN"))
    args = ap.parse_args()

    flavours: dict[str, str] = {}
    for spec in args.flavour:
        name, _, python = spec.partition("=")
        flavours[name] = os.path.abspath(python) if os.sep in python else python
    if not args.flavour:
        flavours["c"] = sys.executable
    if args.binary_venv:
        flavours["binary"] = str(make_binary_venv(args.binary_venv))
    for name, python in flavours.items():
        print(f"{name:8} {python}\n         {describe(python)}", flush=True)

    cluster = None
    dsn = args.dsn
    if not dsn:
        from pglisten_fast.testing import TempCluster

        cluster = TempCluster().start()
        dsn = cluster.dsn
    rates: dict[str, list[float]] = {name: [] for name in flavours}
    cpus: dict[str, list[float]] = {name: [] for name in flavours}
    sels: dict[str, list[float]] = {name: [] for name in flavours}
    try:
        with psycopg.connect(dsn) as tx, psycopg.connect(dsn, autocommit=True) as adm:
            print(f"burst: {args.n:,} x {args.size} B in one transaction, "
                  f"{args.rounds} rounds", flush=True)
            for rnd in range(1, args.rounds + 1):
                for name, python in flavours.items():
                    rate, cpu, sel = one_round(python, dsn, tx, args.n, args.size)
                    rates[name].append(rate)
                    cpus[name].append(cpu)
                    sels[name].append(sel)
                    print(f"  round {rnd} {name:8} {rate:12,.0f} /s  CPU/notification "
                          f"{cpu:6.3f} us, selector {sel:6.3f} us", flush=True)
                    wait_clients_gone(adm)
    finally:
        if cluster is not None:
            cluster.close()

    print("\nflavour   median /s      min /s       max /s  vs first"
          "   CPU us/notif (median, min-max)   selector")
    first = statistics.median(next(iter(rates.values())))
    for name, values in rates.items():
        med = statistics.median(values)
        cpu = cpus[name]
        print(f"{name:8} {med:10,.0f} {min(values):12,.0f} {max(values):12,.0f}"
              f"  {med / first:8.2f}   {statistics.median(cpu):.3f} "
              f"({min(cpu):.3f}-{max(cpu):.3f})   "
              f"{statistics.median(sels[name]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
