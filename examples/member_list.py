"""Member list: who is alive, from heartbeats in a table plus notifications.

A port of the member-list example of the Go library rnovatorov/pgxlisten.

* Each **member** upserts its row in a ``members`` table
  (``name``, ``last_seen``) every ``--interval-ms`` and, in the same
  transaction, sends ``{"op": "seen", "name": ...}`` on the ``members``
  channel.  A member that shuts down cleanly deletes its row and sends
  ``{"op": "left", ...}``.  A member that crashes simply goes quiet.
* The **watcher** keeps the live list in memory.  On a marker (LISTEN in
  effect, reconnect, overflow) it reloads the table, the source of truth;
  on a notification it updates that one member.  A member not seen for
  longer than ``--ttl`` seconds is considered gone.  Ages are computed by
  the server (``now() - last_seen``) and then tracked with the watcher's
  monotonic clock, so clock skew between machines does not matter.

Usage::

    python examples/member_list.py [DSN] --member NAME   # one member; Ctrl-C
    python examples/member_list.py [DSN] --watch         # the watcher; Ctrl-C
    python examples/member_list.py [DSN] --demo-once     # k members + 1 watcher
                                                         # in one process

``--demo-once`` (the default when neither ``--member`` nor ``--watch`` is
given) runs ``--members`` members (default 3) and a watcher as threads for
``--seconds`` (default 3): the first member crashes after a third of the
time, the second leaves cleanly at half time; the final list must hold
exactly the others (exit status 0 if so).

The DSN is the first argument, else ``$PGLISTEN_FAST_DSN``, else libpq's
``PG*`` variables.  The table is created if missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any

import psycopg

import pglisten_fast as pgl

CHANNEL = "members"

SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    name text PRIMARY KEY,
    last_seen timestamptz NOT NULL
)
"""


# -- member ------------------------------------------------------------------


