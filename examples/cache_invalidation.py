"""Cache invalidation: an in-memory copy of a table that is never stale.

A worker keeps every row of a ``products`` table in a dict.  Triggers on the
table call ``pg_notify('products', id)`` on every INSERT, UPDATE and DELETE.

The pattern is *LISTEN first, then load from the source of truth*:

1. ``listener.listen("products")`` returns at once; LISTEN takes effect in
   the background.
2. The first item of the subscription is a marker (``connection_reset=True``,
   ``reason="listen"``), queued only once LISTEN is in effect.  On it the
   worker loads the whole table.  A change committed before the load started
   is in the load; a change committed after the marker is notified.  (A
   change in between is both: re-reading a row is idempotent.)
3. On a notification (payload = product id) the worker re-reads that one
   row, or forgets it if it was deleted.
4. Every later marker means "you may have missed something": ``"reconnect"``
   (notifications sent while disconnected are lost; NOTIFY is not durable)
   or ``"overflow"`` (the buffer was full).  The worker reloads everything.

Usage::

    python examples/cache_invalidation.py [DSN]              # worker; Ctrl-C
    python examples/cache_invalidation.py [DSN] --demo-once

With ``--demo-once`` a writer thread changes the table, kills the worker's
LISTEN connection (``pg_terminate_backend``) and changes a row while it is
down; the worker reconnects, reloads on the ``"reconnect"`` marker, and at
the end the cache is compared with the table (exit status 0 if equal).  The
demo needs the right to terminate the listener's backend (same role or
superuser).

The DSN is the first argument, else ``$PGLISTEN_FAST_DSN``, else libpq's
``PG*`` variables.  The table, function and trigger are created if missing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

import pglisten_fast as pgl

CHANNEL = "products"
#: Demo only: the writer's "I am done" fence, on the same subscription.
DEMO_CHANNEL = "products_demo_done"

SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    id integer PRIMARY KEY,
    name text NOT NULL,
    price numeric(10, 2) NOT NULL
);
CREATE OR REPLACE FUNCTION products_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('products', OLD.id::text);
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.id <> OLD.id) THEN
        PERFORM pg_notify('products', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS products_notify ON products;
CREATE TRIGGER products_notify AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH ROW EXECUTE FUNCTION products_notify();
"""


@dataclass(frozen=True)
class Product:
    name: str
    price: Decimal


def ensure_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        # Serialise concurrent set-ups (several workers starting at once).
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('products_notify'))")
        conn.execute(SCHEMA)


