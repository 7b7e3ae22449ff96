"""Tables, header and chart of ``compare.py``.

Every number in a table is the median over the successful rounds of one
client (min-max where shown); ``summarize_*`` return the printed table and
the same figures as dictionaries for the JSON file.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from bench_clients import PGLF_CLIENTS, Flavours
from bench_driver import Driver
from bench_scenarios import MAX_RATE, Config, Run, rate_label
from psycopg import pq

Summary = tuple[str, list[dict[str, Any]]]


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.{digits}f}"


def fmt_ms(us: float | None) -> str:
    """Microseconds shown as milliseconds, 3 significant-ish digits."""
    if us is None or math.isnan(us):
        return "-"
    ms = us / 1e3
    return f"{ms:,.2f}" if ms < 10 else f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def fmt_range(lo: float, hi: float, fmt: Any = fmt_num) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "-"
    return f"{fmt(lo)}-{fmt(hi)}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain-text table; the first ``left`` columns are left-justified.

    An empty row (``[]``) prints as a blank line (a group separator).
    """
    filled = [r for r in rows if r]
    widths = [max(len(h), *(len(r[i]) for r in filled)) if filled else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) if r else "" for r in rows]
    return "\n".join(out).rstrip()


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
    c_cpu = med(metric(c_runs, "cpu_us"))
    headers = ["client", "rate/s (median)", "min", "max", "vs C", "stream/s",
               "vs C", "CPU us/notif", "vs C", "ctx sw/1k", "peak RSS MiB", "ok"]
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
        s["cpu_vs_c"] = s["cpu_us_median"] / c_cpu
        s["cpu_us_min"] = min(metric(g, "cpu_us"), default=math.nan)
        s["cpu_us_max"] = max(metric(g, "cpu_us"), default=math.nan)
        s["idle_share_median"] = med(metric(g, "idle_share"))
        summary.append(s)
        rows.append([client, fmt_num(s["rate_median"]), fmt_num(s["rate_min"]),
                     fmt_num(s["rate_max"]), fmt_num(s["vs_c"], 2),
                     fmt_num(s["stream_median"]), fmt_num(s["stream_vs_c"], 2),
                     fmt_num(s["cpu_us_median"], 2), fmt_num(s["cpu_vs_c"], 1),
                     fmt_num(s["ctx_per_1k_median"], 2),
                     fmt_num(s["rss_mib_median"], 1), f"{n_ok(g)}/{len(g)}"])
    return table(headers, rows), summary


def thread_split(runs: Sequence[Run], label: str = "",
                 client: str = "pglisten_fast") -> str | None:
    """Median per-thread CPU and context switches of pglisten_fast runs.

    The per-thread figures are measured inside the client; "process" is the
    sum over all its threads (schedstat), so it also shows what the other
    threads (Python's, libpq's) take.
    """
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
    return (f"  {client}{label} per notification, median by thread: "
            + "; ".join(parts) + f"; process (all threads) {total:.2f} us")




#: A paced step whose median server answer took longer than this is marked:
#: the server (sharing the CPUs) was behind, and the delays of that row
#: include its backlog, not only the client's.
SERVER_BEHIND_US = 5_000.0


