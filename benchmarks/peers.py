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

CPU and wake-ups count every thread of the process: ``cpu_s`` is the sum
over ``/proc/self/task/*/schedstat`` (first field: on-CPU nanoseconds) at
the end of the window minus the same sum at its start (``cpu_rusage_s``,
from ``getrusage(RUSAGE_SELF)``, is the cross-check: it is process-wide
too); ``wakeups`` is the sum of ``voluntary_ctxt_switches`` over
``/proc/self/task/*/status`` (a thread that blocked and had to be woken),
``involuntary`` the preempted ones.  ``nthreads`` is the number of threads
at the end and ``threads_gone`` the number that existed at the start and
ended inside the window (their schedstat share would be missing).

Every client runs one Python-level loop iteration per notification (a real
consumer does at least that much): it counts, and in ``steady`` mode parses
the payload.

Modes (all clients):

``burst``   count N notifications.
``steady``  each payload is the sender's ``time.time()`` just before its
            ``pg_notify`` (``%032.6f``: 32 bytes, zero-padded); report
            percentiles of receipt - send (``delay_median_us``,
            ``delay_p90_us``, ``delay_p99_us``, ``delay_p999_us``,
            ``delay_max_us``).  A negative timestamp is the sender's end
            marker (used when the number sent is not known in advance, the
            sweep's "max" step): the client stops there, not counting it.

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


def thread_ctx_switches(tid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of thread ``tid``."""
    vol = invol = 0
    try:
        with open(f"/proc/self/task/{tid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("voluntary_ctxt_switches:"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol = int(line.split()[1])
    except OSError:
        pass
    return vol, invol


def thread_cpu_precise(ident: int) -> float:
    """CPU seconds of the thread with Python ``ident`` (nanosecond clock)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, AttributeError):
        return 0.0


def task_totals() -> tuple[int, int, int, frozenset[str]]:
    """Every thread of this process: (on-CPU ns, voluntary, involuntary, tids).

    On-CPU time is the first field of ``/proc/self/task/<tid>/schedstat``
    (nanoseconds, exact); the context switches come from each thread's
    ``status``.  A thread that ends between two listings is skipped.
    Returns ``(-1, -1, -1, frozenset())`` where ``/proc`` has no tasks.
    """
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return -1, -1, -1, frozenset()
    cpu_ns = vol = invol = 0
    seen = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as fh:
                ns = int(fh.read().split()[0])
            v = i = 0
            with open(f"/proc/self/task/{tid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"voluntary_ctxt_switches:"):
                        v = int(line.split()[1])
                    elif line.startswith(b"nonvoluntary_ctxt_switches:"):
                        i = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
        cpu_ns += ns
        vol += v
        invol += i
        seen.append(tid)
    return cpu_ns, vol, invol, frozenset(seen)


def percentile(sorted_values: list[float], q: float) -> float:
    """The value at rank ``int((n - 1) * q)`` (the C client uses the same rule)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[int((len(sorted_values) - 1) * q)]


#: Percentiles of receipt - send reported in ``steady`` mode (key suffix, q).
DELAY_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))


def delay_stats(delays: list[float]) -> dict[str, float]:
    """``delay_<name>_us`` for :data:`DELAY_PERCENTILES` (sorts ``delays``)."""
    delays.sort()
    return {f"delay_{name}_us": percentile(delays, q) * 1e6
            for name, q in DELAY_PERCENTILES}


class Window:
    """CPU accounting from ``ready`` to the last receipt, and the JSON result."""

    def __init__(self, client: str, mode: str) -> None:
        self.client = client
        self.mode = mode
        self._start = self._end = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, int, tuple[int, int, int, frozenset[str]]]:
        user, sys_ = cpu_times()
        return user, sys_, ctx_switches(), task_totals()

    def ready(self) -> None:
        """Start the CPU window and tell the driver LISTEN is in effect."""
        self._start = self._sample()
        emit("ready")

    def stop(self) -> None:
        """End the CPU window (call right after the last receipt)."""
        self._end = self._sample()

    def accounting(self) -> dict[str, Any]:
        u0, s0, cs0, (ns0, v0, i0, tids0) = self._start
        u1, s1, cs1, (ns1, v1, i1, tids1) = self._end
        rusage = (u1 - u0) + (s1 - s0)
        out: dict[str, Any] = {
            "cpu_s": (ns1 - ns0) / 1e9 if ns0 >= 0 else rusage,
            "cpu_source": "schedstat" if ns0 >= 0 else "rusage",
            "cpu_rusage_s": rusage,
            "cpu_user_s": u1 - u0,
            "cpu_sys_s": s1 - s0,
            "ctx_switches": cs1 - cs0,
        }
        if ns0 >= 0:
            out.update(wakeups=v1 - v0, involuntary=i1 - i0, nthreads=len(tids1),
                       threads_gone=len(tids0 - tids1))
        return out

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
            **self.accounting(),
            "maxrss_kb": maxrss_kb(),
            "last_payload": last_payload[:64],
            "python": sys.version.split()[0],
        }
        if delays is not None:
            out.update(delay_stats(delays))
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


#: Name of the listener's selector thread (``threading.Thread.name``).
SELECTOR_NAME = "pglisten-fast-selector"


def _pglf_selector(listener: Any) -> threading.Thread | None:
    """The selector thread of ``listener`` (diagnostics only).

    Found by its thread name; private attributes of the listener are the
    fallback (their names changed between versions).
    """
    named = [t for t in threading.enumerate() if t.name == SELECTOR_NAME]
    if len(named) == 1:
        return named[0]
    for path in (("_life", "thread"), ("_thread",)):
        obj: Any = listener
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, threading.Thread):
            return obj
    return None


def _pglf_threads(listener: Any) -> dict[str, tuple[int, int]]:
    """Native and Python ids of the selector and the consumer (main) thread.

    Also names the two threads ``pglf-selector`` and ``pglf-consumer`` at the
    OS level (``/proc/self/task/<tid>/comm``) so that ``perf`` and ``top -H``
    can tell them apart.
    """
    sel = _pglf_selector(listener)
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


Snapshot = dict[str, tuple[float, float, float, tuple[int, int]]]


def _thread_snapshot(ids: dict[str, tuple[int, int]]) -> Snapshot:
    """Per thread: (user s, sys s, precise CPU s, (voluntary, involuntary))."""
    return {
        name: (*thread_times(tid), thread_cpu_precise(ident),
               thread_ctx_switches(tid))
        for name, (tid, ident) in ids.items()
    }


def _thread_report(before: Snapshot, after: Snapshot) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, (u0, s0, c0, (v0, i0)) in before.items():
        u1, s1, c1, (v1, i1) = after[name]
        out[name] = {"user_s": u1 - u0, "sys_s": s1 - s0, "cpu_s": c1 - c0,
                     "ctx_switches": (v1 + i1) - (v0 + i0), "wakeups": v1 - v0}
    return out


#: Environment variables that set the pglisten_fast client's options
#: (``compare.py --pglf-overflow/--pglf-buffer-size/--pglf-batch-window``
#: set them; an empty batch window means the library's default).
OVERFLOW_ENV = "PGLF_BENCH_OVERFLOW"
BUFFER_ENV = "PGLF_BENCH_BUFFER_SIZE"
BATCH_WINDOW_ENV = "PGLF_BENCH_BATCH_WINDOW"
#: ``max_items`` of the client's ``get_batch`` calls (default 4,096: larger
#: batches make CPython return allocator arenas to the OS between batches).
MAX_ITEMS_ENV = "PGLF_BENCH_MAX_ITEMS"
DEFAULT_MAX_ITEMS = 4096
#: Default policy of the benchmark client: "block" is lossless like every
#: other client (which all push back through TCP); with the library's own
#: default ("drop", 16 MiB) a 1M burst can overflow a consumer that is
#: descheduled for a moment, and a run that lost data is not comparable.
DEFAULT_OVERFLOW = "block"


def pglf_read_path() -> dict[str, Any]:
    """Which read path pglisten_fast chose here, and the psycopg it runs on."""
    import psycopg
    from psycopg import pq

    import pglisten_fast as pgl

    try:
        from pglisten_fast._readpath import REASON as reason
    except ImportError:  # diagnostics only: a private name
        reason = None
    lib = pq.version()
    return {"impl": pgl.__impl__, "impl_reason": reason,
            "psycopg": psycopg.__version__, "psycopg_impl": pq.__impl__,
            "libpq": f"{lib // 10000}.{lib % 10000}",
            "executable": sys.executable}


def run_pglisten_fast(dsn: str, channel: str, n: int, mode: str) -> None:
    import pglisten_fast as pgl

    kind, _, arg = mode.partition(":")
    win = Window("pglisten_fast", mode)
    overflow = os.environ.get(OVERFLOW_ENV) or DEFAULT_OVERFLOW
    buffer_size = int(os.environ.get(BUFFER_ENV) or 16 * 2**20)
    window = os.environ.get(BATCH_WINDOW_ENV)
    options: dict[str, Any] = {} if not window else {"batch_window": float(window)}
    listener = pgl.Listener(dsn, overflow=overflow,  # type: ignore[arg-type]
                            buffer_size=buffer_size, **options).start()
    max_items = int(os.environ.get(MAX_ITEMS_ENV) or DEFAULT_MAX_ITEMS)
    extra: dict[str, Any] = {"overflow": overflow, "buffer_size": buffer_size,
                             **options,
                             "max_items": max_items, **pglf_read_path()}

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
                payload = item.payload
                if delays is not None:
                    sent = float(payload)
                    if sent < 0:  # the sender's end marker
                        want = count + dropped
                        break
                    delays.append(now - sent)
                count += 1
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
        if delays is not None:
            now = time.time()
            sent = float(note.payload)
            if sent < 0:  # the sender's end marker
                break
            delays.append(now - sent)
            count += 1
            if count == 1:
                first = now
            last = now
        else:
            count += 1
            if count == 1:
                first = time.time()
        payload = note.payload
        if count >= n:
            last = time.time()
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
            if delays is not None:
                sent = float(note.extra)
                if sent < 0:  # the sender's end marker
                    n = count
                    break
                delays.append(now - sent)
                last = now
            count += 1
            payload = note.extra
            if count == 1:
                first = now or time.time()
            if count == n:
                last = time.time()
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
            if delays is not None:
                now = time.time()
                sent = float(payload)
                if sent < 0:  # the sender's end marker
                    done.set()
                    return
                delays.append(now - sent)
                state["last"] = now
                state["count"] = count = state["count"] + 1
                if count == 1:
                    state["first"] = now
            else:
                state["count"] = count = state["count"] + 1
                if count == 1:
                    state["first"] = time.time()
            state["payload"] = payload
            if count == n:
                state["last"] = time.time()
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
            if delays is not None:
                sent = float(note.payload)
                if sent < 0:  # the sender's end marker
                    n = count
                    break
                delays.append(now - sent)
                last = now
            count += 1
            payload = note.payload
            if count == n:
                last = time.time()
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
