"""Benchmark clients: one LISTEN consumer per library, same protocol for all.

Each client runs as its own process (started by ``compare.py``)::

    python benchmarks/peers.py CLIENT DSN CHANNEL N [MODE]

``CLIENT`` is one of :data:`CLIENTS` (the C ceiling is the separate program
``c_listener.c``, which speaks the same protocol).  A client connects,
LISTENs on ``CHANNEL``, prints ``ready`` (flushed) once LISTEN is in effect,
receives ``N`` notifications and prints one JSON line::

    {"client": ..., "mode": ..., "count": N, "first": t, "last": t,
     "cpu_s": ..., "cpu_user_s": ..., "cpu_sys_s": ..., "maxrss_kb": ...,
     "last_payload": "...", ...}

``first``/``last`` are wall-clock receipt times (``time.time()``) of the
first and the N-th notification; CPU times cover the window from ``ready``
to the last receipt; ``maxrss_kb`` is the process's peak RSS (``VmHWM``).

Every client runs one Python-level loop iteration per notification (a real
consumer does at least that much): it counts, and in ``steady`` mode parses
the payload.

Modes (all clients):

``burst``   count N notifications.
``steady``  each payload is the sender's ``time.time()`` just before its
            ``pg_notify``; report the median and 99th percentile of
            receipt - send (``delay_median_us``, ``delay_p99_us``).

Modes of the ``pglisten_fast`` client only:

``channels:K``  listen on CHANNEL plus K-1 other channels in one
                ``listen()`` call; report the time until every ``"listen"``
                marker arrived (``listen_s``) and until ``listener.channels``
                held all K (``channels_s``); then as ``burst``.
``fanout:K``    K subscriptions of CHANNEL consumed round-robin by one
                thread; N is the number of notifications *sent*, the
                client counts K x N deliveries.
``memory:B``    as ``burst``, printing ``progress {...}`` with the current
                RSS every B notifications (the driver sends the next burst
                of B once it sees the line).
``stalled:S``   one ``overflow="drop"`` subscription of S bytes that is
                never read; wait until the selector has read N
                notifications and report the RSS growth.

Modules of the other clients are imported lazily so that each process only
pays for its own library.
"""

from __future__ import annotations

import json
import os
import resource
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

CLIENTS: tuple[str, ...] = (
    "pglisten_fast",
    "psycopg3",
    "psycopg3_pgconn",
    "asyncpg",
    "psycopg2",
)

#: Which module each Python client needs (compare.py reports "n/a" if absent).
CLIENT_MODULES: dict[str, str] = {
    "pglisten_fast": "pglisten_fast",
    "psycopg3": "psycopg",
    "psycopg3_pgconn": "psycopg",
    "asyncpg": "asyncpg",
    "psycopg2": "psycopg2",
}

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------


