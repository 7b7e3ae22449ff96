"""Client processes of ``compare.py``: which clients exist, how each is started.

Every client is its own process speaking the protocol of ``peers.py``
(``ready``, then one JSON line).  The C loop is compiled here from
``c_listener.c``; ``pglisten_fast_binary`` is the ``pglisten_fast`` client of
``peers.py`` run by another interpreter, one whose psycopg is
``psycopg[binary]`` (given with ``--binary-python``, or a virtualenv made
under ``benchmarks/results/.venv-binary``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
PEERS = HERE / "peers.py"
C_SOURCE = HERE / "c_listener.c"
C_SENDER_SOURCE = HERE / "c_sender.c"

sys.path.insert(0, str(HERE))
from peers import CLIENT_MODULES  # noqa: E402

#: application_name of every client connection (to wait for their backends).
CLIENT_APP = "pglf_bench_client"
CHANNEL = "bench"

ALL_CLIENTS: tuple[str, ...] = (
    "c",
    "pglisten_fast",
    "pglisten_fast_binary",
    "psycopg3",
    "psycopg3_pgconn",
    "asyncpg",
    "psycopg2",
)

#: The peers.py client each compare.py client runs (flavours share one).
PEER_OF: dict[str, str] = {
    "pglisten_fast": "pglisten_fast",
    "pglisten_fast_binary": "pglisten_fast",
    "psycopg3": "psycopg3",
    "psycopg3_pgconn": "psycopg3_pgconn",
    "asyncpg": "asyncpg",
    "psycopg2": "psycopg2",
}

#: Clients that are pglisten_fast (its own scenarios, thread split, read path).
PGLF_CLIENTS = ("pglisten_fast", "pglisten_fast_binary")


class ClientError(Exception):
    """A client process failed, timed out or returned a bad result."""


# ---------------------------------------------------------------------------
# one client process
# ---------------------------------------------------------------------------


class ClientProc:
    """One client subprocess; its stdout lines are read by a helper thread."""

    def __init__(self, argv: Sequence[str], *, stdin: bool = False) -> None:
        self.argv = list(argv)
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
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

    def send(self, line: str) -> None:
        """Write one line to the process's stdin (``stdin=True``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
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


# ---------------------------------------------------------------------------
# the C loop
# ---------------------------------------------------------------------------


def build_c_listener(build_dir: Path) -> tuple[Path | None, str]:
    """Compile ``c_listener.c``; returns (binary, note)."""
    return build_c(build_dir, C_SOURCE)


def build_c_sender(build_dir: Path) -> tuple[Path | None, str]:
    """Compile ``c_sender.c`` (the stream sender); returns (binary, note)."""
    return build_c(build_dir, C_SENDER_SOURCE)


