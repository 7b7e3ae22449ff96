"""The sending side of ``compare.py``: bursts, the paced pipelined sender,
and the machine-wide CPU counters (``/proc/stat``).

The driver owns three connections to the server: ``tx`` (bursts, one
transaction), ``admin`` (autocommit: waits for client backends, versions)
and ``stream_conn`` (autocommit, libpq pipeline mode: the steady streams).
"""

from __future__ import annotations

import contextlib
import math
import select
import time
from collections import deque
from pathlib import Path
from typing import Any

import psycopg
from bench_clients import CHANNEL, CLIENT_APP, ClientError, ClientProc
from psycopg import pq

BURST_SQL = (
    "SELECT count(pg_notify(%s, lpad(i::text, %s, '0'))) "
    "FROM generate_series(1, %s) AS i"
)

#: The prepared statement of the stream sender (parsed once per session).
STREAM_STMT = b"pglf_bench_notify"
STREAM_SQL = b"SELECT pg_notify($1, $2)"
#: Payload of a stream notification: the send time, 32 bytes, zero-padded.
#: Every client parses it with ``float``/``strtod``.
PAYLOAD_FMT = b"%032.6f"
#: Payload of the end marker of an open-ended (``max``) stream.
END_MARKER = PAYLOAD_FMT % -1.0
#: At most this many statements are queued in one go before the sender
#: reads acknowledgements again.
SEND_BATCH = 256


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[int((len(sorted_values) - 1) * q)]


class CSender:
    """The stream sender in C (``c_sender.c``): one process, one connection.

    Same streams and result keys as :meth:`Driver.stream` (its docstring
    describes both); commands go to the program's stdin, one JSON line
    comes back per stream.
    """

    def __init__(self, binary: Path, dsn: str, channel: str) -> None:
        self.channel = channel
        conninfo = f"{dsn} application_name=pglf_bench_steady"
        self.proc = ClientProc([str(binary), conninfo, channel], stdin=True)
        try:
            self.backend_pid = int(self.proc.wait_line("ready", 60).split()[1])
        except (ClientError, IndexError, ValueError):
            self.proc.kill()
            self.proc.close()
            raise

    def stream(self, rate: float, *, n: int | None, seconds: float | None,
               inflight: int) -> dict[str, Any]:
        self.proc.send(f"{max(rate, 0.0)!r} {n or 0} {seconds or 0.0!r} {inflight}")
        budget = (n / rate if n and rate > 0 else seconds or 0.0) * 10 + 60
        try:
            return self.proc.result(budget)
        except ClientError as e:
            raise RuntimeError(f"c_sender: {e}") from e

    def close(self) -> None:
        self.proc.close()