class ProductCache:
    """The cache and the queries that fill it."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.items: dict[int, Product] = {}
        self.reloads = 0

    def reload(self) -> None:
        rows = self.conn.execute("SELECT id, name, price FROM products").fetchall()
        self.items = {pid: Product(name, price) for pid, name, price in rows}
        self.reloads += 1

    def refresh(self, product_id: int) -> Product | None:
        row = self.conn.execute(
            "SELECT name, price FROM products WHERE id = %s", (product_id,)
        ).fetchone()
        if row is None:
            self.items.pop(product_id, None)
            return None
        product = self.items[product_id] = Product(row[0], row[1])
        return product

    def close(self) -> None:
        self.conn.close()


def run_worker(
    dsn: str,
    cache: ProductCache,
    *,
    demo: bool = False,
    on_listener: Any = None,
    ready: threading.Event | None = None,
    reconnected: threading.Event | None = None,
) -> None:
    """Keep ``cache`` in sync until Ctrl-C (demo: until the writer's fence)."""
    channels = (CHANNEL, DEMO_CHANNEL) if demo else (CHANNEL,)
    with pgl.Listener(dsn, reconnect_delay=0.2) as listener:
        if on_listener is not None:
            on_listener(listener)
        sub = listener.listen(*channels)
        listening: set[str] = set()
        for n in sub:
            if n.channel == DEMO_CHANNEL:
                if n.connection_reset:
                    listening.add(n.channel)
                else:
                    print("writer is done", flush=True)
                    return
            elif n.connection_reset:
                cache.reload()
                listening.add(n.channel)
                extra = f", {n.dropped} dropped" if n.reason == "overflow" else ""
                print(
                    f"marker ({n.reason}{extra}): reloaded the whole table, "
                    f"{len(cache.items)} products",
                    flush=True,
                )
                if n.reason == "reconnect" and reconnected is not None:
                    reconnected.set()
            else:
                try:
                    product_id = int(n.payload)
                except ValueError:
                    print(f"unexpected payload {n.payload!r}: reloading", flush=True)
                    cache.reload()
                    continue
                product = cache.refresh(product_id)
                state = "deleted" if product is None else f"{product}"
                print(f"product {product_id} changed: {state}", flush=True)
            if ready is not None and listening == set(channels):
                ready.set()


def demo_writer(
    dsn: str,
    listener_box: list[pgl.Listener],
    ready: threading.Event,
    reconnected: threading.Event,
    errors: list[BaseException],
) -> None:
    """Change the table, break the worker's connection, change it again."""
    try:
        if not ready.wait(30):
            raise TimeoutError("the worker did not load the table within 30 s")
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.transaction():
                for pid, name, price in [
                    (1, "pen", "1.50"), (2, "ink", "7.00"), (3, "pad", "3.20"),
                    (4, "clip", "0.10"), (5, "tape", "2.40"),
                ]:
                    conn.execute(
                        "INSERT INTO products VALUES (%s, %s, %s) ON CONFLICT (id) "
                        "DO UPDATE SET name = excluded.name, price = excluded.price",
                        (pid, name, price),
                    )
            conn.execute("UPDATE products SET price = price * 2 WHERE id = 2")
            conn.execute("DELETE FROM products WHERE id = 5")
            # Break the worker's LISTEN connection and change a row at once:
            # its notification is probably lost, the "reconnect" reload fixes it.
            backend = listener_box[0].backend_pid
            conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
            print(f"writer: terminated the listener's backend {backend}", flush=True)
            conn.execute("UPDATE products SET name = 'notepad' WHERE id = 3")
            if not reconnected.wait(30):
                raise TimeoutError("the worker did not reconnect within 30 s")
            conn.execute("UPDATE products SET price = 1.75 WHERE id = 1")
            pgl.notify(conn, DEMO_CHANNEL, "done")
    except BaseException as e:
        errors.append(e)
        if listener_box:
            listener_box[0].stop()  # ends the worker's loop


def main(argv: list[str]) -> int:
    demo = "--demo-once" in argv
    args = [a for a in argv if a != "--demo-once"]
    dsn = args[0] if args else os.environ.get("PGLISTEN_FAST_DSN", "")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        ensure_schema(dsn)
        cache = ProductCache(dsn)
    except psycopg.OperationalError as e:
        print(f"cache_invalidation: cannot connect: {e}", file=sys.stderr)
        return 2
    try:
        if not demo:
            run_worker(dsn, cache)
            return 0
        ready, reconnected = threading.Event(), threading.Event()
        listener_box: list[pgl.Listener] = []
        errors: list[BaseException] = []
        writer = threading.Thread(
            target=demo_writer,
            args=(dsn, listener_box, ready, reconnected, errors),
            daemon=True,
        )
        writer.start()
        run_worker(
            dsn, cache, demo=True, on_listener=listener_box.append,
            ready=ready, reconnected=reconnected,
        )
        writer.join(30)
        if errors:
            print(f"writer failed: {errors[0]!r}", file=sys.stderr)
            return 1
        table = ProductCache(dsn)
        table.reload()
        table.close()
        same = table.items == cache.items
        for pid in sorted(cache.items):
            print(f"  {pid}: {cache.items[pid]}")
        print(
            f"cache has {len(cache.items)} products after {cache.reloads} reloads; "
            f"matches the table: {'yes' if same else 'NO'}",
            flush=True,
        )
        return 0 if same else 1
    except pgl.ConnectError as e:
        print(f"cache_invalidation: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        cache.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