def build_c(build_dir: Path, source: Path) -> tuple[Path | None, str]:
    """Compile one of the C programs against the system libpq."""
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
    out = build_dir / source.stem
    cmd = [gcc, "-O2", "-Wall", "-o", str(out), str(source), f"-I{inc}",
           f"-L{libdir}", "-lpq", "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None, f"build failed: {proc.stderr.strip()[:500]}"
    return out, " ".join(cmd)


# ---------------------------------------------------------------------------
# pglisten_fast under psycopg[binary]
# ---------------------------------------------------------------------------

#: What the binary flavour's interpreter must be able to tell us.
_PROBE = (
    "import json, sys, psycopg\n"
    "from psycopg import pq\n"
    "import pglisten_fast\n"
    "print(json.dumps({'python': sys.version.split()[0], 'psycopg': "
    "psycopg.__version__, 'psycopg_impl': pq.__impl__, 'pglisten_fast': "
    "pglisten_fast.__version__, 'impl': pglisten_fast.__impl__}))\n"
)

#: Files the package is built from (copied to build the binary flavour).
_SOURCE_ITEMS = ("src", "csrc", "scripts", "setup.py", "pyproject.toml",
                 "README.md", "MANIFEST.in")


def probe_python(python: Path) -> tuple[dict[str, Any] | None, str]:
    """Run :data:`_PROBE` with ``python``: (facts, "") or (None, why not)."""
    try:
        proc = subprocess.run([str(python), "-c", _PROBE], capture_output=True,
                              text=True, timeout=60, check=False,
                              cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot run {python}: {e}"
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return None, f"{python}: {tail[0]}"
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, f"{python}: unexpected output {proc.stdout[:200]!r}"


def source_digest() -> str:
    """Hash of the files the package is built from (to notice a stale copy)."""
    h = hashlib.sha256()
    for item in _SOURCE_ITEMS:
        path = ROOT / item
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() \
            else [path] if path.exists() else []
        for f in files:
            if "__pycache__" in f.parts or f.suffix in (".so", ".o", ".pyc") \
                    or f.name == "_pglf.c" or ".egg-info" in str(f):
                continue
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _pip(python: Path, *args: str, log: list[str]) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
           *args]
    log.append(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          check=False)
    if proc.returncode != 0:
        err = [ln for ln in proc.stderr.strip().splitlines()
               if not ln.startswith("WARNING")]
        raise ClientError(f"{' '.join(args)} failed: {' | '.join(err[-3:])[:400]}")


def ensure_binary_python(venv: Path, say: Any = print) -> tuple[Path | None, str]:
    """A Python with psycopg[binary] and this repository's pglisten_fast.

    Creates (or refreshes) the virtualenv ``venv``: ``python -m venv``,
    ``pip install 'psycopg[binary]' cffi setuptools wheel``, then
    ``pip install --no-deps --no-build-isolation`` of a copy of the
    package's sources, rebuilt when they changed since the last time
    (a digest is kept in the venv).  Returns (python, note) or (None, why).
    """
    python = venv / "bin" / "python"
    stamp = venv / "pglf-source.sha256"
    digest = source_digest()
    log: list[str] = []
    try:
        if not python.exists():
            say(f"binary flavour: creating {venv}")
            proc = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ClientError(
                    f"python -m venv failed: {proc.stderr.strip()[:300]}")
        has_deps = subprocess.run(
            [str(python), "-c", "import psycopg_binary, cffi, setuptools, wheel"],
            capture_output=True, check=False).returncode == 0
        if not has_deps:
            say("binary flavour: pip install 'psycopg[binary]' cffi")
            _pip(python, "psycopg[binary]", "cffi", "setuptools>=64", "wheel", log=log)
        current = stamp.read_text().strip() if stamp.exists() else ""
        if current != digest:
            say("binary flavour: building pglisten_fast from the working tree")
            with tempfile.TemporaryDirectory(prefix="pglf-binary-src-") as tmp:
                skip = shutil.ignore_patterns("__pycache__", "*.so", "*.o",
                                              "*.egg-info", "_pglf.c")
                for item in _SOURCE_ITEMS:
                    src = ROOT / item
                    if src.is_dir():
                        shutil.copytree(src, Path(tmp) / item, ignore=skip)
                    elif src.exists():
                        shutil.copy2(src, Path(tmp) / item)
                _pip(python, "--no-deps", "--no-build-isolation", "--force-reinstall",
                     tmp, log=log)
            stamp.write_text(digest + "\n")
    except (ClientError, OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not prepare {venv}: {e}"
    facts, why = probe_python(python)
    if facts is None:
        return None, why
    if facts["psycopg_impl"] != "binary":
        return None, f"{python}: psycopg implementation is {facts['psycopg_impl']!r}"
    return python, f"{python} (made here)"


@dataclass
class Flavours:
    """Interpreters of the Python clients."""

    #: Python of ``pglisten_fast_binary`` (None: not available, see ``note``).
    binary_python: Path | None = None
    binary_note: str = "not requested"


def resolve_binary_python(requested: str | None, venv: Path,
                          say: Any = print) -> Flavours:
    """``--binary-python`` checked, or a virtualenv made under ``venv``."""
    if requested:
        python = Path(requested)
        facts, why = probe_python(python)
        if facts is None:
            return Flavours(None, why)
        if facts["psycopg_impl"] != "binary":
            return Flavours(None, f"{python}: psycopg implementation is "
                                  f"{facts['psycopg_impl']!r}, not 'binary'")
        return Flavours(python, f"{python} (--binary-python)")
    python, note = ensure_binary_python(venv, say)
    return Flavours(python, note)


def client_argv(client: str, dsn: str, n: int, mode: str, *,
                c_binary: Path | None, flavours: Flavours) -> list[str]:
    """The command line of one client run."""
    if client == "c":
        assert c_binary is not None
        return [str(c_binary), dsn, CHANNEL, str(n), mode]
    python = sys.executable
    if client == "pglisten_fast_binary":
        if flavours.binary_python is None:
            raise ClientError(f"pglisten_fast_binary: no psycopg[binary] Python "
                              f"({flavours.binary_note})")
        python = str(flavours.binary_python)
    return [python, str(PEERS), PEER_OF[client], dsn, CHANNEL, str(n), mode]


def available_clients(requested: Sequence[str], c_binary: Path | None,
                      c_note: str, flavours: Flavours) -> dict[str, str]:
    """Clients that cannot run here, with the reason."""
    out: dict[str, str] = {}
    for client in requested:
        if client == "c":
            if c_binary is None:
                out[client] = c_note
        elif client == "pglisten_fast_binary":
            if flavours.binary_python is None:
                out[client] = flavours.binary_note
        elif importlib.util.find_spec(CLIENT_MODULES[PEER_OF[client]]) is None:
            out[client] = f"module {CLIENT_MODULES[PEER_OF[client]]} not importable"
    return out