def cpu_times() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def ctx_switches() -> int:
    """Voluntary + involuntary context switches of this process (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return int(ru.ru_nvcsw + ru.ru_nivcsw)


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def maxrss_kb() -> int:
    """Peak resident set size of this process in KiB.

    ``VmHWM`` (the high-water mark of this program's memory map), not
    ``ru_maxrss``: Linux carries ``ru_maxrss`` across ``fork``/``exec``, so
    a client started by a 40 MiB driver would report at least 40 MiB.
    """
    return _status_kb("VmHWM:") or int(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rss_kb() -> int:
    """Current resident set size of this process in KiB (``VmRSS``)."""
    return _status_kb("VmRSS:")


def thread_times(tid: int) -> tuple[float, float]:
    """(user, sys) CPU seconds of thread ``tid`` (a native id) of this process."""
    try:
        with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def thread_ctx_switches(tid: int) -> int:
    """Voluntary + involuntary context switches of thread ``tid``."""
    total = 0
    try:
        with open(f"/proc/self/task/{tid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("voluntary_ctxt_switches:",
                                    "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def thread_cpu_precise(ident: int) -> float:
    """CPU seconds of the thread with Python ``ident`` (nanosecond clock)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, AttributeError):
        return 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    """The value at rank ``int((n - 1) * q)`` (the C client uses the same rule)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[int((len(sorted_values) - 1) * q)]


class Window:
    """CPU accounting from ``ready`` to the last receipt, and the JSON result."""

    def __init__(self, client: str, mode: str) -> None:
        self.client = client
        self.mode = mode
        self.u0, self.s0 = cpu_times()
        self.u1, self.s1 = self.u0, self.s0
        self.cs0 = self.cs1 = ctx_switches()

    def ready(self) -> None:
        """Start the CPU window and tell the driver LISTEN is in effect."""
        self.u0, self.s0 = cpu_times()
        self.cs0 = ctx_switches()
        emit("ready")

    def stop(self) -> None:
        """End the CPU window (call right after the last receipt)."""
        self.u1, self.s1 = cpu_times()
        self.cs1 = ctx_switches()

    def result(
        self,
        count: int,
        first: float,
        last: float,
        last_payload: str,
        delays: list[float] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "client": self.client,
            "mode": self.mode,
            "count": count,
            "first": first,
            "last": last,
            "cpu_s": (self.u1 - self.u0) + (self.s1 - self.s0),
            "cpu_user_s": self.u1 - self.u0,
            "cpu_sys_s": self.s1 - self.s0,
            "ctx_switches": self.cs1 - self.cs0,
            "maxrss_kb": maxrss_kb(),
            "last_payload": last_payload[:64],
        }
        if delays is not None:
            delays.sort()
            out["delay_median_us"] = percentile(delays, 0.5) * 1e6
            out["delay_p99_us"] = percentile(delays, 0.99) * 1e6
        out.update(extra)
        return out


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def finish(result: dict[str, Any]) -> None:
    """Print the result line and leave without a slow interpreter teardown."""
    emit(json.dumps(result))
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------
# pglisten_fast
# ---------------------------------------------------------------------------


def _pglf_threads(listener: Any) -> dict[str, tuple[int, int]]:
    """Native and Python ids of the selector and the consumer (main) thread.

    Also names the two threads ``pglf-selector`` and ``pglf-consumer`` at the
    OS level (``/proc/self/task/<tid>/comm``) so that ``perf`` and ``top -H``
    can tell them apart.
    """
    sel = listener._thread  # diagnostics only: the selector thread object
    main = threading.main_thread()
    ids: dict[str, tuple[int, int]] = {
        "consumer": (main.native_id or 0, main.ident or 0)}
    if sel is not None and sel.native_id is not None and sel.ident is not None:
        ids["selector"] = (sel.native_id, sel.ident)
    for name, (tid, _ident) in ids.items():
        try:
            with open(f"/proc/self/task/{tid}/comm", "w", encoding="ascii") as fh:
                fh.write(f"pglf-{name}")
        except OSError:
            pass
    return ids


Snapshot = dict[str, tuple[float, float, float, int]]


def _thread_snapshot(ids: dict[str, tuple[int, int]]) -> Snapshot:
    """Per thread: (user s, sys s, precise CPU s, context switches)."""
    return {
        name: (*thread_times(tid), thread_cpu_precise(ident),
               thread_ctx_switches(tid))
        for name, (tid, ident) in ids.items()
    }


def _thread_report(before: Snapshot, after: Snapshot) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, (u0, s0, c0, x0) in before.items():
        u1, s1, c1, x1 = after[name]
        out[name] = {"user_s": u1 - u0, "sys_s": s1 - s0, "cpu_s": c1 - c0,
                     "ctx_switches": x1 - x0}
    return out


#: Environment variables that set the pglisten_fast client's subscription
#: options (``compare.py --pglf-overflow/--pglf-buffer-size`` set them).
OVERFLOW_ENV = "PGLF_BENCH_OVERFLOW"
BUFFER_ENV = "PGLF_BENCH_BUFFER_SIZE"
#: ``max_items`` of the client's ``get_batch`` calls (default 4,096: larger
#: batches make CPython return allocator arenas to the OS between batches).
MAX_ITEMS_ENV = "PGLF_BENCH_MAX_ITEMS"
DEFAULT_MAX_ITEMS = 4096
#: Default policy of the benchmark client: "block" is lossless like every
#: other client (which all push back through TCP); with the library's own
#: default ("drop", 16 MiB) a 1M burst can overflow a consumer that is
#: descheduled for a moment, and a run that lost data is not comparable.
DEFAULT_OVERFLOW = "block"


def run_pglisten_fast(dsn: str, channel: str, n: int, mode: str) -> None:
    import pglisten_fast as pgl

    kind, _, arg = mode.partition(":")
    win = Window("pglisten_fast", mode)
    overflow = os.environ.get(OVERFLOW_ENV) or DEFAULT_OVERFLOW
    buffer_size = int(os.environ.get(BUFFER_ENV) or 16 * 2**20)
    listener = pgl.Listener(dsn, overflow=overflow,  # type: ignore[arg-type]
                            buffer_size=buffer_size).start()
    max_items = int(os.environ.get(MAX_ITEMS_ENV) or DEFAULT_MAX_ITEMS)
    extra: dict[str, Any] = {"impl": pgl.__impl__, "overflow": overflow,
                             "buffer_size": buffer_size, "max_items": max_items}

    if kind == "stalled":
        _pglf_stalled(listener, channel, n, size=int(arg), win=win, extra=extra)
        return

    nsubs = int(arg) if kind == "fanout" else 1
    names = [channel]
    if kind == "channels":
        names += [f"{channel}_{i:05d}" for i in range(1, int(arg))]
    t_listen = time.perf_counter()
    if kind == "fanout":
        subs = [listener.listen(channel) for _ in range(nsubs)]
    else:
        subs = [listener.listen(*names)]
    # Every channel's first item is its "listen" marker: LISTEN is in effect.
    want_markers = len(names) * nsubs
    markers = 0
    t_markers: float | None = None
    t_channels: float | None = None
    while markers < want_markers or t_channels is None:
        seen = 0
        for sub in subs:
            for item in sub.get_batch(max_items=65536, timeout=0):
                seen += 1
                if item.reason == "listen":
                    markers += 1
        now = time.perf_counter()
        if not seen:
            time.sleep(0.001)
        if t_markers is None and markers >= want_markers:
            t_markers = now
        if t_channels is None and len(listener.channels) >= len(names):
            t_channels = now
    assert t_markers is not None and t_channels is not None
    if kind == "channels":
        extra["listen_s"] = t_markers - t_listen
        extra["channels_s"] = t_channels - t_listen
        extra["nchannels"] = len(names)

    ids = _pglf_threads(listener)
    before = _thread_snapshot(ids)
    progress = int(arg) if kind == "memory" else 0
    if kind == "memory":
        extra["rss_series_kb"] = [[0, rss_kb()]]
    steady = kind == "steady"
    delays: list[float] | None = [] if steady else None
    want = n * nsubs
    count = dropped = 0
    first = last = 0.0
    payload = ""
    win.ready()
    if nsubs == 1:
        sub = subs[0]
        next_progress = progress
        while count + dropped < want:
            batch = sub.get_batch(max_items=max_items)
            now = time.time()
            if not first:
                first = now
            for item in batch:
                if item.connection_reset:
                    dropped += item.dropped
                    continue
                count += 1
                payload = item.payload
                if delays is not None:
                    delays.append(now - float(payload))
            last = now
            if progress and count + dropped >= next_progress:
                next_progress += progress
                rss = rss_kb()
                extra["rss_series_kb"].append([count + dropped, rss])
                emit("progress " + json.dumps({"count": count + dropped,
                                               "rss_kb": rss}))
    else:
        # One consumer thread for all subscriptions (2-core machine): poll
        # every subscription without waiting; when a full pass finds nothing,
        # block on the next one.  All subscriptions share one channel, so the
        # selector fills them in the same pass and any of them is a good
        # signal that there is work again.
        k = 0
        while count + dropped < want:
            got = False
            for sub in subs:
                batch = sub.get_batch(max_items=max_items, timeout=0)
                if not batch:
                    continue
                got = True
                for item in batch:
                    if item.connection_reset:
                        dropped += item.dropped
                        continue
                    count += 1
                    payload = item.payload
            now = time.time()
            if got:
                if not first:
                    first = now
                last = now
            else:
                k = (k + 1) % nsubs
                batch = subs[k].get_batch(max_items=max_items, timeout=0.1)
                if batch:
                    now = time.time()
                    first = first or now
                    last = now
                    for item in batch:
                        if item.connection_reset:
                            dropped += item.dropped
                            continue
                        count += 1
                        payload = item.payload
    win.stop()
    after = _thread_snapshot(ids)
    extra["threads"] = _thread_report(before, after)
    extra["dropped"] = dropped
    extra["stats"] = _listener_stats(listener)
    finish(win.result(count, first, last, payload, delays, **extra))


def _listener_stats(listener: Any) -> dict[str, Any]:
    st = listener.stats
    return {"received": st.received, "dropped": st.dropped, "markers": st.markers,
            "reconnects": st.reconnects}


def _pglf_stalled(
    listener: Any, channel: str, n: int, *, size: int, win: Window,
    extra: dict[str, Any],
) -> None:
    """A subscription that is never read while ``n`` notifications arrive."""
    sub = listener.listen(channel, buffer_size=size, overflow="drop")
    while channel not in listener.channels:  # confirmed by the server
        time.sleep(0.002)
    rss0 = rss_kb()
    win.ready()
    first = 0.0
    while listener.stats.received < n:
        time.sleep(0.01)
        if not first and listener.stats.received:
            first = time.time()
    last = time.time()
    win.stop()
    st = sub.stats
    extra.update(
        rss0_kb=rss0,
        rss1_kb=rss_kb(),
        buffer_size=sub.buffer_size,
        buffered_bytes=st.buffered_bytes,
        dropped=st.dropped,
        stats=_listener_stats(listener),
    )
    finish(win.result(int(listener.stats.received), first, last, "", None, **extra))


# ---------------------------------------------------------------------------
# psycopg 3
# ---------------------------------------------------------------------------


def _psycopg3_connect(dsn: str, channel: str) -> Any:
    import psycopg
    from psycopg import sql

    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return conn


def run_psycopg3(dsn: str, channel: str, n: int, mode: str) -> None:
    """psycopg 3's ``conn.notifies()`` generator."""
    conn = _psycopg3_connect(dsn, channel)
    win = Window("psycopg3", mode)
    delays: list[float] | None = [] if mode == "steady" else None
    count = 0
    first = last = 0.0
    payload = ""
    win.ready()
    for note in conn.notifies():
        count += 1
        if delays is not None:
            now = time.time()
            delays.append(now - float(note.payload))
            if count == 1:
                first = now
        elif count == 1:
            first = time.time()
        if count >= n:
            last = time.time()
            payload = note.payload
            break
    win.stop()
    finish(win.result(count, first, last, payload, delays))


