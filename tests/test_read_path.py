"""The choice of read path: ``PGLISTEN_FAST_IMPL``, ``__impl__`` and the
run-time binding of the C read loop to psycopg's libpq.

A child interpreter forced to the Python read path receives in order, a
bogus value fails the import with a clear message, and ``__impl__`` reports
the path in use.  The C loop is bound to the libpq psycopg uses (its pq
module's, or the one its ctypes layer opened) and the rules that prove it
are checked with real libraries: every function from one object (a library
that defines one libpq function shadows the rest), two different libpqs of
psycopg's version refused as ambiguous (a copy of psycopg's libpq loaded
globally), and each connection checked before the C loop reads it.
Under psycopg[binary], ``scripts/check_wheel.sh`` covers the same from a
fresh virtualenv.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

import pglisten_fast as pgl
from pglisten_fast import _readpath
from pglisten_fast._router import Router

_ROUND_TRIP = r"""
import os, psycopg, pglisten_fast as pgl
assert pgl.__impl__ == "python", pgl.__impl__
dsn = os.environ["PGLF_TEST_DSN"]
with pgl.Listener(dsn) as lst, psycopg.connect(dsn, autocommit=True) as c:
    sub = lst.listen("impl_python")
    m = sub.get(timeout=10)
    assert m.connection_reset and m.reason == "listen", m
    pgl.notify_many(c, "impl_python", [str(i) for i in range(1000)])
    got = []
    while len(got) < 1000:
        got += [n.payload for n in sub.get_batch(timeout=10)]
    assert got == [str(i) for i in range(1000)], got[:5]