class Member:
    """Heartbeats until stopped; ``leave()`` removes it, ``crash()`` does not."""

    def __init__(self, dsn: str, name: str, interval: float, ttl: float) -> None:
        self.dsn = dsn
        self.name = name
        self.interval = interval
        self.ttl = ttl
        self._stop = threading.Event()
        self._leave = False
        self.thread = threading.Thread(target=self.run, name=f"member-{name}",
                                       daemon=True)

    def heartbeat(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute(
                "INSERT INTO members (name, last_seen) VALUES (%s, now()) "
                "ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
                (self.name,),
            )
            # Housekeeping: rows long expired (crashed members) go away.
            conn.execute(
                "DELETE FROM members WHERE last_seen < now() - %s * interval '1 s'",
                (10 * self.ttl,),
            )
            pgl.notify(conn, CHANNEL, json.dumps({"op": "seen", "name": self.name}))

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while True:
                self.heartbeat(conn)
                if self._stop.wait(self.interval):
                    break
            if self._leave:
                with conn.transaction():
                    conn.execute("DELETE FROM members WHERE name = %s", (self.name,))
                    pgl.notify(conn, CHANNEL,
                               json.dumps({"op": "left", "name": self.name}))

    def start(self) -> Member:
        self.thread.start()
        return self

    def leave(self) -> None:
        """Clean shutdown: the row is deleted and the watcher told at once."""
        self._leave = True
        self._stop.set()
        self.thread.join()

    def crash(self) -> None:
        """Stop heartbeating without a word (like a killed process)."""
        self._stop.set()
        self.thread.join()


# -- watcher -------------------------------------------------------------------


class MemberList:
    """Live members: name -> local monotonic time of the last heartbeat."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.seen: dict[str, float] = {}
        self.reloads = 0

    def reload(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(
            "SELECT name, extract(epoch FROM now() - last_seen)::float8 FROM members"
        ).fetchall()
        now = time.monotonic()
        self.seen = {name: now - age for name, age in rows}
        self.reloads += 1

    def apply(self, payload: str) -> None:
        event = json.loads(payload)
        if event["op"] == "seen":
            self.seen[event["name"]] = time.monotonic()
        elif event["op"] == "left":
            self.seen.pop(event["name"], None)

    def alive(self) -> list[str]:
        now = time.monotonic()
        return sorted(n for n, t in self.seen.items() if now - t <= self.ttl)


def watch(
    dsn: str,
    ttl: float,
    *,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    suffix: str = "",
) -> list[str]:
    """Print the member list whenever it changes; return it when ``stop`` is set.

    Only names ending with ``suffix`` are shown (the demo's own members).
    """
    members = MemberList(ttl)
    shown: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn, \
            pgl.Listener(dsn) as listener:
        sub = listener.listen(CHANNEL)
        while stop is None or not stop.is_set():
            # Wake at least 4 times per TTL so that silent members expire.
            for n in sub.get_batch(timeout=ttl / 4):
                if n.connection_reset:
                    members.reload(conn)
                    print(f"watcher: marker ({n.reason}): reloaded the table",
                          flush=True)
                    if ready is not None:
                        ready.set()
                else:
                    members.apply(n.payload)
            alive = [m for m in members.alive() if m.endswith(suffix)]
            if alive != shown:
                joined = sorted(set(alive) - set(shown))
                gone = sorted(set(shown) - set(alive))
                change = "; ".join(
                    part for part in (
                        f"joined {', '.join(joined)}" if joined else "",
                        f"gone {', '.join(gone)}" if gone else "",
                    ) if part
                )
                print(f"watcher: {change} -> members: {alive}", flush=True)
                shown = alive
    return shown


# -- demo ----------------------------------------------------------------------


def demo(dsn: str, k: int, seconds: float, interval: float, ttl: float) -> int:
    run = uuid.uuid4().hex[:6]
    names = [f"member{i}-{run}" for i in range(k)]
    stop, ready = threading.Event(), threading.Event()
    result: list[list[str]] = []
    watcher = threading.Thread(
        target=lambda: result.append(
            watch(dsn, ttl, stop=stop, ready=ready, suffix=f"-{run}")
        ),
        name="watcher",
    )
    watcher.start()
    try:
        if not ready.wait(30):
            print("the watcher did not start within 30 s", file=sys.stderr)
            return 1
        t0 = time.monotonic()
        members = [Member(dsn, name, interval, ttl).start() for name in names]
        expected = set(names)
        if k >= 1:
            time.sleep(seconds / 3)
            print(f"demo: {names[0]} crashes (no more heartbeats)", flush=True)
            members[0].crash()
            expected.discard(names[0])
        if k >= 2:
            time.sleep(max(0.0, t0 + seconds / 2 - time.monotonic()))
            print(f"demo: {names[1]} leaves cleanly", flush=True)
            members[1].leave()
            expected.discard(names[1])
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
        stop.set()
        watcher.join(30)
        final = result[0] if result else []
        for m in members[2:]:
            m.leave()
        ok = set(final) == expected
        print(f"final members: {final} (expected {sorted(expected)}): "
              f"{'OK' if ok else 'MISMATCH'}", flush=True)
        return 0 if ok else 1
    finally:
        stop.set()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", nargs="?",
                        default=os.environ.get("PGLISTEN_FAST_DSN", ""))
    role = parser.add_mutually_exclusive_group()
    role.add_argument("--member", metavar="NAME", help="run one member")
    role.add_argument("--watch", action="store_true", help="run the watcher")
    role.add_argument("--demo-once", action="store_true",
                      help="k members + 1 watcher for --seconds (the default)")
    parser.add_argument("--members", type=int, default=3, metavar="K")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--interval-ms", type=int, default=200)
    parser.add_argument("--ttl", type=float, default=1.0,
                        help="seconds without heartbeat before a member is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    interval = args.interval_ms / 1000
    if interval >= args.ttl:
        parser.error("--interval-ms must be shorter than --ttl")
    try:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        if args.member:
            member = Member(args.dsn, args.member, interval, args.ttl).start()
            try:
                while member.thread.is_alive():
                    member.thread.join(0.5)
            except KeyboardInterrupt:
                member.leave()
            return 0
        if args.watch:
            with contextlib.suppress(KeyboardInterrupt):
                watch(args.dsn, args.ttl)
            return 0
        return demo(args.dsn, args.members, args.seconds, interval, args.ttl)
    except (psycopg.OperationalError, pgl.ConnectError) as e:
        print(f"member_list: cannot connect: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
