"""Scenarios of ``compare.py``: what each run measures, round by round.

:class:`Bench` runs every client of a scenario once per round (the order
rotating every round) and keeps one :class:`Run` per client process; the
tables are made from them by ``bench_report``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from bench_clients import (
    CHANNEL,
    CLIENT_APP,
    ClientError,
    Flavours,
    client_argv,
    client_proc,
)
from bench_driver import Driver, cpu_stat, idle_share

ALL_SCENARIOS: tuple[str, ...] = (
    "burst32",
    "burst512",
    "sweep",
    "steady",
    "channels10k",
    "fanout100",
    "memory",
)
#: What runs without ``--scenarios`` (``steady`` is the sweep's 5k and 20k
#: steps with the old defaults: ask for it by name).
DEFAULT_SCENARIOS: tuple[str, ...] = (
    "burst32",
    "burst512",
    "sweep",
    "channels10k",
    "fanout100",
    "memory",
)
#: The sweep's unpaced step: as fast as the server answers.
MAX_RATE = 0


def rate_label(rate: int) -> str:
    """``2000/s`` or ``max`` (the variant name of a stream step)."""
    return f"{rate}/s" if rate > 0 else "max"


@dataclass(frozen=True)
class Config:
    """Sizes of every scenario (``--quick`` shrinks them)."""

    rounds: int
    burst32_n: int
    burst512_n: int
    steady_rates: tuple[int, ...]
    steady_seconds: float
    channels_k: int
    fanout_subs: int
    fanout_n: int
    memory_total: int
    memory_burst: int
    stalled_total: int
    stalled_buffer: int
    #: sweep steps (notifications per second; 0 = max) and seconds per step
    sweep_rates: tuple[int, ...] = (2_000, 5_000, 10_000, 20_000, MAX_RATE)
    sweep_seconds: float = 3.0
    #: rounds of the sweep (3 unless --rounds says otherwise: 7 clients x 5
    #: rates x 3 rounds of 3 s is already ~6 minutes)
    sweep_rounds: int = 3
    #: a stream round whose p99 delay exceeds this "collapsed"
    collapse_ms: float = 50.0
    #: unanswered statements allowed to the unpaced (max) sender
    max_inflight: int = 128

    @classmethod
    def make(cls, quick: bool, rounds: int | None, **overrides: Any) -> Config:
        if quick:
            cfg = cls(rounds=rounds or 3, burst32_n=200_000, burst512_n=50_000,
                      steady_rates=(5_000, 20_000), steady_seconds=1.5,
                      channels_k=10_000, fanout_subs=100, fanout_n=50_000,
                      memory_total=2_000_000, memory_burst=500_000,
                      stalled_total=2_000_000, stalled_buffer=16 * 2**20,
                      sweep_seconds=1.0, sweep_rounds=rounds or 3)
        else:
            cfg = cls(rounds=rounds or 5, burst32_n=1_000_000, burst512_n=100_000,
                      steady_rates=(5_000, 20_000), steady_seconds=3.0,
                      channels_k=10_000, fanout_subs=100, fanout_n=100_000,
                      memory_total=10_000_000, memory_burst=500_000,
                      stalled_total=2_000_000, stalled_buffer=16 * 2**20,
                      sweep_rounds=rounds or 3)
        return cls(**{**cfg.__dict__, **{k: v for k, v in overrides.items()
                                         if v is not None}})


@dataclass
class Run:
    """One client process measured once."""

    scenario: str
    variant: str
    client: str
    round: int
    ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    result: dict[str, Any] | None = None
    driver: dict[str, Any] | None = None
    #: wall-clock seconds the run took, client start-up to backend gone
    wall_s: float = 0.0


def server_delta(before: dict[str, int | None], mid: dict[str, int | None],
                 after: dict[str, int | None]) -> dict[str, float]:
    """CPU ns of the sender's and the client's backends over a stream step.

    ``mid`` is taken when the sender is done, ``after`` once the client's
    result arrived (its backend may have exited by then: ``mid`` counts).
    """
    out: dict[str, float] = {}
    for key in ("sender", "listener"):
        b = before.get(key)
        a = after.get(key) if after.get(key) is not None else mid.get(key)
        out[key] = float(a - b) if a is not None and b is not None else math.nan
    return out


def cost_metrics(m: dict[str, float], res: dict[str, Any], want: int) -> None:
    """Per-notification CPU, wake-ups and memory of a client result, into ``m``.

    ``cpu_us`` is the client's own sum over all its threads (schedstat, see
    ``peers.py``); ``cpu_rusage_us`` the getrusage cross-check.
    """
    nan = math.nan
    m["cpu_us"] = res["cpu_s"] / want * 1e6
    m["cpu_rusage_us"] = res.get("cpu_rusage_s", nan) / want * 1e6
    m["ctx_per_1k"] = res.get("ctx_switches", nan) / want * 1e3
    m["wakeups_per_notif"] = res.get("wakeups", nan) / want
    m["involuntary_per_notif"] = res.get("involuntary", nan) / want
    m["nthreads"] = res.get("nthreads", nan)
    m["rss_mib"] = res["maxrss_kb"] / 1024
    # pglisten_fast: the selector and consumer threads, measured inside
    for tname, t in (res.get("threads") or {}).items():
        m[f"{tname}_cpu_us"] = t["cpu_s"] / want * 1e6
        m[f"{tname}_user_us"] = t["user_s"] / want * 1e6
        m[f"{tname}_sys_us"] = t["sys_s"] / want * 1e6
        m[f"{tname}_ctx_per_1k"] = t.get("ctx_switches", 0) / want * 1e3
        m[f"{tname}_wakeups_per_notif"] = t.get("wakeups", nan) / want


class Bench:
    """Runs the scenarios and keeps every :class:`Run`."""

    def __init__(self, dsn: str, cfg: Config, clients: Sequence[str],
                 c_binary: Path | None, verbose: bool, *,
                 flavours: Flavours | None = None,
                 c_sender: Path | None = None) -> None:
        self.dsn = dsn
        self.client_dsn = f"{dsn} application_name={CLIENT_APP}"
        self.cfg = cfg
        self.clients = list(clients)
        self.c_binary = c_binary
        self.flavours = flavours or Flavours()
        self.verbose = verbose
        self.driver = Driver(dsn, c_sender)
        self.runs: list[Run] = []

    def argv(self, client: str, n: int, mode: str) -> list[str]:
        return client_argv(client, self.client_dsn, n, mode, c_binary=self.c_binary,
                           flavours=self.flavours)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  {time.strftime('%H:%M:%S')} {msg}", flush=True)

    def record(self, run: Run, started: float) -> Run:
        run.wall_s = time.monotonic() - started
        self.runs.append(run)
        if run.ok:
            shown = ", ".join(f"{k}={v:,.1f}" for k, v in run.metrics.items()
                              if k in ("rate", "deliveries_rate", "send_rate",
                                       "delay_median_us", "delay_p99_us", "cpu_us",
                                       "listen_s"))
            self.log(f"{run.scenario}/{run.variant} {run.client} r{run.round}: "
                     f"{shown} ({run.wall_s:.1f} s)")
        else:
            print(f"  ! {run.scenario}/{run.variant} {run.client} round {run.round}:"
                  f" {run.error}", flush=True)
        return run

    # -- burst ---------------------------------------------------------------
    def burst_run(self, scenario: str, variant: str, client: str, rnd: int, *,
                  n: int, size: int, mode: str = "burst", deliveries: int = 1) -> Run:
        started = time.monotonic()
        run = Run(scenario, variant, client, rnd, ok=False)
        timeout = 120 + n * deliveries / 10_000
        try:
            with client_proc(self.argv(client, n, mode)) as proc:
                proc.wait_line("ready", 120)
                stat0 = cpu_stat()
                drv = self.driver.burst(CHANNEL, n, size)
                res = proc.result(timeout)
                drv["idle_share"] = idle_share(stat0, cpu_stat())
            run.driver, run.result = drv, res
            want = n * deliveries
            if res["count"] + res.get("dropped", 0) != want:
                raise ClientError(f"received {res['count']} of {want}")
            if res.get("dropped"):
                raise ClientError(f"{res['dropped']} notifications dropped")
            if deliveries == 1 and res["last_payload"] != str(n).zfill(size)[:64]:
                raise ClientError(f"last payload {res['last_payload']!r} is not #{n}")
            span = res["last"] - drv["t_commit"]
            m = run.metrics
            # Receipt starts before COMMIT returns (the sender still cleans up
            # after signalling the listeners); a client that got everything
            # before that has no from-COMMIT rate (NaN, left out of medians).
            m["rate"] = n / span if span > 0 else float("nan")
            m["stream_rate"] = ((want - 1) / (res["last"] - res["first"])
                                if res["last"] > res["first"] else float("nan"))
            if deliveries > 1:
                m["deliveries_rate"] = want / span if span > 0 else float("nan")
            cost_metrics(m, res, want)
            m["idle_share"] = drv["idle_share"]
            m["send_s"] = drv["t_commit"] - drv["t_start"]
            m["commit_s"] = drv["t_commit"] - drv["t_select"]
            for key in ("listen_s", "channels_s"):
                if key in res:
                    m[key] = res[key]
            run.ok = True
        except (ClientError, psycopg.Error, KeyError, OSError) as e:
            run.error = f"{type(e).__name__}: {e}"
            with contextlib.suppress(psycopg.Error):
                self.driver.tx.rollback()
        self.driver.wait_clients_gone()
        return self.record(run, started)

    def scenario_burst(self, scenario: str, n: int, size: int) -> None:
        print(f"\n[{scenario}] {len(self.clients)} clients x {self.cfg.rounds} rounds,"
              f" N={n:,} x {size} B", flush=True)
        for rnd in range(self.cfg.rounds):
            for client in rotate(self.clients, rnd):
                self.burst_run(scenario, f"{size}B", client, rnd, n=n, size=size)

    # -- steady streams (steady, sweep) --------------------------------------
    def stream_run(self, scenario: str, client: str, rnd: int, rate: int,
                   seconds: float) -> Run:
        """One client, one paced (or, rate 0, unpaced) stream of ``seconds``."""
        cfg = self.cfg
        paced = rate > 0
        # An unpaced step ends with the sender's end marker: the client is
        # given a count it never reaches.
        n = int(rate * seconds) if paced else 1 << 40
        started = time.monotonic()
        run = Run(scenario, rate_label(rate), client, rnd, ok=False)
        try:
            with client_proc(self.argv(client, n, "steady")) as proc:
                proc.wait_line("ready", 120)
                backends = self.driver.client_backend_pids()
                srv0 = self.driver.server_cpu(backends)
                stat0 = cpu_stat()
                t0 = time.monotonic()
                if paced:
                    drv = self.driver.stream(CHANNEL, rate, n=n)
                else:
                    drv = self.driver.stream(CHANNEL, rate, seconds=seconds,
                                             inflight=cfg.max_inflight)
                drv["stream_s"] = time.monotonic() - t0
                srv_sent = self.driver.server_cpu(backends)
                res = proc.result(60 + seconds * 10)
                drv["idle_share"] = idle_share(stat0, cpu_stat())
                # The client's backend may already be gone once the client
                # has exited: then its figure at the end of sending counts.
                srv1 = self.driver.server_cpu(backends)
                drv["server_cpu_ns"] = server_delta(srv0, srv_sent, srv1)
            run.driver, run.result = drv, res
            sent = int(drv["sent"])
            if res["count"] != sent:
                raise ClientError(f"received {res['count']} of {sent}")
            m = run.metrics
            m["target_rate"] = rate
            m["sent"] = sent
            m["send_rate"] = drv["send_rate"]
            m["ack_median_us"] = drv["ack_median_us"]
            m["ack_p99_us"] = drv["ack_p99_us"]
            m["lag_p99_us"] = drv["lag_p99_us"]
            m["sender_cpu_us"] = drv["sender_cpu_s"] / sent * 1e6
            m["sender_busy"] = drv["sender_cpu_s"] / drv["stream_s"]
            srv = drv["server_cpu_ns"]
            m["sender_backend_us"] = srv["sender"] / sent / 1e3
            m["sender_backend_busy"] = srv["sender"] / 1e9 / drv["stream_s"]
            m["listener_backend_us"] = srv["listener"] / sent / 1e3
            for key in ("median", "p90", "p99", "p999", "max"):
                m[f"delay_{key}_us"] = res.get(f"delay_{key}_us", math.nan)
            m["collapsed"] = float(m["delay_p99_us"] > cfg.collapse_ms * 1e3)
            m["idle_share"] = drv["idle_share"]
            cost_metrics(m, res, sent)
            run.ok = True
        except (ClientError, psycopg.Error, RuntimeError, KeyError, OSError) as e:
            run.error = f"{type(e).__name__}: {e}"
        self.driver.wait_clients_gone()
        return self.record(run, started)

    def steady_run(self, client: str, rnd: int, rate: int) -> Run:
        return self.stream_run("steady", client, rnd, rate, self.cfg.steady_seconds)

    def scenario_steady(self) -> None:
        cfg = self.cfg
        print(f"\n[steady] {len(self.clients)} clients x {cfg.rounds} rounds, "
              f"{'/'.join(f'{r:,}' for r in cfg.steady_rates)} per s for "
              f"{cfg.steady_seconds:g} s", flush=True)
        for rnd in range(cfg.rounds):
            for rate in cfg.steady_rates:
                for client in rotate(self.clients, rnd):
                    self.steady_run(client, rnd, rate)

    def scenario_sweep(self) -> None:
        cfg = self.cfg
        steps = ", ".join(rate_label(r) for r in cfg.sweep_rates)
        print(f"\n[sweep] {len(self.clients)} clients x {len(cfg.sweep_rates)} rates "
              f"({steps}) x {cfg.sweep_rounds} rounds, {cfg.sweep_seconds:g} s per "
              f"step", flush=True)
        for rnd in range(cfg.sweep_rounds):
            for rate in cfg.sweep_rates:
                for client in rotate(self.clients, rnd):
                    self.stream_run("sweep", client, rnd, rate, cfg.sweep_seconds)

    # -- pglisten_fast only ----------------------------------------------------
    def scenario_channels(self) -> None:
        cfg = self.cfg
        k = cfg.channels_k
        print(f"\n[channels10k] pglisten_fast, 1 vs {k:,} channels x {cfg.rounds} "
              f"rounds, burst N={cfg.burst32_n:,} x 32 B", flush=True)
        variants = [("1 channel", "burst"), (f"{k:,} channels", f"channels:{k}")]
        for rnd in range(cfg.rounds):
            for variant, mode in rotate(variants, rnd):
                self.burst_run("channels10k", variant, "pglisten_fast", rnd,
                               n=cfg.burst32_n, size=32, mode=mode)

    def scenario_fanout(self) -> None:
        cfg = self.cfg
        k = cfg.fanout_subs
        print(f"\n[fanout100] pglisten_fast, {k} subscriptions of one channel x "
              f"{cfg.rounds} rounds, burst N={cfg.fanout_n:,} x 32 B", flush=True)
        for rnd in range(cfg.rounds):
            self.burst_run("fanout100", f"{k} subs", "pglisten_fast", rnd,
                           n=cfg.fanout_n, size=32, mode=f"fanout:{k}", deliveries=k)

    def scenario_memory(self) -> None:
        cfg = self.cfg
        print(f"\n[memory] pglisten_fast, {cfg.memory_total:,} notifications in "
              f"bursts of {cfg.memory_burst:,}; stalled consumer "
              f"({cfg.stalled_total:,} into a never-read "
              f"{cfg.stalled_buffer // 2**20} MiB subscription)", flush=True)
        # Received and consumed, burst by burst.
        started = time.monotonic()
        run = Run("memory", "consumed", "pglisten_fast", 0, ok=False)
        total, step = cfg.memory_total, cfg.memory_burst
        try:
            with client_proc(self.argv("pglisten_fast", total,
                                       f"memory:{step}")) as proc:
                proc.wait_line("ready", 120)
                sent = 0
                while sent < total:
                    n = min(step, total - sent)
                    self.driver.burst(CHANNEL, n, 32)
                    sent += n
                    line = proc.wait_line("progress", 120 + n / 10_000)
                    self.log(f"memory: {line}")
                res = proc.result(60)
            run.result = res
            series = res["rss_series_kb"]
            after_first = [kb for count, kb in series if count >= step]
            m = run.metrics
            m["rss0_mib"] = series[0][1] / 1024
            m["rss_first_mib"] = after_first[0] / 1024
            m["rss_last_mib"] = after_first[-1] / 1024
            m["growth_mib"] = (max(after_first) - min(after_first)) / 1024
            m["slope_mib_per_m"] = slope(
                [(count / 1e6, kb / 1024) for count, kb in series if count >= step])
            m["peak_rss_mib"] = res["maxrss_kb"] / 1024
            m["cpu_us"] = res["cpu_s"] / total * 1e6
            run.ok = res["count"] + res.get("dropped", 0) == total
            if not run.ok:
                run.error = f"received {res['count']} of {total}"
        except (ClientError, psycopg.Error, KeyError, OSError) as e:
            run.error = f"{type(e).__name__}: {e}"
        self.driver.wait_clients_gone()
        self.record(run, started)

        # A subscription that is never read.
        started = time.monotonic()
        run = Run("memory", "stalled", "pglisten_fast", 0, ok=False)
        total = cfg.stalled_total
        try:
            with client_proc(self.argv("pglisten_fast", total,
                                       f"stalled:{cfg.stalled_buffer}")) as proc:
                proc.wait_line("ready", 120)
                sent = 0
                while sent < total:
                    n = min(step, total - sent)
                    self.driver.burst(CHANNEL, n, 32)
                    sent += n
                res = proc.result(120 + total / 10_000)
            run.result = res
            m = run.metrics
            m["rss0_mib"] = res["rss0_kb"] / 1024
            m["rss1_mib"] = res["rss1_kb"] / 1024
            m["growth_mib"] = (res["rss1_kb"] - res["rss0_kb"]) / 1024
            m["buffer_mib"] = res["buffer_size"] / 2**20
            m["buffered_mib"] = res["buffered_bytes"] / 2**20
            m["dropped"] = res["dropped"]
            m["peak_rss_mib"] = res["maxrss_kb"] / 1024
            run.ok = True
        except (ClientError, psycopg.Error, KeyError, OSError) as e:
            run.error = f"{type(e).__name__}: {e}"
        self.driver.wait_clients_gone()
        self.record(run, started)



def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (NaN with fewer than 3 points)."""
    if len(points) < 3:
        return math.nan
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else math.nan


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` rotated by ``k`` (a different first client every round)."""
    if not items:
        return []
    k %= len(items)
    return list(items[k:]) + list(items[:k])