def run_psycopg3_pgconn(dsn: str, channel: str, n: int, mode: str) -> None:
    """The raw ``conn.pgconn`` loop: select, consume_input, notifies (bytes)."""
    conn = _psycopg3_connect(dsn, channel)
    pgconn = conn.pgconn
    sock = pgconn.socket
    win = Window("psycopg3_pgconn", mode)
    delays: list[float] | None = [] if mode == "steady" else None
    count = 0
    first = last = 0.0
    payload = b""
    win.ready()
    while count < n:
        select.select([sock], [], [])
        pgconn.consume_input()
        now = time.time() if delays is not None else 0.0
        while (note := pgconn.notifies()) is not None:
            count += 1
            if delays is not None:
                delays.append(now - float(note.extra))
            if count == 1:
                first = now or time.time()
            if count == n:
                last = time.time()
                payload = note.extra
    win.stop()
    finish(win.result(count, first, last, payload.decode(), delays))


# ---------------------------------------------------------------------------
# asyncpg
# ---------------------------------------------------------------------------


def _conninfo_kwargs(dsn: str) -> dict[str, str]:
    """Parse a libpq ``key=value`` string (quotes and backslashes allowed)."""
    out: dict[str, str] = {}
    i, size = 0, len(dsn)
    while i < size:
        while i < size and dsn[i].isspace():
            i += 1
        if i >= size:
            break
        eq = dsn.index("=", i)
        key = dsn[i:eq].strip()
        i = eq + 1
        while i < size and dsn[i].isspace():
            i += 1
        value = []
        if i < size and dsn[i] == "'":
            i += 1
            while dsn[i] != "'":
                if dsn[i] == "\\":
                    i += 1
                value.append(dsn[i])
                i += 1
            i += 1
        else:
            while i < size and not dsn[i].isspace():
                if dsn[i] == "\\":
                    i += 1
                value.append(dsn[i])
                i += 1
        out[key] = "".join(value)
    return out