def summarize_stream(runs: Sequence[Run], scenario: str, rates: Sequence[int],
                     clients: Sequence[str], unavailable: dict[str, str], *,
                     collapse_ms: float) -> Summary:
    """Table of a stream scenario (``sweep``, ``steady``): one row per rate
    and client, grouped by rate."""
    headers = ["rate", "client", "sent/s", "p50 ms", "p90 ms", "p99 ms",
               "(p99 min-max)", "p99.9 ms", f"p99>{collapse_ms:g}ms",
               "CPU us/notif", "(min-max)", "wake/notif", "idle %",
               "ack p50 ms", "ack p99 ms", "ok"]
    rows: list[list[str]] = []
    summary: list[dict[str, Any]] = []
    for rate in rates:
        variant = rate_label(rate)
        if rows:
            rows.append([])
        for client in clients:
            if client in unavailable:
                rows.append([variant, client, "n/a"] + [""] * (len(headers) - 3))
                summary.append({"client": client, "rate": variant,
                                "available": False, "reason": unavailable[client]})
                continue
            g = group(runs, scenario, variant, client)
            cpu = metric(g, "cpu_us")
            sent = metric(g, "send_rate")
            s: dict[str, Any] = {
                "client": client, "rate": variant, "target_rate": rate,
                "available": True, "runs": len(g), "ok": n_ok(g),
                "send_rate_median": med(sent),
                "send_rate_min": min(sent, default=math.nan),
                "send_rate_max": max(sent, default=math.nan),
                "collapsed_rounds": int(sum(metric(g, "collapsed"))),
                "collapse_ms": collapse_ms,
                "cpu_us_median": med(cpu),
                "cpu_us_min": min(cpu, default=math.nan),
                "cpu_us_max": max(cpu, default=math.nan),
            }
            # The median of each (the name used in the table), and its range.
            for key in ("delay_median_us", "delay_p90_us", "delay_p99_us",
                        "delay_p999_us", "delay_max_us", "cpu_rusage_us",
                        "wakeups_per_notif", "involuntary_per_notif",
                        "ctx_per_1k", "idle_share", "ack_median_us", "ack_p99_us",
                        "lag_p99_us", "sender_cpu_us", "sender_busy",
                        "sender_backend_us", "sender_backend_busy",
                        "listener_backend_us", "rss_mib"):
                vals = metric(g, key)
                name = key if key.startswith("delay") else f"{key}_median"
                s[name] = med(vals)
                s[f"{key}_min"] = min(vals, default=math.nan)
                s[f"{key}_max"] = max(vals, default=math.nan)
            s["server_behind"] = bool(rate > 0 and
                                      s["ack_median_us_median"] > SERVER_BEHIND_US)
            summary.append(s)
            idle = s["idle_share_median"]
            rows.append([
                variant, client, fmt_num(s["send_rate_median"]),
                fmt_ms(s["delay_median_us"]), fmt_ms(s["delay_p90_us"]),
                fmt_ms(s["delay_p99_us"]),
                fmt_range(s["delay_p99_us_min"], s["delay_p99_us_max"], fmt_ms),
                fmt_ms(s["delay_p999_us"]),
                f"{s['collapsed_rounds']}/{n_ok(g)}" if g else "-",
                fmt_num(s["cpu_us_median"], 2),
                fmt_range(s["cpu_us_min"], s["cpu_us_max"],
                          lambda v: fmt_num(v, 2)),
                fmt_num(s["wakeups_per_notif_median"], 2),
                fmt_num(idle * 100, 0),
                fmt_ms(s["ack_median_us_median"]) + ("!" if s["server_behind"]
                                                     else ""),
                fmt_ms(s["ack_p99_us_median"]),
                f"{n_ok(g)}/{len(g)}"])
    text = table(headers, rows, left=2)
    if any(s.get("server_behind") for s in summary):
        text += (f"\n  ! the server answered the sender late (median ack > "
                 f"{SERVER_BEHIND_US / 1e3:g} ms): that row's delays include the "
                 f"server's backlog, not only the client's")
    text += server_side(summary, rates)
    if MAX_RATE in rates:
        text += ("\n  max: unpaced, the sender keeps a fixed number of statements "
                 "unanswered (--max-inflight), so its delays include that queue")
    return text, summary


