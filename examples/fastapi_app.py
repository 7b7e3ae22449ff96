"""FastAPI: push a table's new rows to WebSocket clients, never silently stale.

A ``feed_items`` table has an INSERT trigger that sends each new row as
JSON on the ``feed`` channel.  The app keeps the latest rows in memory and
pushes every change to the browsers connected to ``/ws``:

* the *lifespan* starts a Listener (``asyncio.to_thread``: ``start()``
  connects synchronously), subscribes to ``feed``, starts one background
  task that consumes the subscription with ``async for n in sub``, waits
  until LISTEN is in effect and the table is loaded, and stops the
  listener on shutdown;
* each item is fanned out to every client as ``{"type": "item", ...}``;
* on a *marker* (``n.connection_reset``: LISTEN took effect, the connection
  came back, or a buffer overflowed) the task re-reads the table and sends
  every client ``{"type": "reload", "reason": ..., "items": [...]}``: a
  client replaces its state with ``items`` and has missed nothing.  A new
  client gets the same message first (``"reason": "connect"``), and a client
  too slow to keep up gets one instead of the items it could not take;
* ``GET /health`` reports the listener (503 while it is disconnected).

Usage::

    pip install fastapi 'uvicorn[standard]'     # httpx2 or httpx for --demo-once
    python examples/fastapi_app.py [DSN] [--host H] [--port P]   # uvicorn
    uvicorn --factory --app-dir examples fastapi_app:create_app  # same
    python examples/fastapi_app.py [DSN] --demo-once

    # then: websocat ws://127.0.0.1:8000/ws, and in psql:
    INSERT INTO feed_items (body) VALUES ('hello');

``--demo-once`` runs the app in-process with FastAPI's ``TestClient``: a
WebSocket client receives three rows, then the listener's backend is
terminated (a row inserted meanwhile may never be notified) and the client
gets a ``"reconnect"`` reload that contains that row (exit status 0).

The DSN is the first argument (or ``create_app(dsn)``), else
``$PGLISTEN_FAST_DSN``, else libpq's ``PG*`` variables.  The table and
trigger are created if missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse

import pglisten_fast as pgl

CHANNEL = "feed"
LATEST = 20           # rows kept and sent in a reload
CLIENT_QUEUE = 1000   # messages a client may lag behind before it gets a reload

SCHEMA = """
CREATE TABLE IF NOT EXISTS feed_items (
    id bigserial PRIMARY KEY,
    body text NOT NULL CHECK (length(body) <= 1000),  -- NOTIFY payloads < 8000 B
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION feed_items_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('feed', json_build_object('id', NEW.id, 'body', NEW.body)::text);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS feed_items_notify ON feed_items;
CREATE TRIGGER feed_items_notify AFTER INSERT ON feed_items
    FOR EACH ROW EXECUTE FUNCTION feed_items_notify();
"""

log = logging.getLogger("fastapi_app")
Message = dict[str, Any]


def ensure_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('feed_items_notify'))")
        conn.execute(SCHEMA)


class Feed:
    """The latest rows, kept in sync with the table and fanned out to clients."""

    def __init__(self, dsn: str, sub: pgl.Subscription) -> None:
        self.dsn = dsn
        self.sub = sub
        self.latest: dict[int, str] = {}  # id -> body, the LATEST highest ids
        self.clients: set[asyncio.Queue[Message]] = set()
        self.ready = asyncio.Event()      # set once the first load is done
        self.reloads = 0

    def snapshot(self, reason: str) -> Message:
        items = [{"id": i, "body": b} for i, b in sorted(self.latest.items())]
        return {"type": "reload", "reason": reason, "items": items}

    async def pump(self) -> None:
        """The background task: apply and fan out every item, reload on markers."""
        async for n in self.sub:  # ends once the listener is stopped
            if n.connection_reset:
                await self.reload(n.reason or "marker")
                continue
            try:
                row = json.loads(n.payload)
                item_id, body = int(row["id"]), str(row["body"])
            except (ValueError, KeyError, TypeError):
                log.warning("unexpected payload %r: reloading", n.payload)
                await self.reload("unexpected-payload")
                continue
            if item_id in self.latest:
                continue  # already in the last reload (committed just before it)
            self.latest[item_id] = body
            for old in sorted(self.latest)[:-LATEST]:
                del self.latest[old]
            self.broadcast({"type": "item", "item": {"id": item_id, "body": body}})

    async def reload(self, reason: str) -> None:
        """Re-read the source of truth; every client then gets the snapshot."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
                    cur = await conn.execute(
                        "SELECT id, body FROM feed_items ORDER BY id DESC LIMIT %s",
                        (LATEST,),
                    )
                    self.latest = dict(await cur.fetchall())
                break
            except psycopg.OperationalError as e:  # retry: stale is not an option
                log.warning("reload failed (%s); retrying in 1 s", e)
                await asyncio.sleep(1)
        self.reloads += 1
        self.ready.set()
        self.broadcast(self.snapshot(reason))

    def connect(self) -> asyncio.Queue[Message]:
        """A new client: its queue starts with the current snapshot."""
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        queue.put_nowait(self.snapshot("connect"))
        self.clients.add(queue)
        return queue

    def broadcast(self, message: Message) -> None:
        for queue in self.clients:
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # too slow: replace its backlog by a reload
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(self.snapshot("slow-client"))


def create_app(dsn: str | None = None, *, reconnect_delay: float = 0.5) -> FastAPI:
    """The app; ``dsn`` defaults to ``$PGLISTEN_FAST_DSN`` (read at startup)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conninfo = os.environ.get("PGLISTEN_FAST_DSN", "") if dsn is None else dsn
        await asyncio.to_thread(ensure_schema, conninfo)
        listener = pgl.Listener(conninfo, reconnect_delay=reconnect_delay)
        await asyncio.to_thread(listener.start)  # raises pgl.ConnectError
        feed = Feed(conninfo, listener.listen(CHANNEL))
        pump = asyncio.create_task(feed.pump())
        app.state.listener, app.state.feed = listener, feed
        try:
            # Serve once LISTEN is in effect and the table is loaded.
            await asyncio.wait_for(feed.ready.wait(), 30)
            yield
        finally:
            await asyncio.to_thread(listener.stop)  # ends the `async for`
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    app = FastAPI(title="pglisten_fast feed", lifespan=lifespan)

    @app.get("/health")
    def health() -> JSONResponse:
        listener: pgl.Listener = app.state.listener
        feed: Feed = app.state.feed
        body = {
            "connected": listener.connected,
            "backend_pid": listener.backend_pid,
            "listening": sorted(listener.channels),
            "clients": len(feed.clients),
            "reloads": feed.reloads,
            "listener": dataclasses.asdict(listener.stats),
            "subscription": dataclasses.asdict(feed.sub.stats),
        }
        return JSONResponse(body, status_code=200 if listener.connected else 503)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        feed: Feed = app.state.feed
        queue = feed.connect()

        async def forward() -> None:
            while True:
                await websocket.send_json(await queue.get())

        sender = asyncio.create_task(forward())
        try:  # clients only listen; wait for them to leave
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass
        finally:
            feed.clients.discard(queue)
            sender.cancel()

    return app


def demo(dsn: str) -> int:
    """Run the app in-process, talk to it like a browser, check what arrives."""
    from fastapi.testclient import TestClient  # noqa: PLC0415 - needs httpx

    app = create_app(dsn, reconnect_delay=0.2)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws, \
            psycopg.connect(dsn, autocommit=True) as conn:
        first = ws.receive_json()
        print(f"client: reload ({first['reason']}), {len(first['items'])} items",
              flush=True)
        for i in range(3):
            conn.execute("INSERT INTO feed_items (body) VALUES (%s)", (f"hello {i}",))
            msg = ws.receive_json()
            item = msg["item"]
            print(f"client: item {item['id']}: {item['body']}", flush=True)
        pid = app.state.listener.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        print("demo: terminated the listener's backend", flush=True)
        row = conn.execute(
            "INSERT INTO feed_items (body) VALUES ('sent while down') RETURNING id"
        ).fetchone()
        assert row is not None
        while (msg := ws.receive_json())["type"] != "reload":
            print(f"client: item {msg['item']['id']} (before the loss)", flush=True)
        ids = [item["id"] for item in msg["items"]]
        print(f"client: reload ({msg['reason']}), {len(ids)} items; "
              f"row {row[0]} sent while down is in it: "
              f"{'yes' if row[0] in ids else 'NO'}", flush=True)
        health = client.get("/health").json()
        print(f"health: connected={health['connected']}, "
              f"reconnects={health['listener']['reconnects']}", flush=True)
        return 0 if msg["reason"] == "reconnect" and row[0] in ids else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", nargs="?",
                        default=os.environ.get("PGLISTEN_FAST_DSN", ""))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--demo-once", action="store_true",
                        help="run the app in-process against itself, check, exit")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.demo_once:
            return demo(args.dsn)
        import uvicorn  # noqa: PLC0415 - only to serve

        uvicorn.run(create_app(args.dsn), host=args.host, port=args.port)
    except (pgl.ConnectError, psycopg.OperationalError) as e:
        print(f"fastapi_app: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