def run_asyncpg(dsn: str, channel: str, n: int, mode: str) -> None:
    """asyncpg's ``add_listener`` callback on the default asyncio loop."""
    import asyncio

    import asyncpg  # type: ignore[import-untyped]

    async def main() -> None:
        if "://" in dsn:
            conn = await asyncpg.connect(dsn)
        else:
            kw = _conninfo_kwargs(dsn)
            settings = {}
            if "application_name" in kw:
                settings["application_name"] = kw.pop("application_name")
            conn = await asyncpg.connect(
                host=kw.get("host"),
                port=int(kw["port"]) if "port" in kw else None,
                user=kw.get("user"),
                password=kw.get("password"),
                database=kw.get("dbname"),
                server_settings=settings or None,
            )
        win = Window("asyncpg", mode)
        done = asyncio.Event()
        delays: list[float] | None = [] if mode == "steady" else None
        state: dict[str, Any] = {"count": 0, "first": 0.0, "last": 0.0, "payload": ""}

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            state["count"] = count = state["count"] + 1
            if delays is not None:
                now = time.time()
                delays.append(now - float(payload))
                if count == 1:
                    state["first"] = now
            elif count == 1:
                state["first"] = time.time()
            if count == n:
                state["last"] = time.time()
                state["payload"] = payload
                done.set()

        await conn.add_listener(channel, on_notify)
        win.ready()
        await done.wait()
        win.stop()
        finish(win.result(state["count"], state["first"], state["last"],
                          state["payload"], delays))

    asyncio.run(main())


