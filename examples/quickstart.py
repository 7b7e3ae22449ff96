"""Quickstart: listen on the "orders" channel and print every notification.

The loop in :func:`listen_for_orders` is the README example: a Listener owns
one connection, ``listen()`` returns a subscription, and iterating it yields
notifications in server order.  Items with ``connection_reset=True`` are
*markers*: the first one arrives once LISTEN is in effect, later ones after
a reconnect or where a full buffer dropped notifications.  On a marker,
reload your state from the source of truth (here: a print).

Usage::

    python examples/quickstart.py [DSN]               # Ctrl-C to stop
    python examples/quickstart.py [DSN] --demo-once   # sends 3 orders itself,
                                                      # exits once they arrived

    # in another terminal:
    psql -c "NOTIFY orders, '42'"        # or: pglisten-fast notify orders 42

The DSN (libpq connection string or URL) is taken from the first argument,
else from ``$PGLISTEN_FAST_DSN``, else from libpq's ``PG*`` variables.
"""

from __future__ import annotations

import os
import sys
import threading

import psycopg

import pglisten_fast as pgl


def reload_orders() -> None:
    print("marker: (re)load every order from the orders table", flush=True)


def listen_for_orders(
    dsn: str, *, ready: threading.Event | None = None, stop_after: int | None = None
) -> int:
    """Print orders until Ctrl-C (or until ``stop_after`` of them arrived)."""
    received = 0
    with pgl.Listener(dsn) as listener:
        sub = listener.listen("orders")
        for n in sub:
            if n.connection_reset:
                reload_orders()          # LISTEN is in effect: load, then apply
                if ready is not None:
                    ready.set()
            else:
                print(f"order {n.payload} (sent by backend {n.pid})", flush=True)
                received += 1
                if stop_after is not None and received >= stop_after:
                    break
    return received


def send_orders(dsn: str, ready: threading.Event, ids: list[str]) -> None:
    """Demo producer: once LISTEN is in effect, NOTIFY a few orders."""
    if not ready.wait(30):
        return
    with psycopg.connect(dsn, autocommit=True) as conn:
        for order_id in ids:
            pgl.notify(conn, "orders", order_id)


def main(argv: list[str]) -> int:
    demo = "--demo-once" in argv
    args = [a for a in argv if a != "--demo-once"]
    dsn = args[0] if args else os.environ.get("PGLISTEN_FAST_DSN", "")
    try:
        if demo:
            ready = threading.Event()
            ids = ["1001", "1002", "1003"]
            producer = threading.Thread(
                target=send_orders, args=(dsn, ready, ids), daemon=True
            )
            producer.start()
            got = listen_for_orders(dsn, ready=ready, stop_after=len(ids))
            producer.join()
            print(f"received {got} orders", flush=True)
            return 0 if got == len(ids) else 1
        listen_for_orders(dsn)
    except pgl.ConnectError as e:
        print(f"quickstart: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
