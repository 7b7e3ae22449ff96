"""Smoke test of the C read path under the psycopg installed in this interpreter.

Run by ``scripts/check_wheel.sh`` inside a fresh virtualenv (psycopg from
PyPI plus the built wheel); works in any environment where pglisten_fast is
installed::

    python scripts/c_path_smoke.py [--only SCENARIO ...]

The server: ``$PGLISTEN_FAST_TEST_DSN``, else a throwaway cluster
(:class:`pglisten_fast.testing.TempCluster`).  Each scenario runs in its own
interpreter, imports pglisten_fast, says which read path and which libpq it
chose, and makes a LISTEN/NOTIFY round trip (1,000 notifications, in order)
while recording which read path each connection got:

``default``
    psycopg's default implementation: the C path is required.
``python-impl``
    ``PSYCOPG_IMPL=python`` (psycopg over ctypes and the system libpq): the
    C path is required (skipped when psycopg finds no libpq for it).
``global-before`` / ``global-after``
    the system libpq loaded with ``RTLD_GLOBAL`` before / after psycopg is
    imported, so that the process holds two libpqs when psycopg brings its
    own: the C path bound to the libpq psycopg uses, or the Python path
    with the reason; the round trip must work either way (skipped when
    there is no system libpq).

Prints one line per scenario and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
from typing import Any

SCENARIOS = ("default", "python-impl", "global-before", "global-after")
DSN_ENV = "PGLISTEN_FAST_TEST_DSN"
N = 1000


def _load_system_libpq() -> str | None:
    name = ctypes.util.find_library("pq")
    if name is None:
        return None
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    return name


def _child(scenario: str, dsn: str) -> dict[str, Any]:
    """One scenario, in this (fresh) interpreter."""
    out: dict[str, Any] = {"scenario": scenario}
    if scenario == "global-before":
        out["global"] = _load_system_libpq()
    try:
        import psycopg  # noqa: PLC0415 - after the scenario's set-up
    except ImportError as e:  # PSYCOPG_IMPL=python without a libpq
        return {**out, "skip": f"psycopg: {e}"}
    if scenario == "global-after":
        out["global"] = _load_system_libpq()
    import pglisten_fast as pgl  # noqa: PLC0415
    from pglisten_fast import _readpath, _session  # noqa: PLC0415

    out.update(psycopg=psycopg.__version__, psycopg_impl=psycopg.pq.__impl__,
               libpq_version=psycopg.pq.version(), impl=pgl.__impl__,
               libpq=_readpath.LIBPQ, reason=_readpath.REASON)
    readers: list[str] = []
    real_open = _session.open_read_path

    def recording_open(*args: Any, **kw: Any) -> Any:
        reader = real_open(*args, **kw)
        readers.append(reader.name)
        return reader

    _session.open_read_path = recording_open  # type: ignore[assignment]
    with pgl.Listener(dsn) as lst, psycopg.connect(dsn, autocommit=True) as conn:
        sub = lst.listen("c_path_smoke")
        marker = sub.get(timeout=20)
        assert marker.connection_reset and marker.reason == "listen", marker
        pgl.notify_many(conn, "c_path_smoke", [str(i) for i in range(N)])
        got: list[str] = []
        while len(got) < N:
            batch = sub.get_batch(4096, timeout=20)
            assert batch, f"timed out after {len(got)} notifications"
            got += [n.payload for n in batch]
        assert got == [str(i) for i in range(N)], got[:5]
    out.update(readers=readers, received=len(got))
    return out


def _verdict(res: dict[str, Any]) -> str | None:
    """Why this scenario's result is wrong, or None."""
    if "error" in res:
        return res["error"]
    if "skip" in res:
        return None
    if res["scenario"] in ("default", "python-impl"):
        if res["impl"] != "c":
            return f"the Python read path was chosen: {res['reason']}"
        if res["scenario"] == "python-impl" and res["psycopg_impl"] != "python":
            return f"psycopg's {res['psycopg_impl']} implementation, not python"
    if res["impl"] == "c" and res["readers"] != ["c"]:
        return f"connections were read by {res['readers']}, not the C path"
    if res["impl"] == "python" and not res["reason"]:
        return "the Python read path was chosen without a reason"
    return None


def _run_all(only: list[str]) -> int:
    dsn = os.environ.get(DSN_ENV)
    cluster = None
    if not dsn:
        from pglisten_fast.testing import TempCluster  # noqa: PLC0415

        cluster = TempCluster()
        cluster.start()
        dsn = cluster.dsn
    failed = 0
    try:
        for scenario in only or SCENARIOS:
            env = {**os.environ, DSN_ENV: dsn}
            env.pop("PGLISTEN_FAST_IMPL", None)
            env.pop("PSYCOPG_IMPL", None)
            if scenario == "python-impl":
                env["PSYCOPG_IMPL"] = "python"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", scenario], env=env,
                capture_output=True, text=True, timeout=120, check=False)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                res = json.loads(lines[-1])
            else:
                err = proc.stderr.strip()[-2000:]
                res = {"scenario": scenario, "error": f"exit {proc.returncode}: {err}"}
            why = _verdict(res)
            if "skip" in res:
                print(f"SKIP {scenario}: {res['skip']}")
            elif why is None:
                detail = (f"libpq {res['libpq_version']} at {res['libpq']}"
                          if res["impl"] == "c" else f"reason: {res['reason']}")
                print(f"PASS {scenario}: psycopg {res['psycopg']} "
                      f"[{res['psycopg_impl']}], read path {res['impl']}, {detail}; "
                      f"{res['received']} notifications round trip, "
                      f"connections read by {res['readers']}")
            else:
                failed += 1
                print(f"FAIL {scenario}: {why}")
                print(f"     {json.dumps(res)}")
    finally:
        if cluster is not None:
            cluster.close()
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=[])
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, os.environ[DSN_ENV])))
        return 0
    return _run_all(args.only)


if __name__ == "__main__":
    sys.exit(main())