class Driver:
    """Sends notifications and watches for client backends.

    Streams go through the C sender when ``c_sender`` (its binary) is given
    and it starts, else through the Python sender (:meth:`stream`);
    ``sender`` says which.
    """

    def __init__(self, dsn: str, c_sender: Path | None = None) -> None:
        self.dsn = dsn
        self.tx = psycopg.connect(dsn, application_name="pglf_bench_driver")
        self.admin = psycopg.connect(dsn, autocommit=True,
                                     application_name="pglf_bench_admin")
        self.stream_conn = psycopg.connect(dsn, autocommit=True,
                                           application_name="pglf_bench_steady")
        self.stream_backend_pid = self.stream_conn.info.backend_pid
        res = self.stream_conn.pgconn.prepare(STREAM_STMT, STREAM_SQL)
        if res.status != pq.ExecStatus.COMMAND_OK:
            msg = (res.error_message or b"").decode("utf-8", "replace")
            raise RuntimeError(f"cannot prepare the stream statement: {msg}")
        self.csender: CSender | None = None
        self.sender = "python (psycopg pipeline)"
        if c_sender is not None:
            try:
                self.csender = CSender(c_sender, dsn, CHANNEL)
            except ClientError as e:
                self.sender = f"python (psycopg pipeline; C sender failed: {e})"
            else:
                self.sender = "c (libpq pipeline, c_sender.c)"
                self.stream_backend_pid = self.csender.backend_pid

    #: compatibility name (``profile_client.py``)
    @property
    def steady_conn(self) -> psycopg.Connection[Any]:
        return self.stream_conn

    def close(self) -> None:
        if self.csender is not None:
            self.csender.close()
        for c in (self.tx, self.admin, self.stream_conn):
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

    def steady(self, channel: str, rate: float, n: int) -> dict[str, Any]:
        """``n`` notifications at ``rate`` per second (see :meth:`stream`)."""
        return self.stream(channel, rate, n=n)

    def stream(self, channel: str, rate: float, *, n: int | None = None,
               seconds: float | None = None, inflight: int = 32) -> dict[str, Any]:
        """One notification per transaction, paced, through a libpq pipeline.

        Every notification is ``EXECUTE pglf_bench_notify(channel, payload)``
        followed by a Sync, so each is its own implicit (autocommit)
        transaction, and the sender never waits for a round trip: it reads
        the server's answers whenever it has nothing due.  The payload is
        ``time.time()`` taken just before the statement is queued
        (:data:`PAYLOAD_FMT`, 32 bytes).

        ``rate > 0``: paced.  Statement ``i`` is due at ``t0 + i / rate``
        (``perf_counter``); the sender sleeps until the next one is due and
        then queues every statement whose time has come (after a late
        wake-up, several at once, each with its own timestamp), so the
        average rate holds whatever the sleep granularity.  ``n``
        statements, or ``seconds`` worth.

        ``rate <= 0``: as fast as the server answers, with at most
        ``inflight`` statements unanswered, for ``seconds``; then an end
        marker (:data:`END_MARKER`) tells the client to stop, since it
        cannot know the count in advance.

        Returns the achieved rate (``send_rate`` = (sent - 1) / (last send -
        first send)), the server's answer time percentiles (``ack_*_us``:
        send -> that statement's Sync, as read here), how late the paced
        sender was against its schedule (``lag_*_us``, per wake-up), and the
        sender's own CPU time.
        """
        if n is None and seconds is None:
            raise ValueError("stream() needs n or seconds")
        paced = rate > 0
        if not paced and seconds is None:
            raise ValueError("an unpaced stream needs seconds")
        if self.csender is not None and channel == self.csender.channel:
            return self.csender.stream(rate, n=n, seconds=seconds, inflight=inflight)
        if n is None:
            assert seconds is not None
            n = max(1, int(rate * seconds)) if paced else 1 << 62
        pg = self.stream_conn.pgconn
        pg.nonblocking = 1
        pg.enter_pipeline_mode()
        chan = channel.encode()
        sock = pg.socket
        sent = synced = 0
        send_times: deque[float] = deque()
        acks: list[float] = []
        lags: list[float] = []
        batches = 0

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

        def wait_io(timeout: float) -> None:
            select.select([sock], [sock] if pg.flush() else [], [], timeout)

        interval = 1.0 / rate if paced else 0.0
        cpu0 = time.thread_time()
        t0 = time.perf_counter() + 0.005
        deadline = t0 + seconds if seconds is not None else float("inf")
        t_first = t_last = 0.0
        try:
            while sent < n:
                now = time.perf_counter()
                if paced:
                    k = min(n, math.floor((now - t0) * rate) + 1) - sent
                    if k <= 0:
                        drain()
                        left = t0 + sent * interval - time.perf_counter()
                        if left > 0:
                            time.sleep(left)
                        continue
                    lags.append(now - (t0 + sent * interval))
                else:
                    if now >= deadline:
                        break
                    k = inflight - (sent - synced)
                    if k <= 0:
                        drain()
                        if inflight - (sent - synced) <= 0:
                            wait_io(0.5)
                        continue
                k = min(k, SEND_BATCH)
                for _ in range(k):
                    ts = time.time()
                    pg.send_query_prepared(STREAM_STMT, [chan, PAYLOAD_FMT % ts])
                    pg.pipeline_sync()
                    send_times.append(ts)
                if not sent:
                    t_first = send_times[0]
                t_last = send_times[-1]
                sent += k
                batches += 1
                drain()
            count = sent
            if not paced:
                pg.send_query_prepared(STREAM_STMT, [chan, END_MARKER])
                pg.pipeline_sync()
                send_times.append(time.time())
                sent += 1
            while synced < sent:
                drain()
                if synced < sent:
                    wait_io(1.0)
        finally:
            with contextlib.suppress(Exception):
                while pg.flush():
                    time.sleep(0.001)
                pg.exit_pipeline_mode()
            pg.nonblocking = 0
        cpu = time.thread_time() - cpu0
        acks.sort()
        lags.sort()
        return {
            "sender": "python",
            "target_rate": rate if paced else 0.0,
            "sent": count,
            "t_first": t_first,
            "t_last": t_last,
            "send_rate": (count - 1) / (t_last - t_first) if count > 1 else 0.0,
            "batches": batches,
            "sender_cpu_s": cpu,
            # send -> the server's answer to that statement: when this grows
            # far beyond 1/rate, the server (not the client) is behind and
            # every delay includes its backlog.
            "ack_median_us": _pct(acks, 0.5) * 1e6,
            "ack_p99_us": _pct(acks, 0.99) * 1e6,
            "lag_median_us": _pct(lags, 0.5) * 1e6,
            "lag_p99_us": _pct(lags, 0.99) * 1e6,
            "lag_max_us": _pct(lags, 1.0) * 1e6,
        }

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

    def client_backend_pids(self) -> list[int]:
        """Process ids of the server backends of the running client."""
        rows = self.admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (CLIENT_APP,),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def server_cpu(self, client_pids: list[int]) -> dict[str, int | None]:
        """On-CPU ns so far of the stream sender's backend and of the client's
        backend(s) (None when not readable: a remote server, or gone)."""
        listener: int | None = None
        for pid in client_pids:
            ns = backend_cpu_ns(pid)
            if ns is not None:
                listener = (listener or 0) + ns
            else:
                listener = None
                break
        return {"sender": backend_cpu_ns(self.stream_backend_pid),
                "listener": listener}

    def server_version(self) -> str:
        row = self.admin.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def queue_usage(self) -> float:
        row = self.admin.execute("SELECT pg_notification_queue_usage()").fetchone()
        return float(row[0]) if row else 0.0


# ---------------------------------------------------------------------------
# machine-wide CPU
# ---------------------------------------------------------------------------


def cpu_stat() -> tuple[int, int] | None:
    """(idle + iowait, total) jiffies of all CPUs from ``/proc/stat``.

    Total is user + nice + system + idle + iowait + irq + softirq + steal
    (guest time is already counted in user).
    """
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    vals = [int(v) for v in fields[1:9]]
    return vals[3] + vals[4], sum(vals)


def idle_share(before: tuple[int, int] | None,
               after: tuple[int, int] | None) -> float:
    """Share of the machine's CPU time that was idle between two samples."""
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])



def backend_cpu_ns(pid: int) -> int | None:
    """On-CPU ns of a local PostgreSQL backend (``/proc/<pid>/schedstat``).

    None when the process is gone, unreadable, or not a postgres process here
    (a server on another machine or in another pid namespace).
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"postgres" not in fh.read():
                return None
        with open(f"/proc/{pid}/schedstat", "rb") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