# ---------------------------------------------------------------------------
# psycopg2
# ---------------------------------------------------------------------------


def run_psycopg2(dsn: str, channel: str, n: int, mode: str) -> None:
    """psycopg2: select, ``conn.poll()``, drain the ``conn.notifies`` list."""
    import psycopg2  # type: ignore[import-untyped]
    import psycopg2.extensions  # type: ignore[import-untyped]

    conn = psycopg2.connect(dsn)
    conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    with conn.cursor() as cur:
        cur.execute("LISTEN " + psycopg2.extensions.quote_ident(channel, conn))
    win = Window("psycopg2", mode)
    delays: list[float] | None = [] if mode == "steady" else None
    count = 0
    first = last = 0.0
    payload = ""
    win.ready()
    while count < n:
        select.select([conn], [], [])
        conn.poll()
        batch = conn.notifies
        if not batch:
            continue
        conn.notifies = []
        now = time.time()
        if not first:
            first = now
        for note in batch:
            count += 1
            if delays is not None:
                delays.append(now - float(note.payload))
            if count == n:
                last = time.time()
                payload = note.payload
    win.stop()
    finish(win.result(count, first, last, payload, delays))


RUNNERS: dict[str, Callable[[str, str, int, str], None]] = {
    "pglisten_fast": run_pglisten_fast,
    "psycopg3": run_psycopg3,
    "psycopg3_pgconn": run_psycopg3_pgconn,
    "asyncpg": run_asyncpg,
    "psycopg2": run_psycopg2,
}


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5) or argv[0] not in RUNNERS:
        sys.stderr.write(
            f"usage: peers.py {{{','.join(RUNNERS)}}} DSN CHANNEL N [MODE]\n"
        )
        return 2
    client, dsn, channel, n = argv[0], argv[1], argv[2], int(argv[3])
    mode = argv[4] if len(argv) == 5 else "burst"
    kind = mode.partition(":")[0]
    if kind not in ("burst", "steady") and client != "pglisten_fast":
        sys.stderr.write(f"mode {mode!r} exists only for pglisten_fast\n")
        return 2
    RUNNERS[client](dsn, channel, n, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