print("impl", pgl.__impl__, "ok")
"""


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
        timeout=60, check=False, cwd=os.path.dirname(os.path.dirname(__file__)),
    )


def test_forced_python_read_path(dsn: str) -> None:
    proc = _run_python(_ROUND_TRIP, PGLISTEN_FAST_IMPL="python", PGLF_TEST_DSN=dsn)
    assert proc.returncode == 0, proc.stderr
    assert "impl python ok" in proc.stdout


def test_bogus_read_path_fails_import() -> None:
    proc = _run_python(
        "import pglisten_fast\n", PGLISTEN_FAST_IMPL="bogus"
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "PGLISTEN_FAST_IMPL" in proc.stderr
    assert "bogus" in proc.stderr


def test_current_read_path_is_reported() -> None:
    assert pgl.__impl__ in ("c", "python")
    forced = os.environ.get("PGLISTEN_FAST_IMPL", "").strip().lower()
    if forced:
        assert pgl.__impl__ == forced


# ---------------------------------------------------------------------------
# the binding to psycopg's libpq

FORCED = os.environ.get("PGLISTEN_FAST_IMPL", "").strip().lower()
needs_c = pytest.mark.skipif(FORCED == "python", reason="PGLISTEN_FAST_IMPL=python")


def _binding() -> _readpath.LibpqBinding:
    binding = _readpath.BINDING
    assert binding is not None, _readpath.REASON
    return binding


def _child(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout (stderr on failure)."""
    proc = _run_python(code, **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_c
def test_c_read_path_under_the_suites_psycopg() -> None:
    assert pgl.__impl__ == "c", _readpath.REASON
    assert _readpath.REASON is None
    binding = _binding()
    assert binding.version == pq.version()
    assert binding.path == _readpath.LIBPQ
    if pq.__impl__ in ("c", "binary"):
        assert binding.source == f"psycopg_{pq.__impl__}.pq"
    assert _readpath.check_c_path() is None


@needs_c
def test_the_binding_is_one_library_with_every_function() -> None:
    binding = _binding()
    addresses = {name: binding.address(name) for name in _readpath.LIBPQ_FUNCTIONS}
    assert all(addresses.values()), addresses
    assert len(set(addresses.values())) == len(addresses)
    # Binding the same object again gives the same functions.
    again = _readpath.bind_libpq(binding.path, "again")
    assert isinstance(again, _readpath.LibpqBinding), again
    assert again.base == binding.base
    assert {n: again.address(n) for n in addresses} == addresses


def test_a_library_that_is_not_libpq_or_not_loaded_is_refused() -> None:
    libc = ctypes.util.find_library("c") or "libc.so.6"
    why = _readpath.bind_libpq(libc, "libc")
    assert isinstance(why, str)
    assert why == f"libc: no libpq from {libc}"
    why = _readpath.bind_libpq("/nonexistent/libpq.so.5", "nowhere")
    assert why == "nowhere: /nonexistent/libpq.so.5 is not loaded"


# -- the per-connection check


class _LyingPGconn:
    """psycopg's PGconn, but with another backend PID."""

    def __init__(self, real: Any, backend_pid: int) -> None:
        self._real = real
        self.backend_pid = backend_pid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@needs_c
def test_each_connection_is_checked_before_the_c_loop_reads_it(
    conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    binding = _binding()
    pgconn = conn.pgconn
    ptr = _readpath.ffi.cast("PGconn *", pgconn.pgconn_ptr)
    assert _readpath.connection_mismatch(
        binding, ptr, pgconn.socket, pgconn.backend_pid) is None
    why = _readpath.connection_mismatch(
        binding, ptr, pgconn.socket, pgconn.backend_pid + 1)
    assert why is not None
    assert f"backend {pgconn.backend_pid}, psycopg sees socket" in why

    rfd, wfd = os.pipe()
    router, other = Router(), Router()
    readers = []
    try:
        with caplog.at_level(logging.WARNING, logger="pglisten_fast"):
            readers.append(_readpath.open_read_path(router, pgconn, rfd, lambda: False))
            assert readers[-1].name == "c"
            assert not caplog.records
            liar = _LyingPGconn(pgconn, pgconn.backend_pid + 1)
            for r in (router, router, other):
                readers.append(_readpath.open_read_path(r, liar, rfd, lambda: False))
                assert readers[-1].name == "python"
        # One warning per listener (router), however many connections.
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 2, messages
        assert all("using the Python read path for this connection" in m
                   and "psycopg sees socket" in m for m in messages), messages
    finally:
        for reader in readers:
            reader.close()
        os.close(rfd)
        os.close(wfd)


# -- real libraries: a copy of psycopg's libpq, a library that shadows one
#    libpq function

_CHOICE = r"""
import ctypes, json, sys
copy, when = sys.argv[1], sys.argv[2]
if when == "before":
    ctypes.CDLL(copy, mode=ctypes.RTLD_GLOBAL)
import psycopg
if when == "after":
    ctypes.CDLL(copy, mode=ctypes.RTLD_GLOBAL)
from pglisten_fast import _readpath as r
binding, why, notes = r.choose_binding()
print(json.dumps({"impl": r.IMPL, "reason": r.REASON, "libpq": r.LIBPQ, "why": why,
                  "source": binding and binding.source, "notes": notes}))
"""


def _choice(tmp_path: Path, library: str, when: str, **env: str) -> dict[str, Any]:
    import json

    script = tmp_path / "choice.py"
    script.write_text(_CHOICE)
    proc = subprocess.run(
        [sys.executable, str(script), library, when], env={**os.environ, **env},
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def _copy_of_psycopgs_libpq(tmp_path: Path) -> Path:
    """A second file with psycopg's libpq (same version, another object)."""
    copy = tmp_path / "copy" / "libpq.so.5"
    copy.parent.mkdir()
    shutil.copy(os.path.realpath(_binding().path), copy)
    return copy


@needs_c
def test_two_different_libpqs_of_psycopgs_version_are_ambiguous(
    tmp_path: Path,
) -> None:
    copy = _copy_of_psycopgs_libpq(tmp_path)
    out = _choice(tmp_path, str(copy), "after", PGLISTEN_FAST_IMPL="")
    assert out["impl"] == "python", out
    assert out["why"] == out["reason"]
    assert f"two different libpq {pq.version()} are loaded" in out["reason"], out
    assert str(copy) in out["reason"], out
    # One clear log line says why.
    assert "using the Python read path (two different libpq" in out["stderr"]
    assert out["stderr"].count("using the Python read path") == 1, out["stderr"]


@needs_c
def test_forcing_c_when_it_cannot_be_proven_fails_the_import(tmp_path: Path) -> None:
    copy = _copy_of_psycopgs_libpq(tmp_path)
    script = tmp_path / "force.py"
    script.write_text(
        "import ctypes, psycopg\n"
        f"ctypes.CDLL({str(copy)!r}, mode=ctypes.RTLD_GLOBAL)\n"
        "import pglisten_fast\n")
    proc = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PGLISTEN_FAST_IMPL": "c"},
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "ImportError: PGLISTEN_FAST_IMPL=c, but the C read path is unsafe" in (
        proc.stderr), proc.stderr
    assert "two different libpq" in proc.stderr


@needs_c
def test_the_same_libpq_in_the_global_scope_is_not_ambiguous(tmp_path: Path) -> None:
    # psycopg's own libpq promoted to the global scope: one object, found twice.
    out = _choice(tmp_path, _binding().path, "after", PGLISTEN_FAST_IMPL="")
    assert out["impl"] == "c", out
    assert out["libpq"] == _binding().path
    assert any(n.startswith("global scope: libpq ") for n in out["notes"]), out


@pytest.fixture(scope="module")
def shadow_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared library defining PQconsumeInput and no other libpq function."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    d = tmp_path_factory.mktemp("shadow")
    (d / "shadow.c").write_text(
        "struct pg_conn;\n"
        "int PQconsumeInput(struct pg_conn *c) { (void)c; return 0; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "libshadow.so"),
                    str(d / "shadow.c")], check=True, capture_output=True)
    return d / "libshadow.so"


_MIXED = r"""
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)   # PQconsumeInput only
ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL)   # every libpq function
from pglisten_fast import _readpath as r
print(r.bind_libpq(None, "global scope"))
print(r.bind_libpq(sys.argv[1], "shadow"))
"""


def test_functions_from_different_libraries_are_refused(shadow_lib: Path) -> None:
    libpq = ctypes.util.find_library("pq")
    if libpq is None:
        pytest.skip("no system libpq")
    proc = subprocess.run(
        [sys.executable, "-c", _MIXED, str(shadow_lib), libpq],
        env={**os.environ, "PGLISTEN_FAST_IMPL": "python"},
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    global_scope, shadow = proc.stdout.splitlines()
    assert global_scope.startswith("global scope: PQnotifies comes from "), global_scope
    assert global_scope.endswith(f"PQconsumeInput from {shadow_lib}: not one library")
    assert shadow == f"shadow: {shadow_lib} has PQconsumeInput but no PQnotifies"


@needs_c
def test_a_shadowed_global_scope_does_not_hide_psycopgs_own_libpq(
    shadow_lib: Path, tmp_path: Path
) -> None:
    if pq.__impl__ not in ("c", "binary"):
        pytest.skip("psycopg's pq module is not an extension here")
    out = _choice(tmp_path, str(shadow_lib), "after", PGLISTEN_FAST_IMPL="")
    assert out["impl"] == "c", out
    assert out["source"] == f"psycopg_{pq.__impl__}.pq", out
    shadowed = f"global scope: {shadow_lib} has PQconsumeInput but no PQnotifies"
    assert shadowed in out["notes"], out


_PYTHON_IMPL = r"""
import ctypes, sys
import psycopg
from psycopg import pq
assert pq.__impl__ == "python", pq.__impl__
import pglisten_fast
from pglisten_fast import _readpath as r
print(pglisten_fast.__impl__, r.BINDING and r.BINDING.source, r.REASON)
cdll = r._ctypes_libpq()
assert r._same_as_ctypes(r.BINDING, cdll) is None
ctypes.CDLL(sys.argv[1])          # a copy, loaded locally: not what ctypes calls
copy = r.bind_libpq(sys.argv[1], "copy")
print(r._same_as_ctypes(copy, cdll))
"""


@needs_c
def test_psycopgs_python_implementation_binds_the_libpq_ctypes_opened(
    tmp_path: Path,
) -> None:
    probe = _run_python("import psycopg", PSYCOPG_IMPL="python")
    if probe.returncode != 0:
        pytest.skip("psycopg's python implementation finds no libpq here")
    copy = tmp_path / "libpq-copy.so.5"
    libpq = ctypes.util.find_library("pq")
    assert libpq is not None
    # The file ctypes opens by that name: find it through a binding to it.
    out = _child(
        "import ctypes, sys\n"
        f"ctypes.CDLL({libpq!r})\n"
        "from pglisten_fast import _readpath as r\n"
        f"print(r.bind_libpq({libpq!r}, 'x').path)\n",
        PGLISTEN_FAST_IMPL="python")
    shutil.copy(os.path.realpath(out.strip()), copy)
    proc = subprocess.run(
        [sys.executable, "-c", _PYTHON_IMPL, str(copy)],
        env={**os.environ, "PSYCOPG_IMPL": "python", "PGLISTEN_FAST_IMPL": ""},
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == "c ctypes libpq None", first
    assert second == f"copy: PQconsumeInput at {copy} is not the function psycopg's " \
        "ctypes layer calls", second