def server_side(summary: Sequence[dict[str, Any]], rates: Sequence[int]) -> str:
    """Per rate, the sending and receiving side's CPU (median over clients)."""
    lines = []
    for rate in rates:
        rows = [s for s in summary if s.get("available")
                and s["rate"] == rate_label(rate)]

        def m(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return med([v for s in rows if (v := s.get(key, math.nan)) == v])

        busy = m("sender_backend_busy_median")
        if math.isnan(busy) and math.isnan(m("sender_busy_median")):
            continue
        lines.append(
            f"  {rate_label(rate):>7}: sender's backend "
            f"{fmt_num(m('sender_backend_us_median'), 1)} us/notif "
            f"({fmt_num(busy * 100, 0)}% of a CPU), client's backend "
            f"{fmt_num(m('listener_backend_us_median'), 1)} us/notif; sender "
            f"process {fmt_num(m('sender_cpu_us_median'), 1)} us/notif "
            f"({fmt_num(m('sender_busy_median') * 100, 0)}% of a CPU)")
    if not lines:
        return ""
    return ("\n  server side, median over clients (CPU from /proc/<pid>/schedstat of "
            "the backends):\n" + "\n".join(lines))


def read_paths(runs: Sequence[Run], clients: Sequence[str],
               flavours: Flavours) -> dict[str, dict[str, Any]]:
    """What each pglisten_fast flavour actually ran on (from its own results)."""
    out: dict[str, dict[str, Any]] = {}
    for client in clients:
        if client not in PGLF_CLIENTS:
            continue
        res = next((r.result for r in runs if r.client == client and r.ok
                    and r.result and "impl" in r.result), None)
        if res is None:
            continue
        out[client] = {k: res.get(k) for k in ("impl", "impl_reason", "psycopg",
                                               "psycopg_impl", "libpq", "python",
                                               "executable")}
    return out


def format_read_paths(paths: dict[str, dict[str, Any]]) -> str:
    lines = []
    for client, p in paths.items():
        why = f" ({p['impl_reason']})" if p.get("impl_reason") else ""
        lines.append(f"  {client}: read path {p['impl']!r}{why}; psycopg "
                     f"{p['psycopg']} [{p['psycopg_impl']}], libpq {p['libpq']}, "
                     f"Python {p['python']} ({p['executable']})")
    return "\n".join(lines)


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


def header(driver: Driver, c_note: str,
           flavours: Flavours | None = None) -> dict[str, Any]:
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
        "pglisten_fast_binary": (flavours.binary_note if flavours else
                                 "not requested"),
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
    print(f"flavours    pglisten_fast: this Python (psycopg {h['psycopg']}); "
          f"pglisten_fast_binary: {h.get('pglisten_fast_binary', '-')}")
    if h.get("sender"):
        print(f"sender      {h['sender']}")
    opts = h.get("pglisten_fast_client")
    if opts:
        print(f"            pglisten_fast client: overflow={opts['overflow']!r}, "
              f"buffer_size={opts['buffer_size']:,}, "
              f"get_batch(max_items={opts['max_items']:,})"
              + ("" if opts.get("batch_window") is None
                 else f", batch_window={opts['batch_window']:g} s"))


#: Colours of the clients in the charts.
CLIENT_COLORS = {"c": "#444444", "pglisten_fast": "#1f77b4",
                 "pglisten_fast_binary": "#17becf", "psycopg3": "#ff7f0e",
                 "psycopg3_pgconn": "#d62728", "asyncpg": "#2ca02c",
                 "psycopg2": "#9467bd"}


def _burst_panel(ax: Any, name: str, all_rows: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import FuncFormatter

    width = 0.4
    rows = [r for r in all_rows if r.get("available") and r.get("ok")]
    names = [r["client"] for r in rows]
    xs = list(range(len(rows)))

    def nz(v: float) -> float:
        return 0.0 if math.isnan(v) else v

    vals = [nz(r["rate_median"]) for r in rows]
    lo = [nz(r["rate_median"] - r["rate_min"]) for r in rows]
    hi = [nz(r["rate_max"] - r["rate_median"]) for r in rows]
    colors = [CLIENT_COLORS.get(n, "#ff7f0e") if n.startswith(("c", "pglisten"))
              and n != "psycopg3" else "#ff7f0e" for n in names]
    ax.bar([x - width / 2 for x in xs], vals, width, yerr=[lo, hi],
           color=colors, capsize=3, label="from COMMIT (median, min-max)")
    ax.bar([x + width / 2 for x in xs], [nz(r["stream_median"]) for r in rows],
           width, color=colors, alpha=0.45, hatch="//", label="stream (median)")
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


def _sweep_panel(ax: Any, name: str, all_rows: list[dict[str, Any]],
                 collapse_ms: float) -> None:
    """p99 delay per rate step, one line per client (log y).

    The x axis is the step (target rate; "max" with the median achieved
    rate over clients); clients are shifted a little sideways so that their
    min-max bars stay apart.
    """
    rows = [r for r in all_rows if r.get("available") and r.get("ok")
            and not math.isnan(r["delay_p99_us"])]
    steps = list(dict.fromkeys(r["rate"] for r in all_rows if "rate" in r))
    clients = list(dict.fromkeys(r["client"] for r in rows))
    if not steps or not clients:
        return
    labels = []
    for step in steps:
        if step == "max":
            got = [r["send_rate_median"] for r in rows if r["rate"] == "max"]
            labels.append(f"max\n(~{statistics.median(got) / 1e3:.0f}k/s)" if got
                          else "max")
        else:
            labels.append(f"{int(step.split('/')[0]) / 1e3:g}k/s")
    width = 0.6 / max(1, len(clients))
    for k, client in enumerate(clients):
        by_step = {r["rate"]: r for r in rows if r["client"] == client}
        pts = [(i + (k - (len(clients) - 1) / 2) * width, by_step[step])
               for i, step in enumerate(steps) if step in by_step]
        ys = [r["delay_p99_us"] / 1e3 for _, r in pts]
        err = [[(r["delay_p99_us"] - r["delay_p99_us_min"]) / 1e3 for _, r in pts],
               [(r["delay_p99_us_max"] - r["delay_p99_us"]) / 1e3 for _, r in pts]]
        ax.errorbar([x for x, _ in pts], ys, yerr=err, marker="o", markersize=4,
                    capsize=2, linewidth=2 if client.startswith("pglisten") else 1,
                    color=CLIENT_COLORS.get(client), label=client)
    ax.axhline(collapse_ms, color="red", linestyle=":", linewidth=1,
               label=f"collapse threshold {collapse_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xticks(range(len(steps)), labels)
    ax.set_xlabel("send rate (one notification per transaction)")
    ax.set_ylabel("p99 send -> receive delay, ms (median, min-max)")
    ax.set_title(f"{name}: p99 latency vs rate")
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def make_chart(summaries: dict[str, Any], path: Path,
               collapse_ms: float = 50.0) -> str:
    """Burst rates (bars) and the sweep's p99 against rate, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart"
    panels = [(k, v) for k, v in summaries.items()
              if k in ("burst32", "burst512", "sweep", "steady")]
    if not panels:
        return "no burst or stream scenario: no chart"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2),
                             squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels, strict=True):
        if name in ("sweep", "steady"):
            _sweep_panel(ax, name, rows, collapse_ms)
        else:
            _burst_panel(ax, name, rows)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"
