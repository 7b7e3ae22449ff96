"""Compare pglisten_fast with other PostgreSQL LISTEN clients and a C libpq loop.

Usage (from the repository root)::

    python benchmarks/compare.py --quick              # < 2 minutes
    python benchmarks/compare.py                      # every scenario, 5 rounds
    python benchmarks/compare.py --scenarios burst32 --rounds 5
    python benchmarks/compare.py --clients c,pglisten_fast,asyncpg --dsn "host=..."

A private PostgreSQL cluster (:class:`pglisten_fast.testing.TempCluster`) is
started unless ``--dsn`` is given.  Every measurement runs the client as its
own subprocess (``peers.py``, or the C loop ``c_listener.c`` compiled here),
which prints ``ready`` once LISTEN is in effect; this process then sends the
notifications and reads the client's JSON result.  Clients are interleaved
round by round (the order rotates every round) and the tables report medians
over rounds, because the machine is shared and noisy.

Scenarios: ``burst32``, ``burst512``, ``steady``, ``channels10k``,
``fanout100``, ``memory`` (see ``benchmarks/README.md``).  Results go to
``benchmarks/results/compare-<timestamp>.json`` and a chart of the burst
rates to ``benchmarks/results/compare.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import queue
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import pq

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
PEERS = HERE / "peers.py"
C_SOURCE = HERE / "c_listener.c"

sys.path.insert(0, str(HERE))
from peers import (  # noqa: E402
    BUFFER_ENV,
    CLIENT_MODULES,
    DEFAULT_MAX_ITEMS,
    DEFAULT_OVERFLOW,
    MAX_ITEMS_ENV,
    OVERFLOW_ENV,
)

#: application_name of every client connection (to wait for their backends).
CLIENT_APP = "pglf_bench_client"
CHANNEL = "bench"

ALL_CLIENTS: tuple[str, ...] = (
    "c",
    "pglisten_fast",
    "psycopg3",
    "psycopg3_pgconn",
    "asyncpg",
    "psycopg2",
)
ALL_SCENARIOS: tuple[str, ...] = (
    "burst32",
    "burst512",
    "steady",
    "channels10k",
    "fanout100",
    "memory",
)

BURST_SQL = (
    "SELECT count(pg_notify(%s, lpad(i::text, %s, '0'))) "
    "FROM generate_series(1, %s) AS i"
)


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

    @classmethod
    def make(cls, quick: bool, rounds: int | None) -> Config:
        if quick:
            return cls(rounds=rounds or 3, burst32_n=200_000, burst512_n=50_000,
                       steady_rates=(5_000, 20_000), steady_seconds=1.5,
                       channels_k=10_000, fanout_subs=100, fanout_n=50_000,
                       memory_total=2_000_000, memory_burst=500_000,
                       stalled_total=2_000_000, stalled_buffer=16 * 2**20)
        return cls(rounds=rounds or 5, burst32_n=1_000_000, burst512_n=100_000,
                   steady_rates=(5_000, 20_000), steady_seconds=3.0,
                   channels_k=10_000, fanout_subs=100, fanout_n=100_000,
                   memory_total=10_000_000, memory_burst=500_000,
                   stalled_total=2_000_000, stalled_buffer=16 * 2**20)


class ClientError(Exception):
    """A client process failed, timed out or returned a bad result."""


# ---------------------------------------------------------------------------
# client processes
# ---------------------------------------------------------------------------


class ClientProc:
    """One client subprocess; its stdout lines are read by a helper thread."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr_tail(self, lines: int = 15) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return "\n".join(text.splitlines()[-lines:])

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with ``prefix`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise ClientError(
                    f"no {prefix!r} line within {timeout:.0f} s; stderr:\n"
                    f"{self.stderr_tail()}"
                ) from None
            if line is None:
                rc = self.proc.wait()
                raise ClientError(
                    f"client exited with status {rc} before {prefix!r}; stderr:\n"
                    f"{self.stderr_tail()}"
                )
            if line.startswith(prefix):
                return line

    def result(self, timeout: float) -> dict[str, Any]:
        line = self.wait_line("{", timeout)
        try:
            out: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise ClientError(f"bad result line {line!r}") from e
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def client_proc(argv: Sequence[str]) -> Iterator[ClientProc]:
    proc = ClientProc(argv)
    try:
        yield proc
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.close()


def build_c_listener(build_dir: Path) -> tuple[Path | None, str]:
    """Compile ``c_listener.c``; returns (binary, note)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    pg_config = shutil.which("pg_config")
    if gcc is None or pg_config is None:
        return None, "gcc or pg_config not found"
    try:
        inc = subprocess.run([pg_config, "--includedir"], capture_output=True,
                             text=True, check=True).stdout.strip()
        libdir = subprocess.run([pg_config, "--libdir"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"pg_config failed: {e}"
    out = build_dir / "c_listener"
    cmd = [gcc, "-O2", "-Wall", "-o", str(out), str(C_SOURCE), f"-I{inc}",
           f"-L{libdir}", "-lpq"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None, f"build failed: {proc.stderr.strip()[:500]}"
    return out, " ".join(cmd)


# ---------------------------------------------------------------------------
# the driver: sends notifications
# ---------------------------------------------------------------------------


class Driver:
    """Sends notifications and watches for client backends."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.tx = psycopg.connect(dsn, application_name="pglf_bench_driver")
        self.admin = psycopg.connect(dsn, autocommit=True,
                                     application_name="pglf_bench_admin")
        self.steady_conn = psycopg.connect(dsn, autocommit=True,
                                           application_name="pglf_bench_steady")

    def close(self) -> None:
        for c in (self.tx, self.admin, self.steady_conn):
            with contextlib.suppress(Exception):
                c.close()

    def burst(self, channel: str, n: int, size: int) -> dict[str, float]:
        """Queue ``n`` notifications of ``size`` bytes in one transaction."""
        t_start = time.time()
        self.tx.execute(BURST_SQL, (channel, size, n))
        t_select = time.time()
        self.tx.commit()
        t_commit = time.time()
        return {"t_start": t_start, "t_select": t_select, "t_commit": t_commit}

    def steady(self, channel: str, rate: float, n: int) -> dict[str, float]:
        """Send ``n`` notifications, one per transaction, ``rate`` per second.

        Uses libpq pipeline mode with a Sync after every statement, so each
        ``pg_notify`` is its own (autocommit) transaction and the sender
        never waits for a round trip.  The payload is ``time.time()`` taken
        just before the statement is queued.  When the sender falls behind
        the schedule it sends the late ones at once (each with its own
        timestamp); ``send_rate`` reports what was achieved.
        """
        pg = self.steady_conn.pgconn
        pg.nonblocking = 1
        pg.enter_pipeline_mode()
        sql = b"SELECT pg_notify($1, $2)"
        chan = channel.encode()
        sock = pg.socket
        sent = synced = 0
        send_times: deque[float] = deque()
        acks: list[float] = []

        def drain() -> None:
            nonlocal synced
            pg.flush()
            pg.consume_input()
            while synced < sent and not pg.is_busy():
                res = pg.get_result()
                if res is None:
                    continue
                if res.status == pq.ExecStatus.PIPELINE_SYNC:
                    synced += 1
                    acks.append(time.time() - send_times.popleft())
                elif res.status == pq.ExecStatus.FATAL_ERROR:
                    msg = (res.error_message or b"").decode("utf-8", "replace")
                    raise RuntimeError(f"pg_notify failed: {msg}")

        interval = 1.0 / rate
        t0 = time.perf_counter() + 0.02
        t_first = 0.0
        try:
            while sent < n:
                due = t0 + sent * interval
                now = time.perf_counter()
                if now < due:
                    drain()
                    left = due - time.perf_counter()
                    if left > 0:
                        time.sleep(left)
                    continue
                ts = time.time()
                if not sent:
                    t_first = ts
                pg.send_query_params(sql, [chan, b"%.6f" % ts])
                pg.pipeline_sync()
                send_times.append(ts)
                sent += 1
            t_last = time.time()
            while synced < sent:
                drain()
                if synced < sent:
                    select.select([sock], [sock] if pg.flush() else [], [], 1.0)
        finally:
            with contextlib.suppress(Exception):
                while pg.flush():
                    time.sleep(0.001)
                pg.exit_pipeline_mode()
            pg.nonblocking = 0
        acks.sort()
        return {"t_first": t_first, "t_last": t_last,
                "send_rate": (n - 1) / (t_last - t_first) if n > 1 else 0.0,
                # send -> the server's answer to that statement: when this
                # grows far beyond 1/rate, the server (not the client) is
                # the bottleneck and every delay includes its backlog.
                "ack_median_us": acks[len(acks) // 2] * 1e6 if acks else 0.0,
                "ack_p99_us": acks[int((len(acks) - 1) * 0.99)] * 1e6 if acks else 0.0}

    def wait_clients_gone(self, timeout: float = 15.0) -> None:
        """Wait until no client backend is left (each run starts clean)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (CLIENT_APP,),
            ).fetchone()
            if row is None or row[0] == 0:
                return
            time.sleep(0.02)

    def server_version(self) -> str:
        row = self.admin.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def queue_usage(self) -> float:
        row = self.admin.execute("SELECT pg_notification_queue_usage()").fetchone()
        return float(row[0]) if row else 0.0


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------


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
    driver: dict[str, float] | None = None
    #: wall-clock seconds the run took, client start-up to backend gone
    wall_s: float = 0.0


class Bench:
    """Runs the scenarios and keeps every :class:`Run`."""

    def __init__(self, dsn: str, cfg: Config, clients: Sequence[str],
                 c_binary: Path | None, verbose: bool) -> None:
        self.dsn = dsn
        self.client_dsn = f"{dsn} application_name={CLIENT_APP}"
        self.cfg = cfg
        self.clients = list(clients)
        self.c_binary = c_binary
        self.verbose = verbose
        self.driver = Driver(dsn)
        self.runs: list[Run] = []

    def argv(self, client: str, n: int, mode: str) -> list[str]:
        if client == "c":
            assert self.c_binary is not None
            return [str(self.c_binary), self.client_dsn, CHANNEL, str(n), mode]
        return [sys.executable, str(PEERS), client, self.client_dsn, CHANNEL,
                str(n), mode]

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  {time.strftime('%H:%M:%S')} {msg}", flush=True)

    def record(self, run: Run, started: float) -> Run:
        run.wall_s = time.monotonic() - started
        self.runs.append(run)
        if run.ok:
            shown = ", ".join(f"{k}={v:,.1f}" for k, v in run.metrics.items()
                              if k in ("rate", "deliveries_rate", "delay_median_us",
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
                drv = self.driver.burst(CHANNEL, n, size)
                res = proc.result(timeout)
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
            m["cpu_us"] = res["cpu_s"] / want * 1e6
            m["ctx_per_1k"] = res.get("ctx_switches", float("nan")) / want * 1e3
            m["rss_mib"] = res["maxrss_kb"] / 1024
            m["send_s"] = drv["t_commit"] - drv["t_start"]
            m["commit_s"] = drv["t_commit"] - drv["t_select"]
            for tname, t in (res.get("threads") or {}).items():
                m[f"{tname}_cpu_us"] = t["cpu_s"] / want * 1e6
                m[f"{tname}_user_us"] = t["user_s"] / want * 1e6
                m[f"{tname}_sys_us"] = t["sys_s"] / want * 1e6
                m[f"{tname}_ctx_per_1k"] = t.get("ctx_switches", 0) / want * 1e3
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

    # -- steady --------------------------------------------------------------
    def steady_run(self, client: str, rnd: int, rate: int) -> Run:
        n = int(rate * self.cfg.steady_seconds)
        started = time.monotonic()
        run = Run("steady", f"{rate}/s", client, rnd, ok=False)
        try:
            with client_proc(self.argv(client, n, "steady")) as proc:
                proc.wait_line("ready", 120)
                drv = self.driver.steady(CHANNEL, rate, n)
                res = proc.result(60 + self.cfg.steady_seconds * 5)
            run.driver, run.result = drv, res
            if res["count"] != n:
                raise ClientError(f"received {res['count']} of {n}")
            m = run.metrics
            m["send_rate"] = drv["send_rate"]
            m["ack_median_us"] = drv["ack_median_us"]
            m["delay_median_us"] = res["delay_median_us"]
            m["delay_p99_us"] = res["delay_p99_us"]
            m["cpu_us"] = res["cpu_s"] / n * 1e6
            m["ctx_per_1k"] = res.get("ctx_switches", float("nan")) / n * 1e3
            m["rss_mib"] = res["maxrss_kb"] / 1024
            for tname, t in (res.get("threads") or {}).items():
                m[f"{tname}_cpu_us"] = t["cpu_s"] / n * 1e6
                m[f"{tname}_user_us"] = t["user_s"] / n * 1e6
                m[f"{tname}_sys_us"] = t["sys_s"] / n * 1e6
                m[f"{tname}_ctx_per_1k"] = t.get("ctx_switches", 0) / n * 1e3
            run.ok = True
        except (ClientError, psycopg.Error, RuntimeError, KeyError, OSError) as e:
            run.error = f"{type(e).__name__}: {e}"
        self.driver.wait_clients_gone()
        return self.record(run, started)

    def scenario_steady(self) -> None:
        cfg = self.cfg
        print(f"\n[steady] {len(self.clients)} clients x {cfg.rounds} rounds, "
              f"{'/'.join(f'{r:,}' for r in cfg.steady_rates)} per s for "
              f"{cfg.steady_seconds:g} s", flush=True)
        for rnd in range(cfg.rounds):
            for rate in cfg.steady_rates:
                for client in rotate(self.clients, rnd):
                    self.steady_run(client, rnd, rate)

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


# ---------------------------------------------------------------------------
# summaries and tables
# ---------------------------------------------------------------------------


Summary = tuple[str, list[dict[str, Any]]]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) if i else h.ljust(w)
                     for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(out)


def group(runs: Sequence[Run], scenario: str, variant: str, client: str) -> list[Run]:
    return [r for r in runs if r.scenario == scenario and r.variant == variant
            and r.client == client]


def n_ok(runs: Sequence[Run]) -> int:
    return sum(1 for r in runs if r.ok)


def metric(runs: Sequence[Run], key: str) -> list[float]:
    """Values of ``key`` over the successful runs (NaN = not measurable: left out)."""
    return [v for r in runs if r.ok and (v := r.metrics.get(key, math.nan)) == v]


def summarize_burst(runs: Sequence[Run], scenario: str, variant: str,
                    clients: Sequence[str], unavailable: dict[str, str]) -> Summary:
    """Table of a burst scenario: from-COMMIT rate, stream rate, CPU, RSS."""
    c_runs = group(runs, scenario, variant, "c")
    c_rate = med(metric(c_runs, "rate"))
    c_stream = med(metric(c_runs, "stream_rate"))
    headers = ["client", "rate/s (median)", "min", "max", "vs C", "stream/s",
               "vs C", "CPU us/notif", "ctx sw/1k", "peak RSS MiB", "ok"]
    rows: list[list[str]] = []
    summary: list[dict[str, Any]] = []
    for client in clients:
        if client in unavailable:
            rows.append([client, "n/a"] + [""] * (len(headers) - 2))
            summary.append({"client": client, "available": False,
                            "reason": unavailable[client]})
            continue
        g = group(runs, scenario, variant, client)
        rates = metric(g, "rate")
        s: dict[str, Any] = {
            "client": client, "available": True, "runs": len(g), "ok": n_ok(g),
            "rate_median": med(rates), "rate_min": min(rates, default=math.nan),
            "rate_max": max(rates, default=math.nan),
            "stream_median": med(metric(g, "stream_rate")),
            "cpu_us_median": med(metric(g, "cpu_us")),
            "ctx_per_1k_median": med(metric(g, "ctx_per_1k")),
            "rss_mib_median": med(metric(g, "rss_mib")),
        }
        s["vs_c"] = s["rate_median"] / c_rate
        s["stream_vs_c"] = s["stream_median"] / c_stream
        summary.append(s)
        rows.append([client, fmt_num(s["rate_median"]), fmt_num(s["rate_min"]),
                     fmt_num(s["rate_max"]), fmt_num(s["vs_c"], 2),
                     fmt_num(s["stream_median"]), fmt_num(s["stream_vs_c"], 2),
                     fmt_num(s["cpu_us_median"], 2),
                     fmt_num(s["ctx_per_1k_median"], 2),
                     fmt_num(s["rss_mib_median"], 1), f"{n_ok(g)}/{len(g)}"])
    return table(headers, rows), summary


def thread_split(runs: Sequence[Run], label: str = "") -> str | None:
    """Median per-thread CPU and context switches of pglisten_fast runs."""
    parts = []
    for tname in ("selector", "consumer"):
        u = med(metric(runs, f"{tname}_user_us"))
        s = med(metric(runs, f"{tname}_sys_us"))
        c = med(metric(runs, f"{tname}_cpu_us"))
        x = med(metric(runs, f"{tname}_ctx_per_1k"))
        if not math.isnan(c):
            parts.append(f"{tname} {c:.2f} us (user {u:.2f}, sys {s:.2f}), "
                         f"{x:.1f} ctx sw/1k")
    total = med(metric(runs, "cpu_us"))
    if not parts:
        return None
    return (f"  pglisten_fast{label} per notification, median by thread: "
            + "; ".join(parts) + f"; process {total:.2f} us")


def summarize_steady(runs: Sequence[Run], cfg: Config, clients: Sequence[str],
                     unavailable: dict[str, str]) -> Summary:
    headers = ["client", "rate", "sent/s", "server ack p50 us", "delay p50 us",
               "delay p99 us", "(p99 min..max)", "CPU us/notif", "ctx sw/notif",
               "peak RSS MiB", "ok"]
    rows: list[list[str]] = []
    summary: list[dict[str, Any]] = []
    for rate in cfg.steady_rates:
        variant = f"{rate}/s"
        for client in clients:
            if client in unavailable:
                rows.append([client, variant, "n/a", "", "", "", "", "", "", "", ""])
                continue
            g = group(runs, "steady", variant, client)
            p99 = metric(g, "delay_p99_us")
            s: dict[str, Any] = {
                "client": client, "rate": rate, "runs": len(g),
                "ok": n_ok(g),
                "send_rate_median": med(metric(g, "send_rate")),
                "ack_median_us": med(metric(g, "ack_median_us")),
                "delay_median_us": med(metric(g, "delay_median_us")),
                "delay_p99_us": med(p99),
                "cpu_us_median": med(metric(g, "cpu_us")),
                "ctx_per_notif_median": med(metric(g, "ctx_per_1k")) / 1e3,
                "rss_mib_median": med(metric(g, "rss_mib")),
            }
            summary.append(s)
            rng = (f"{min(p99):,.0f}..{max(p99):,.0f}" if p99 else "-")
            rows.append([client, variant, fmt_num(s["send_rate_median"]),
                         fmt_num(s["ack_median_us"]), fmt_num(s["delay_median_us"]),
                         fmt_num(s["delay_p99_us"]),
                         rng, fmt_num(s["cpu_us_median"], 2),
                         fmt_num(s["ctx_per_notif_median"], 2),
                         fmt_num(s["rss_mib_median"], 1), f"{s['ok']}/{len(g)}"])
    return table(headers, rows), summary


def summarize_channels(runs: Sequence[Run], cfg: Config) -> Summary:
    headers = ["variant", "LISTEN all (markers) s", "listener.channels s",
               "burst rate/s (median)", "min", "max", "vs 1 channel", "CPU us/notif",
               "peak RSS MiB", "ok"]
    rows: list[list[str]] = []
    summary: list[dict[str, Any]] = []
    base = med(metric(group(runs, "channels10k", "1 channel", "pglisten_fast"),
                      "rate"))
    for variant in ("1 channel", f"{cfg.channels_k:,} channels"):
        g = group(runs, "channels10k", variant, "pglisten_fast")
        rates = metric(g, "rate")
        s: dict[str, Any] = {"variant": variant, "runs": len(g), "ok": n_ok(g),
             "listen_s": med(metric(g, "listen_s")),
             "channels_s": med(metric(g, "channels_s")),
             "rate_median": med(rates), "rate_min": min(rates, default=float("nan")),
             "rate_max": max(rates, default=float("nan")),
             "cpu_us_median": med(metric(g, "cpu_us")),
             "rss_mib_median": med(metric(g, "rss_mib"))}
        s["vs_1"] = s["rate_median"] / base
        summary.append(s)
        rows.append([variant, fmt_num(s["listen_s"], 3), fmt_num(s["channels_s"], 3),
                     fmt_num(s["rate_median"]), fmt_num(s["rate_min"]),
                     fmt_num(s["rate_max"]), fmt_num(s["vs_1"], 2),
                     fmt_num(s["cpu_us_median"], 2), fmt_num(s["rss_mib_median"], 1),
                     f"{n_ok(g)}/{len(g)}"])
    return table(headers, rows), summary


def summarize_fanout(runs: Sequence[Run], cfg: Config) -> Summary:
    g = [r for r in runs if r.scenario == "fanout100"]
    d = metric(g, "deliveries_rate")
    s: dict[str, Any] = {
        "subs": cfg.fanout_subs, "n": cfg.fanout_n, "runs": len(g), "ok": n_ok(g),
        "deliveries_median": med(d), "deliveries_min": min(d, default=float("nan")),
        "deliveries_max": max(d, default=float("nan")),
        "notif_rate_median": med(metric(g, "rate")),
        "cpu_us_per_delivery": med(metric(g, "cpu_us")),
        "rss_mib_median": med(metric(g, "rss_mib"))}
    headers = ["subscriptions", "deliveries/s (median)", "min", "max",
               "notifications/s", "CPU us/delivery", "peak RSS MiB", "ok"]
    rows = [[str(cfg.fanout_subs), fmt_num(s["deliveries_median"]),
             fmt_num(s["deliveries_min"]), fmt_num(s["deliveries_max"]),
             fmt_num(s["notif_rate_median"]), fmt_num(s["cpu_us_per_delivery"], 3),
             fmt_num(s["rss_mib_median"], 1), f"{n_ok(g)}/{len(g)}"]]
    return table(headers, rows), [s]


def summarize_memory(runs: Sequence[Run]) -> tuple[str, list[dict[str, Any]]]:
    lines: list[str] = []
    summary: list[dict[str, Any]] = []
    for r in runs:
        if r.scenario != "memory":
            continue
        if not r.ok:
            lines.append(f"{r.variant}: FAILED ({r.error})")
            continue
        m = r.metrics
        summary.append({"variant": r.variant, **m})
        if r.variant == "consumed" and r.result:
            series = r.result["rss_series_kb"]
            lines.append("received  " + "  ".join(
                f"{count / 1e6:g}M" for count, _ in series))
            lines.append("RSS MiB   " + "  ".join(
                f"{kb / 1024:.1f}" for _, kb in series))
            lines.append(f"consumed: RSS {m['rss0_mib']:.1f} MiB at start, "
                         f"{m['rss_first_mib']:.1f} after the first burst, "
                         f"{m['rss_last_mib']:.1f} at the end; max - min after the "
                         f"first burst = {m['growth_mib']:.2f} MiB, trend "
                         f"{m['slope_mib_per_m']:+.2f} MiB per million "
                         f"(peak {m['peak_rss_mib']:.1f}); "
                         f"CPU {m['cpu_us']:.2f} us/notif")
        elif r.variant == "stalled":
            lines.append(f"stalled: a never-read {m['buffer_mib']:.0f} MiB drop "
                         f"subscription: RSS {m['rss0_mib']:.1f} -> "
                         f"{m['rss1_mib']:.1f} MiB (+{m['growth_mib']:.1f}); "
                         f"buffered {m['buffered_mib']:.1f} MiB, "
                         f"dropped {m['dropped']:,.0f}")
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------
# header, chart, main
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def dist_version(*names: str) -> str:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return "not installed"


def header(driver: Driver, c_note: str) -> dict[str, Any]:
    import pglisten_fast

    libpq = pq.version()
    pg_config = shutil.which("pg_config")
    pgc_version = "?"
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            pgc_version = subprocess.run([pg_config, "--version"], capture_output=True,
                                         text=True, check=True).stdout.strip()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(),
                    "kernel": platform.release(),
                    "loadavg_start": os.getloadavg()},
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql_server": driver.server_version(),
        "libpq": f"{libpq // 10000}.{libpq % 10000} (psycopg); C loop built "
                 f"against {pgc_version}",
        "psycopg": f"{psycopg.__version__} (impl {pq.__impl__})",
        "asyncpg": dist_version("asyncpg"),
        "psycopg2": dist_version("psycopg2", "psycopg2-binary"),
        "pglisten_fast": f"{pglisten_fast.__version__} (read path "
                         f"{pglisten_fast.__impl__})",
        "c_build": c_note,
    }


def print_header(h: dict[str, Any]) -> None:
    m = h["machine"]
    la = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    print(f"date        {h['date']}")
    print(f"machine     {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, "
          f"load {la}")
    print(f"python      {h['python']}")
    print(f"postgresql  server {h['postgresql_server']}; libpq {h['libpq']}")
    print(f"clients     pglisten_fast {h['pglisten_fast']}, psycopg {h['psycopg']}, "
          f"asyncpg {h['asyncpg']}, psycopg2 {h['psycopg2']}")
    opts = h.get("pglisten_fast_client")
    if opts:
        print(f"            pglisten_fast client: overflow={opts['overflow']!r}, "
              f"buffer_size={opts['buffer_size']:,}, "
              f"get_batch(max_items={opts['max_items']:,})")


def make_chart(summaries: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib not installed: no chart"
    panels = [(k, v) for k, v in summaries.items() if k in ("burst32", "burst512")]
    if not panels:
        return "no burst scenario: no chart"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8),
                             squeeze=False)
    width = 0.4
    for ax, (name, all_rows) in zip(axes[0], panels, strict=True):
        rows = [r for r in all_rows if r.get("available") and r.get("ok")]
        names = [r["client"] for r in rows]
        xs = list(range(len(rows)))

        def nz(v: float) -> float:
            return 0.0 if math.isnan(v) else v

        vals = [nz(r["rate_median"]) for r in rows]
        lo = [nz(r["rate_median"] - r["rate_min"]) for r in rows]
        hi = [nz(r["rate_max"] - r["rate_median"]) for r in rows]
        colors = ["#7f7f7f" if n == "c" else
                  "#1f77b4" if n == "pglisten_fast" else "#ff7f0e" for n in names]
        ax.bar([x - width / 2 for x in xs], vals, width, yerr=[lo, hi],
               color=colors, capsize=3, label="from COMMIT (median, min-max)")
        ax.bar([x + width / 2 for x in xs], [nz(r["stream_median"]) for r in rows],
               width, color=colors, alpha=0.45, hatch="//",
               label="stream (median)")
        c = [r for r in rows if r["client"] == "c"]
        if c and not math.isnan(c[0]["rate_median"]):
            ax.axhline(c[0]["rate_median"], color="black", linestyle="--",
                       linewidth=1, label="C libpq loop, from COMMIT")
        if c and not math.isnan(c[0]["stream_median"]):
            ax.axhline(c[0]["stream_median"], color="black", linestyle=":",
                       linewidth=1, label="C libpq loop, stream")
        ax.set_xticks(xs, names, rotation=30, ha="right")
        ax.set_title(f"{name}: notifications per second")
        ax.set_ylabel("million notifications / s")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1e6:g}"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def available_clients(requested: Sequence[str], c_binary: Path | None,
                      c_note: str) -> dict[str, str]:
    """Clients that cannot run here, with the reason."""
    out: dict[str, str] = {}
    for client in requested:
        if client == "c":
            if c_binary is None:
                out[client] = c_note
        elif importlib.util.find_spec(CLIENT_MODULES[client]) is None:
            out[client] = f"module {CLIENT_MODULES[client]} not importable"
    return out


def parse_list(value: str | None, allowed: Sequence[str], what: str) -> list[str]:
    if not value:
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} "
                         f"(choose from {', '.join(allowed)})")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds and smaller sizes (< 2 minutes)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per scenario (default 5, --quick 3)")
    ap.add_argument("--dsn", default=None,
                    help="use this server instead of a private TempCluster")
    ap.add_argument("--clients", default=None,
                    help=f"comma-separated subset of {','.join(ALL_CLIENTS)}")
    ap.add_argument("--scenarios", default=None,
                    help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}")
    ap.add_argument("--pglf-overflow", choices=("block", "drop"),
                    default=DEFAULT_OVERFLOW,
                    help="overflow policy of the pglisten_fast client's "
                         "subscriptions (default: %(default)s, lossless like the "
                         "other clients; with 'drop' a run that lost data fails)")
    ap.add_argument("--pglf-buffer-size", type=int, default=16 * 2**20,
                    help="ring size of the pglisten_fast client's subscriptions "
                         "in bytes (default: %(default)s, the library's default)")
    ap.add_argument("--pglf-max-items", type=int, default=DEFAULT_MAX_ITEMS,
                    help="max_items of the pglisten_fast client's get_batch calls "
                         "(default: %(default)s)")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="print every run as it finishes")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)

    clients = parse_list(args.clients, ALL_CLIENTS, "client")
    scenarios = parse_list(args.scenarios, ALL_SCENARIOS, "scenario")
    cfg = Config.make(args.quick, args.rounds)
    started = time.monotonic()
    # Inherited by the client processes (see peers.run_pglisten_fast).
    os.environ[OVERFLOW_ENV] = args.pglf_overflow
    os.environ[BUFFER_ENV] = str(args.pglf_buffer_size)
    os.environ[MAX_ITEMS_ENV] = str(args.pglf_max_items)

    with contextlib.ExitStack() as stack:
        build_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="pglf-bench-")))
        c_binary, c_note = (build_c_listener(build_dir) if "c" in clients
                            else (None, "not requested"))
        unavailable = available_clients(clients, c_binary, c_note)
        runnable = [c for c in clients if c not in unavailable]

        if args.dsn:
            dsn = args.dsn
        else:
            from pglisten_fast.testing import TempCluster

            cluster = TempCluster()
            stack.callback(cluster.close)
            cluster.start()
            dsn = cluster.dsn
        bench = Bench(dsn, cfg, runnable, c_binary, args.verbose)
        stack.callback(bench.driver.close)
        hdr = header(bench.driver, c_note)
        hdr["pglisten_fast_client"] = {"overflow": args.pglf_overflow,
                                       "buffer_size": args.pglf_buffer_size,
                                       "max_items": args.pglf_max_items}
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
        summaries: dict[str, Any] = {}
        print("\n" + "=" * 78)
        print_header(hdr)
        for scenario in scenarios:
            print()
            if scenario in ("burst32", "burst512"):
                size = 32 if scenario == "burst32" else 512
                n = cfg.burst32_n if size == 32 else cfg.burst512_n
                print(f"## {scenario}: {n:,} x {size} B notifications in one "
                      f"transaction;\n   rate = N / (last receipt - COMMIT returned);"
                      f" stream = (N-1) / (last - first receipt)")
                text, summaries[scenario] = summarize_burst(
                    runs, scenario, f"{size}B", clients, unavailable)
                print(text)
                split = thread_split(group(runs, scenario, f"{size}B",
                                           "pglisten_fast"))
                if split:
                    print(split)
            elif scenario == "steady":
                print(f"## steady: one notification per transaction at a fixed "
                      f"rate for {cfg.steady_seconds:g} s; delay = receipt - send")
                text, summaries[scenario] = summarize_steady(runs, cfg, clients,
                                                             unavailable)
                print(text)
                for rate in cfg.steady_rates:
                    split = thread_split(group(runs, "steady", f"{rate}/s",
                                               "pglisten_fast"), f" at {rate}/s")
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
            print(make_chart(summaries, args.results_dir / "compare.png"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
