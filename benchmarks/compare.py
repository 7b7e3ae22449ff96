"""Compare pglisten_fast with other PostgreSQL LISTEN clients and a C libpq loop.

Usage (from the repository root)::

    python benchmarks/compare.py --quick              # a few minutes
    python benchmarks/compare.py                      # default scenarios, 5 rounds
    python benchmarks/compare.py --scenarios sweep --rounds 3
    python benchmarks/compare.py --clients c,pglisten_fast,asyncpg --dsn "host=..."

A private PostgreSQL cluster (:class:`pglisten_fast.testing.TempCluster`) is
started unless ``--dsn`` is given.  Every measurement runs the client as its
own subprocess (``peers.py``, or the C loop ``c_listener.c`` compiled here),
which prints ``ready`` once LISTEN is in effect; this process then sends the
notifications and reads the client's JSON result.  Clients are interleaved
round by round (the order rotates every round) and the tables report medians
over rounds, because the machine is shared and noisy.

Scenarios: ``burst32``, ``burst512``, ``sweep``, ``steady``, ``channels10k``,
``fanout100``, ``memory`` (see ``benchmarks/README.md``).  Results go to
``benchmarks/results/compare-<timestamp>.json`` and a chart of the burst
rates and of the sweep's p99 latency to ``benchmarks/results/compare.png``.

The code is split by concern: ``bench_clients`` (client processes, the C
build, the psycopg[binary] flavour), ``bench_driver`` (the sender),
``bench_scenarios`` (what each run measures), ``bench_report`` (tables,
header, chart); this module is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Re-exported: profile_client.py and older notes use compare.<name>.
from bench_clients import (  # noqa: E402
    ALL_CLIENTS,
    C_SOURCE,
    CHANNEL,
    CLIENT_APP,
    PEERS,
    PGLF_CLIENTS,
    RESULTS_DIR,
    ClientError,
    ClientProc,
    Flavours,
    available_clients,
    build_c_listener,
    build_c_sender,
    client_proc,
    resolve_binary_python,
)
from bench_driver import BURST_SQL, Driver  # noqa: E402
from bench_report import (  # noqa: E402
    format_read_paths,
    group,
    header,
    make_chart,
    print_header,
    read_paths,
    summarize_burst,
    summarize_channels,
    summarize_fanout,
    summarize_memory,
    summarize_stream,
    thread_split,
)
from bench_scenarios import (  # noqa: E402
    ALL_SCENARIOS,
    DEFAULT_SCENARIOS,
    MAX_RATE,
    Bench,
    Config,
    Run,
    rate_label,
    rotate,
    slope,
)
from peers import (  # noqa: E402
    BATCH_WINDOW_ENV,
    BUFFER_ENV,
    DEFAULT_MAX_ITEMS,
    DEFAULT_OVERFLOW,
    MAX_ITEMS_ENV,
    OVERFLOW_ENV,
)

__all__ = [
    "ALL_CLIENTS", "ALL_SCENARIOS", "BURST_SQL", "CHANNEL", "CLIENT_APP", "C_SOURCE",
    "PEERS", "RESULTS_DIR", "Bench", "ClientError", "ClientProc", "Config",
    "Driver", "Run", "build_c_listener", "client_proc", "main", "rotate", "slope",
]


def parse_list(value: str | None, allowed: Sequence[str], what: str,
               default: Sequence[str] | None = None) -> list[str]:
    if not value:
        return list(default if default is not None else allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} "
                         f"(choose from {', '.join(allowed)})")
    return items


def parse_rates(value: str | None) -> tuple[int, ...] | None:
    """``2000,5000,max`` -> (2000, 5000, 0)."""
    if not value:
        return None
    out = []
    for raw in value.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item == "max":
            out.append(MAX_RATE)
            continue
        mult = 1000 if item.endswith("k") else 1
        try:
            rate = int(float(item.rstrip("k")) * mult)
        except ValueError:
            raise SystemExit(f"bad rate {item!r} (numbers, 5k, or max)") from None
        if rate <= 0:
            raise SystemExit(f"bad rate {item!r}")
        out.append(rate)
    return tuple(out)


def print_results(bench: Bench, cfg: Config, scenarios: Sequence[str],
                  clients: Sequence[str], unavailable: dict[str, str], *,
                  flavours: Flavours) -> dict[str, Any]:
    """Print every scenario's table; returns the summaries (for the JSON)."""
    runs = bench.runs
    summaries: dict[str, Any] = {}
    pglf = [c for c in PGLF_CLIENTS if c in clients and c not in unavailable]
    has_pglf = "pglisten_fast" in pglf
    for scenario in scenarios:
        print()
        if scenario in ("burst32", "burst512"):
            size = 32 if scenario == "burst32" else 512
            n = cfg.burst32_n if size == 32 else cfg.burst512_n
            print(f"## {scenario}: {n:,} x {size} B notifications in one "
                  f"transaction;\n   rate = N / (last receipt - COMMIT returned);"
                  f" stream = (N-1) / (last - first receipt); CPU = all threads "
                  f"of the client")
            text, summaries[scenario] = summarize_burst(
                runs, scenario, f"{size}B", clients, unavailable)
            print(text)
            for client in pglf:
                split = thread_split(group(runs, scenario, f"{size}B", client),
                                     client=client)
                if split:
                    print(split)
        elif scenario in ("sweep", "steady"):
            rates = cfg.sweep_rates if scenario == "sweep" else cfg.steady_rates
            seconds = cfg.sweep_seconds if scenario == "sweep" else cfg.steady_seconds
            print(f"## {scenario}: one notification (32 B) per transaction, "
                  f"pipelined, {seconds:g} s per step; delay = receipt - send "
                  f"(median over rounds)\n"
                  f"   p99>{cfg.collapse_ms:g}ms = rounds whose p99 exceeded "
                  f"--collapse-ms; CPU and wake-ups (voluntary context switches) "
                  f"summed over all\n   threads of the client; idle % = the "
                  f"machine's idle share during the step; ack = the server's "
                  f"answer to the sender")
            text, summaries[scenario] = summarize_stream(
                runs, scenario, rates, clients, unavailable,
                collapse_ms=cfg.collapse_ms)
            print(text)
            for client in pglf:
                for rate in rates:
                    split = thread_split(group(runs, scenario, rate_label(rate),
                                               client),
                                         f" at {rate_label(rate)}", client=client)
                    if split:
                        print(split)
        elif not has_pglf:
            continue
        elif scenario == "channels10k":
            print(f"## channels10k: pglisten_fast, one listen() of "
                  f"{cfg.channels_k:,} channels; burst {cfg.burst32_n:,} x 32 B "
                  f"on one of them")
            text, summaries[scenario] = summarize_channels(runs, cfg)
            print(text)
        elif scenario == "fanout100":
            print(f"## fanout100: pglisten_fast, {cfg.fanout_subs} subscriptions "
                  f"of one channel, one consumer thread; burst "
                  f"{cfg.fanout_n:,} x 32 B")
            text, summaries[scenario] = summarize_fanout(runs, cfg)
            print(text)
        elif scenario == "memory":
            print("## memory: pglisten_fast RSS")
            text, summaries[scenario] = summarize_memory(runs)
            print(text)
    paths = read_paths(runs, clients, flavours)
    if paths:
        print("\nread paths (as reported by each client process)")
        print(format_read_paths(paths))
    summaries["read_paths"] = paths
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, smaller sizes, 1 s sweep steps")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per scenario (default 5, --quick 3)")
    ap.add_argument("--dsn", default=None,
                    help="use this server instead of a private TempCluster")
    ap.add_argument("--clients", default=None,
                    help=f"comma-separated subset of {','.join(ALL_CLIENTS)}")
    ap.add_argument("--scenarios", default=None,
                    help=f"comma-separated subset of {','.join(ALL_SCENARIOS)} "
                         f"(default: {','.join(DEFAULT_SCENARIOS)})")
    ap.add_argument("--sweep-rates", default=None,
                    help="sweep steps, e.g. 2k,5k,10k,20k,max (the default); "
                         "'max' = as fast as the server answers")
    ap.add_argument("--sweep-seconds", type=float, default=None,
                    help="seconds per sweep step (default 3, --quick 1)")
    ap.add_argument("--collapse-ms", type=float, default=50.0,
                    help="a stream round whose p99 delay exceeds this counts as "
                         "collapsed (default: %(default)s)")
    ap.add_argument("--max-inflight", type=int, default=128,
                    help="unanswered statements allowed to the sender in the "
                         "sweep's max step (default: %(default)s)")
    ap.add_argument("--sender", choices=("c", "python"), default="c",
                    help="stream sender: c_sender.c (default; the Python one "
                         "when it cannot be built) or psycopg's pipeline mode")
    ap.add_argument("--binary-python", default=None, metavar="PATH",
                    help="Python of a virtualenv with psycopg[binary] and this "
                         "package, for the pglisten_fast_binary client (default: "
                         "make one under benchmarks/results/.venv-binary)")
    ap.add_argument("--pglf-overflow", choices=("block", "drop"),
                    default=DEFAULT_OVERFLOW,
                    help="overflow policy of the pglisten_fast client's "
                         "subscriptions (default: %(default)s, lossless like the "
                         "other clients; with 'drop' a run that lost data fails)")
    ap.add_argument("--pglf-buffer-size", type=int, default=16 * 2**20,
                    help="ring size of the pglisten_fast client's subscriptions "
                         "in bytes (default: %(default)s, the library's default)")
    ap.add_argument("--pglf-batch-window", type=float, default=None,
                    help="batch_window of the pglisten_fast client's listener in "
                         "seconds (default: the library's, 0.0005; 0 turns "
                         "batching off)")
    ap.add_argument("--pglf-max-items", type=int, default=DEFAULT_MAX_ITEMS,
                    help="max_items of the pglisten_fast client's get_batch calls "
                         "(default: %(default)s)")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="print every run as it finishes")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)

    clients = parse_list(args.clients, ALL_CLIENTS, "client")
    scenarios = parse_list(args.scenarios, ALL_SCENARIOS, "scenario",
                           DEFAULT_SCENARIOS)
    cfg = Config.make(args.quick, args.rounds,
                      sweep_rates=parse_rates(args.sweep_rates),
                      sweep_seconds=args.sweep_seconds,
                      collapse_ms=args.collapse_ms,
                      max_inflight=args.max_inflight)
    started = time.monotonic()
    # Inherited by the client processes (see peers.run_pglisten_fast).
    os.environ[OVERFLOW_ENV] = args.pglf_overflow
    os.environ[BUFFER_ENV] = str(args.pglf_buffer_size)
    os.environ[MAX_ITEMS_ENV] = str(args.pglf_max_items)
    os.environ[BATCH_WINDOW_ENV] = ("" if args.pglf_batch_window is None
                                    else str(args.pglf_batch_window))

    with contextlib.ExitStack() as stack:
        build_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="pglf-bench-")))
        c_binary, c_note = (build_c_listener(build_dir) if "c" in clients
                            else (None, "not requested"))
        c_sender, sender_note = (build_c_sender(build_dir) if args.sender == "c"
                                 else (None, "--sender python"))
        flavours = (resolve_binary_python(args.binary_python,
                                          args.results_dir / ".venv-binary")
                    if "pglisten_fast_binary" in clients else Flavours())
        unavailable = available_clients(clients, c_binary, c_note, flavours)
        runnable = [c for c in clients if c not in unavailable]

        if args.dsn:
            dsn = args.dsn
        else:
            from pglisten_fast.testing import TempCluster

            cluster = TempCluster()
            stack.callback(cluster.close)
            cluster.start()
            dsn = cluster.dsn
        bench = Bench(dsn, cfg, runnable, c_binary, args.verbose, flavours=flavours,
                      c_sender=c_sender)
        stack.callback(bench.driver.close)
        hdr = header(bench.driver, c_note, flavours)
        hdr["sender"] = bench.driver.sender
        if c_sender is None:
            hdr["sender"] += f" (C sender: {sender_note})"
        hdr["pglisten_fast_client"] = {"overflow": args.pglf_overflow,
                                       "buffer_size": args.pglf_buffer_size,
                                       "max_items": args.pglf_max_items,
                                       "batch_window": args.pglf_batch_window}
        print_header(hdr)
        for client, why in unavailable.items():
            print(f"n/a         {client}: {why}")
        print(f"config      {'quick' if args.quick else 'full'}: "
              f"{json.dumps(cfg.__dict__)}", flush=True)

        has_pglf = "pglisten_fast" in runnable
        durations: dict[str, float] = {}
        for scenario in scenarios:
            t_scenario = time.monotonic()
            if scenario == "burst32":
                bench.scenario_burst("burst32", cfg.burst32_n, 32)
            elif scenario == "burst512":
                bench.scenario_burst("burst512", cfg.burst512_n, 512)
            elif scenario == "steady":
                bench.scenario_steady()
            elif scenario == "sweep":
                bench.scenario_sweep()
            elif not has_pglf:
                print(f"\n[{scenario}] skipped: pglisten_fast not selected/available")
            elif scenario == "channels10k":
                bench.scenario_channels()
            elif scenario == "fanout100":
                bench.scenario_fanout()
            elif scenario == "memory":
                bench.scenario_memory()
            durations[scenario] = time.monotonic() - t_scenario
            print(f"  ({scenario}: {durations[scenario]:.0f} s)", flush=True)

        runs = bench.runs
        print("\n" + "=" * 78)
        print_header(hdr)
        summaries = print_results(bench, cfg, scenarios, clients, unavailable,
                                  flavours=flavours)
        failures = [r for r in runs if not r.ok]
        elapsed = time.monotonic() - started
        hdr["machine"]["loadavg_end"] = os.getloadavg()
        print(f"\n{len(runs)} runs, {len(failures)} failed, {elapsed:.0f} s; "
              f"load at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

        args.results_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = args.results_dir / f"compare-{stamp}.json"
        doc = {"header": hdr, "config": cfg.__dict__, "quick": args.quick,
               "clients": clients, "scenarios": scenarios,
               "unavailable": unavailable, "summary": summaries,
               "elapsed_s": elapsed, "scenario_s": durations,
               "runs": [r.__dict__ for r in runs]}
        out.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
        print(f"results: {out}")
        if not args.no_chart:
            print(make_chart(summaries, args.results_dir / "compare.png",
                             cfg.collapse_ms))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
