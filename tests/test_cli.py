"""Tests of the ``pglisten-fast`` command line.

The commands run as subprocesses (``python -m pglisten_fast ...``) against
the session's PostgreSQL server; a few pure helpers are tested in-process.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl
from pglisten_fast import cli
from pglisten_fast.cli._common import parse_size
from pglisten_fast.cli._tally import Tally
from pglisten_fast.cli.listen import _json_line_maker
from pglisten_fast.testing import ClusterError, find_pg_bindir

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0


def _env(**extra: str) -> dict[str, str]:
    """The test environment without ``$PGLISTEN_FAST_DSN`` (plus ``extra``)."""
    env = {k: v for k, v in os.environ.items() if k != cli.DSN_ENV_VAR}
    env.update(extra)
    return env


def run_cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pglisten_fast", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        env=_env() if env is None else env,
        cwd=ROOT,
        check=False,
    )


class Spawned:
    """The CLI running in the background; stdout read line by line by a thread."""

    def __init__(
        self, *args: str, stdin: bool = False, keep_lines: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pglisten_fast", *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env() if env is None else env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._keep_lines = keep_lines
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        for n, line in enumerate(out, 1):
            self.lines.put(line)
            if self._keep_lines is not None and n >= self._keep_lines:
                out.close()  # like `| head -n N`: the reader goes away
                break
        self.lines.put(None)

    def next_line(self, timeout: float = TIMEOUT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout} s") from None
        if line is None:
            raise AssertionError(f"stdout ended; stderr: {self.stderr()}")
        return line

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self._reader.join(TIMEOUT)


@pytest.fixture
def spawn() -> Iterator[Any]:
    started: list[Spawned] = []

    def start(*args: str, **kwargs: Any) -> Spawned:
        s = Spawned(*args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture
def listener(dsn: str) -> Iterator[pgl.Listener]:
    with pgl.Listener(dsn) as lst:
        yield lst


def closed_port_dsn() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5"


def port_of(line: str) -> int:
    # "Embedded PostgreSQL ready on 127.0.0.1:PORT in 1.2 s."
    return int(line.split("127.0.0.1:", 1)[1].split(maxsplit=1)[0])


def port_refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def marker_of(sub: pgl.Subscription) -> None:
    n = sub.get(timeout=TIMEOUT)
    assert (n.connection_reset, n.reason) == (True, "listen")


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pglisten-fast: error: "), stderr
    return lines[0]


# -- listen and notify ---------------------------------------------------------


def test_listen_count_prints_what_notify_sends(dsn: str, spawn: Any) -> None:
    proc = spawn("listen", "cli_orders", "Cli Mixed", "--dsn", dsn, "--count", "3")
    markers = [json.loads(proc.next_line()) for _ in range(2)]
    assert sorted(m["channel"] for m in markers) == ["Cli Mixed", "cli_orders"]
    for m in markers:
        assert m == {"channel": m["channel"], "payload": "", "pid": 0,
                     "connection_reset": True, "reason": "listen", "dropped": 0}

    sent = run_cli("notify", "cli_orders", '{"id": 1, "name": "caf\u00e9"}',
                   "--dsn", dsn)
    assert (sent.returncode, sent.stdout, sent.stderr) == (0, "", "")
    sent = run_cli("notify", "Cli Mixed", "--dsn", dsn, input="a b\n\u65e5\u672c\n")
    assert sent.returncode == 0, sent.stderr
    assert "sent 2 notifications on 'Cli Mixed'" in sent.stderr

    got = [json.loads(proc.next_line()) for _ in range(3)]
    assert [(g["channel"], g["payload"]) for g in got] == [
        ("cli_orders", '{"id": 1, "name": "caf\u00e9"}'),
        ("Cli Mixed", "a b"),
        ("Cli Mixed", "\u65e5\u672c"),
    ]
    for g in got:
        assert g["pid"] > 0
        assert (g["connection_reset"], g["reason"], g["dropped"]) == (False, None, 0)
    assert proc.wait() == 0
    assert proc.stderr() == ""
    assert proc.lines.get(timeout=TIMEOUT) is None  # nothing after the 3rd


def test_listen_env_dsn_and_options(dsn: str, spawn: Any, conn: Any) -> None:
    proc = spawn("-v", "listen", "cli_env", "--count", "1", "--buffer-size", "64K",
                 "--overflow", "block", env=_env(PGLISTEN_FAST_DSN=dsn))
    assert json.loads(proc.next_line())["reason"] == "listen"
    pgl.notify(conn, "cli_env", "x")
    assert json.loads(proc.next_line())["payload"] == "x"
    assert proc.wait() == 0
    assert "INFO pglisten_fast.cli: listening on cli_env" in proc.stderr()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_listen_stops_cleanly_on_signal(dsn: str, spawn: Any, sig: int) -> None:
    proc = spawn("listen", "cli_signal", "--dsn", dsn)
    assert json.loads(proc.next_line())["reason"] == "listen"
    proc.proc.send_signal(sig)
    assert proc.wait() == 0
    assert "Traceback" not in proc.stderr()


def test_listen_ends_quietly_when_stdout_closes(
    dsn: str, spawn: Any, conn: Any
) -> None:
    proc = spawn("listen", "cli_pipe", "--dsn", dsn, keep_lines=1)
    assert json.loads(proc.next_line())["reason"] == "listen"
    assert proc.lines.get(timeout=TIMEOUT) is None  # we closed our end
    pgl.notify(conn, "cli_pipe", "into the void")
    assert proc.wait() == 0
    assert proc.stderr() == ""


def test_notify_stdin_in_batches(
    dsn: str, listener: pgl.Listener
) -> None:
    sub = listener.listen("cli_stdin", buffer_size=8 << 20)
    marker_of(sub)
    payloads = [f"line {i}" for i in range(25_000)]
    text = "\n".join(payloads) + "\nwindows\r\nno newline at the end"
    res = run_cli("notify", "cli_stdin", "--dsn", dsn, input=text)
    assert res.returncode == 0, res.stderr
    # 10,000 per round trip at most; fewer when stdin had nothing more ready.
    m = re.fullmatch(
        r"pglisten-fast: sent 25,002 notifications on 'cli_stdin' "
        r"in (\d+) round trips\n",
        res.stderr,
    )
    assert m is not None, res.stderr
    assert int(m.group(1)) >= 3
    got: list[str] = []
    while len(got) < 25_002:
        got += [n.payload for n in sub.get_batch(10_000, timeout=TIMEOUT)]
    assert got == [*payloads, "windows", "no newline at the end"]


def test_notify_stdin_repeated_payloads_are_reported(
    dsn: str, listener: pgl.Listener
) -> None:
    sub = listener.listen("cli_dups")
    marker_of(sub)
    res = run_cli("notify", "cli_dups", "--dsn", dsn, input="x\nx\ny\n")
    assert res.returncode == 0, res.stderr
    assert "sent 3 notifications" in res.stderr
    assert "1 repeated payloads within a batch reach listeners once" in res.stderr
    # PostgreSQL folds identical notifications of one transaction.
    assert [n.payload for n in sub.get_batch(10, timeout=TIMEOUT)] == ["x", "y"]
    assert sub.get_batch(10, timeout=0.2) == []


def test_notify_stdin_sends_without_waiting_for_a_full_batch(
    dsn: str, listener: pgl.Listener, spawn: Any
) -> None:
    sub = listener.listen("cli_stream")
    marker_of(sub)
    proc = spawn("notify", "cli_stream", "--dsn", dsn, stdin=True)
    stdin = proc.proc.stdin
    stdin.write("first\n")
    stdin.flush()
    assert sub.get(timeout=TIMEOUT).payload == "first"
    assert proc.proc.poll() is None  # still reading stdin
    stdin.write("second\n")
    stdin.close()
    assert sub.get(timeout=TIMEOUT).payload == "second"
    assert proc.wait() == 0
    assert "sent 2 notifications" in proc.stderr()


# -- demo ------------------------------------------------------------------------


def test_demo_with_dsn(dsn: str) -> None:
    res = run_cli("demo", "--dsn", dsn, "--count", "20000")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "OK: all received, in order" in out
    assert "20,000 in one transaction" in out
    assert "(from --dsn)" in out
    assert re.search(rf"read path\s+\S\s+{re.escape(pgl.__impl__)}\s", out)
    assert "\r" not in out  # not a terminal: no progress animation
    assert "receiving 20,000/20,000" in out
    for word in ("dropped", "markers", "COMMIT -> last receipt", "rate",
                 "payload size", "versions", f"pglisten_fast {pgl.__version__}",
                 f"psycopg {psycopg.__version__}"):
        assert word in out
    assert res.stderr == ""


def test_demo_on_a_terminal_animates_progress(dsn: str) -> None:
    leader, follower = pty.openpty()
    chunks = []
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "pglisten_fast", "demo", "--dsn", dsn,
             "--count", "20000"],
            stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE,
            env=_env(COLUMNS="100", PYTHONIOENCODING="utf-8"), cwd=ROOT,
        ) as proc:
            os.close(follower)
            follower = -1
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            assert proc.wait(TIMEOUT) == 0
            assert proc.stderr is not None
            assert proc.stderr.read() == b""
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    out = b"".join(chunks).decode("utf-8")
    assert "\rreceiving [" in out
    assert "\u2588" in out  # the bar, drawn with block characters
    assert "20,000/20,000 100.0%" in out
    assert "\u2502 OK: all received, in order" in out


def test_demo_env_dsn_and_payload_size(dsn: str) -> None:
    res = run_cli("demo", "--count", "1000", "--payload-size", "500",
                  env=_env(PGLISTEN_FAST_DSN=dsn))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(from $PGLISTEN_FAST_DSN)" in res.stdout
    assert "500 bytes" in res.stdout


def test_demo_reports_drops_where_they_happened(dsn: str) -> None:
    # A 64 KiB "drop" buffer and a burst of 200,000: the consumer almost
    # certainly falls behind.  Every gap must match its overflow marker.
    res = run_cli("demo", "--dsn", dsn, "--count", "200000", "--overflow", "drop",
                  "--buffer-size", "64K")
    out = res.stdout
    assert "order error" not in out
    assert "64 KiB / drop" in out
    if res.returncode == 0:  # kept up after all
        assert "OK: all received, in order" in out
        return
    assert res.returncode == cli.EXIT_FAILED, res.stderr
    m = re.search(r"FAILED: ([\d,]+) dropped \(buffer full\)\s", out)
    assert m is not None, out
    dropped = int(m.group(1).replace(",", ""))
    received = re.search(r"received\s+\S\s+([\d,]+)\s", out)
    assert received is not None
    assert int(received.group(1).replace(",", "")) + dropped == 200_000
    assert re.search(r"markers\s+\S\s+\d+ \(listen 1, overflow \d+\)", out)


def test_demo_payload_size_must_make_payloads_unique() -> None:
    res = run_cli("demo", "--count", "20000", "--payload-size", "4",
                  "--dsn", closed_port_dsn())
    assert res.returncode == cli.EXIT_USAGE
    assert "at least 5 bytes" in one_error_line(res.stderr)


def _need_server_binaries() -> None:
    try:
        find_pg_bindir()
    except ClusterError:
        pytest.skip("PostgreSQL server binaries not available")


def test_demo_embedded_server(pg_server: Any) -> None:
    _need_server_binaries()
    # Plain libpq variables do not count: the demo uses its own server.
    res = run_cli("demo", "--count", "5000",
                  env=_env(PGHOST="127.0.0.1", PGPORT="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "embedded throwaway PostgreSQL" in res.stdout
    assert "OK: all received, in order" in res.stdout
    ready = next(ln for ln in res.stdout.splitlines()
                 if ln.startswith("Embedded PostgreSQL ready"))
    assert port_refuses(port_of(ready))  # removed on exit


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_demo_interrupted_removes_embedded_server(
    pg_server: Any, spawn: Any, sig: int
) -> None:
    _need_server_binaries()
    proc = spawn("demo", "--count", "5000000")
    line = proc.next_line()
    while not line.startswith("Embedded PostgreSQL ready"):
        line = proc.next_line()
    proc.proc.send_signal(sig)
    assert proc.wait() == cli.EXIT_INTERRUPTED
    assert "Traceback" not in proc.stderr()
    assert port_refuses(port_of(line))


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["listen", "ch"],
    ["notify", "ch", "x"],
    ["demo", "--count", "10"],
])
def test_unreachable_server(args: list[str]) -> None:
    res = run_cli(*args, "--dsn", closed_port_dsn())
    assert res.returncode == cli.EXIT_CONNECT
    line = one_error_line(res.stderr)
    assert line.startswith("pglisten-fast: error: cannot connect to PostgreSQL: ")
    assert res.stdout == ""


@pytest.mark.parametrize("bad", ["nonsense", "postgresql://h/db?bogus=1"])
def test_invalid_dsn(bad: str) -> None:
    res = run_cli("listen", "ch", "--dsn", bad)
    assert res.returncode == cli.EXIT_CONNECT
    assert "invalid DSN" in one_error_line(res.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["listen", ""], "channel name must not be empty"),
    (["listen", "ok", "x" * 64], "64 bytes"),
    (["notify", "", "x"], "channel name must not be empty"),
    (["notify", "ch", "x" * 8000], "8000 bytes"),
])
def test_invalid_names_and_payloads(args: list[str], message: str) -> None:
    # Checked before connecting: the DSN points nowhere.
    res = run_cli(*args, "--dsn", closed_port_dsn())
    assert res.returncode == cli.EXIT_USAGE
    assert message in one_error_line(res.stderr)


def test_payload_too_long_on_stdin_names_the_line(
    dsn: str, listener: pgl.Listener
) -> None:
    sub = listener.listen("cli_long")
    marker_of(sub)
    res = run_cli("notify", "cli_long", "--dsn", dsn, "--batch-size", "2",
                  input="a\nb\nc\n" + "x" * 8000 + "\n")
    assert res.returncode == cli.EXIT_USAGE
    line = one_error_line(res.stderr)
    assert "stdin line 4" in line
    m = re.search(r"\((\d) notifications were sent before it\)", line)
    assert m is not None, line
    sent = int(m.group(1))
    # Batches of 2, or fewer when the pipe momentarily had nothing more.
    assert sent in (2, 3)
    got: list[str] = []
    while len(got) < sent:
        got += [n.payload for n in sub.get_batch(10, timeout=TIMEOUT)]
    assert got == ["a", "b", "c"][:sent]


@pytest.mark.parametrize("args", [
    [],
    ["listen"],
    ["listen", "ch", "--count", "0"],
    ["listen", "ch", "--buffer-size", "12Q"],
    ["listen", "ch", "--overflow", "sometimes"],
    ["frobnicate"],
    ["notify", "ch", "x", "--no-such-option"],
])
def test_usage_errors(args: list[str]) -> None:
    res = run_cli(*args)
    assert res.returncode == cli.EXIT_USAGE
    assert "usage: pglisten-fast" in res.stderr
    assert "Traceback" not in res.stderr


# -- help, version ------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["listen"], ["notify"], ["demo"]])
def test_help(command: list[str]) -> None:
    res = run_cli(*command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: pglisten-fast {' '.join(command)}".rstrip())
    assert "examples:" in res.stdout
    assert "exit status:" in res.stdout
    assert "64" in res.stdout


def test_version() -> None:
    res = run_cli("--version")
    assert res.returncode == 0
    assert res.stdout.startswith(f"pglisten-fast {pgl.__version__} ")
    assert f"read path: {pgl.__impl__}" in res.stdout


def test_console_script_entry_point() -> None:
    script = Path(sys.executable).with_name("pglisten-fast")
    if not script.exists():
        pytest.skip("console script not installed next to this Python")
    res = subprocess.run([str(script), "--version"], capture_output=True,
                         text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0
    assert res.stdout.startswith("pglisten-fast ")


def test_peer_comparison_is_pointed_to_not_run() -> None:
    # The benchmarks ship with the source repository, not with the package.
    res = run_cli("--help")
    assert "python benchmarks/compare.py" in res.stdout
    res = run_cli("bench", "--quick")
    assert res.returncode == cli.EXIT_USAGE
    assert "usage: pglisten-fast" in res.stderr
    assert "'bench'" in res.stderr


# -- helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    "", "plain", 'quo"te\\', "line\nbreak\ttab", "caf\u00e9 \u65e5\u672c \U0001f600",
    "\udcff lone surrogate", "\x01\x1f control",
])
def test_json_lines_are_valid_ascii_json(payload: str) -> None:
    line = _json_line_maker()
    for n in (pgl.Notification("ch \"x\"", payload, 42),
              pgl.Notification("c", "", 0, True, reason="overflow", dropped=7)):
        text = line(n)
        assert text.endswith("\n")
        assert text.count("\n") == 1
        assert text.isascii()
        assert json.loads(text) == {
            "channel": n.channel, "payload": n.payload, "pid": n.pid,
            "connection_reset": n.connection_reset, "reason": n.reason,
            "dropped": n.dropped,
        }
        assert list(json.loads(text)) == ["channel", "payload", "pid",
                                          "connection_reset", "reason", "dropped"]


@pytest.mark.parametrize(("text", "size"), [
    ("65536", 65536), ("64K", 65536), ("64k", 65536), ("16M", 16 << 20),
    ("16MiB", 16 << 20), ("1G", 1 << 30),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_tally_accounts_for_gaps_with_overflow_markers() -> None:
    def n(payload: str) -> pgl.Notification:
        return pgl.Notification("ch", payload, 7)

    tally = Tally(6)
    tally.add([pgl.Notification("ch", "", 0, True, reason="listen"), n("0"), n("1")])
    assert (tally.received, tally.complete) == (2, False)
    tally.add([pgl.Notification("ch", "", 0, True, reason="overflow", dropped=2),
               n("4"), n("5")])
    assert (tally.received, tally.dropped, tally.complete) == (4, 2, True)
    assert tally.markers == {"listen": 1, "overflow": 1}
    assert tally.order_errors == []
    tally.add([n("3"), n("6"), n("x")])
    assert tally.order_errors == ["got #3 where #6 was due"]
    assert (tally.extra, tally.bad_payloads) == (1, 1)
