"""Profile one benchmark client: per-thread CPU and, if ``perf`` works, hot symbols.

Usage (from the repository root)::

    python benchmarks/profile_client.py                       # pglisten_fast, burst32
    python benchmarks/profile_client.py --scenario steady --rate 5000
    python benchmarks/profile_client.py --client psycopg3_pgconn --n 1000000

Runs the client of ``peers.py`` (or ``c`` for the C loop) once against a
private cluster (or ``--dsn``), attaches ``perf record`` to it once it has
printed ``ready`` (so start-up is not sampled), sends the notifications like
``compare.py`` does, and prints:

* the client's CPU split by thread (pglisten_fast: selector vs consumer,
  user vs sys, from ``/proc/self/task/*/stat``);
* ``perf report`` by thread name, then by thread and symbol.  The
  pglisten_fast client names its threads ``pglf-selector`` and
  ``pglf-consumer``.  Python 3.11 frames all show up as
  ``_PyEval_EvalFrameDefault``; C symbols of libpq, the kernel, ``_pglf``
  and ``_records`` are resolved.

Without ``perf`` (or without permission to use it) only the thread split is
printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402


def perf_report(data: Path, sort: str, limit: float, lines: int) -> str:
    proc = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-q",
         "--sort", sort, "--percent-limit", str(limit)],
        capture_output=True, text=True, check=False,
    )
    out = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return "\n".join(out[:lines]) if out else proc.stderr.strip()[:800]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--client", default="pglisten_fast",
                    choices=compare.ALL_CLIENTS)
    ap.add_argument("--scenario", default="burst32",
                    choices=("burst32", "burst512", "steady"))
    ap.add_argument("--n", type=int, default=1_000_000,
                    help="burst size (burst scenarios)")
    ap.add_argument("--rate", type=int, default=5_000, help="steady rate per second")
    ap.add_argument("--seconds", type=float, default=3.0, help="steady duration")
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--freq", type=int, default=2999, help="perf sampling frequency")
    ap.add_argument("--no-perf", action="store_true")
    ap.add_argument("--top", type=int, default=30, help="symbol lines to print")
    args = ap.parse_args()

    use_perf = not args.no_perf and shutil.which("perf") is not None
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="pglf-prof-")))
        c_binary = None
        if args.client == "c":
            c_binary, note = compare.build_c_listener(tmp)
            if c_binary is None:
                print(f"cannot build the C loop: {note}")
                return 1
        if args.dsn:
            dsn = args.dsn
        else:
            from pglisten_fast.testing import TempCluster

            cluster = TempCluster()
            stack.callback(cluster.close)
            cluster.start()
            dsn = cluster.dsn
        cfg = compare.Config.make(True, 1)
        bench = compare.Bench(dsn, cfg, [args.client], c_binary, verbose=False)
        stack.callback(bench.driver.close)

        steady = args.scenario == "steady"
        size = 512 if args.scenario == "burst512" else 32
        n = int(args.rate * args.seconds) if steady else args.n
        data = tmp / "perf.data"
        with compare.client_proc(bench.argv(args.client, n,
                                            "steady" if steady else "burst")) as proc:
            proc.wait_line("ready", 120)
            perf = None
            if use_perf:
                perf = subprocess.Popen(
                    ["perf", "record", "-F", str(args.freq), "-o", str(data),
                     "-p", str(proc.proc.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                time.sleep(0.5)  # let perf attach
            if steady:
                drv = bench.driver.steady(compare.CHANNEL, args.rate, n)
            else:
                drv = bench.driver.burst(compare.CHANNEL, n, size)
            res = proc.result(300)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                try:
                    _, err = perf.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    perf.kill()
                    _, err = perf.communicate()
                if perf.returncode not in (0, -signal.SIGINT) and not data.exists():
                    print(f"perf failed: {err.strip()[:500]}")
                    use_perf = False

        count = res["count"]
        print(f"client {args.client}, {args.scenario}: {count:,} notifications")
        if steady:
            print(f"  sent {drv['send_rate']:,.0f}/s, delay p50 "
                  f"{res['delay_median_us']:,.0f} us, "
                  f"p99 {res['delay_p99_us']:,.0f} us, "
                  f"server ack p50 {drv['ack_median_us']:,.0f} us")
        else:
            span = res["last"] - drv["t_commit"]
            print(f"  rate from COMMIT {n / span:,.0f}/s, stream "
                  f"{(count - 1) / (res['last'] - res['first']):,.0f}/s")
        print(f"  process CPU {res['cpu_s'] / count * 1e6:.3f} us/notif "
              f"(user {res['cpu_user_s'] / count * 1e6:.3f}, "
              f"sys {res['cpu_sys_s'] / count * 1e6:.3f}), "
              f"{res.get('ctx_switches', 0) / count * 1e3:.2f} context switches "
              f"per 1k, peak RSS {res['maxrss_kb'] / 1024:.1f} MiB")
        for tname, t in (res.get("threads") or {}).items():
            print(f"  thread {tname:9s} CPU {t['cpu_s'] / count * 1e6:.3f} us/notif "
                  f"(user {t['user_s'] / count * 1e6:.3f}, "
                  f"sys {t['sys_s'] / count * 1e6:.3f}; 10 ms ticks), "
                  f"{t.get('ctx_switches', 0) / count * 1e3:.2f} context "
                  f"switches per 1k")
        if use_perf and data.exists():
            print("\nperf: samples by thread")
            print(perf_report(data, "comm", 0.5, 20))
            print("\nperf: by thread and shared object")
            print(perf_report(data, "comm,dso", 0.5, 20))
            print("\nperf: by thread, shared object, symbol")
            print(perf_report(data, "comm,dso,sym", 0.3, args.top))
        out = compare.RESULTS_DIR / f"profile-{args.client}-{args.scenario}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"client": res, "driver": drv}, indent=1),
                       encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
