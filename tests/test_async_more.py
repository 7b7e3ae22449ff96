"""Async beyond plain asyncio: async handlers, trio, anyio on both backends.

- ``listen(..., handler=async_fn)`` from a coroutine runs the handler on
  that loop, one item at a time, and survives its exceptions; outside a
  loop it raises TypeError instead of making coroutines nobody awaits.
- ``get_async``, ``get_batch_async`` and ``async for`` run under the real
  trio (``trio.lowlevel.wait_readable`` on the subscription's fd) and under
  anyio with either backend.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, listen_ready

Conn = psycopg.Connection[Any]


@pytest.fixture
def listener(dsn: str) -> Iterator[pgl.Listener]:
    with pgl.Listener(dsn) as lst:
        yield lst


def _send_later(conn: Conn, channel: str, payloads: list[str]) -> threading.Thread:
    """Commit ``payloads`` from a thread while the event loop waits."""
    t = threading.Thread(target=pgl.notify_many, args=(conn, channel, payloads))
    t.start()
    return t


# ---------------------------------------------------------------------------
# async handlers


def test_async_handler_runs_on_the_loop_one_at_a_time(
    listener: pgl.Listener, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    running = 0
    overlap = False

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def handler(n: pgl.Notification) -> None:
            nonlocal running, overlap
            assert asyncio.get_running_loop() is loop
            running += 1
            overlap = overlap or running > 1
            await asyncio.sleep(0)          # give another call a chance
            running -= 1
            if n.payload == "boom":
                raise RuntimeError("handler failure on purpose")
            seen.append(n.reason or n.payload)
            if n.payload == "9":
                done.set()

        sub = listener.listen("async_handled", handler=handler)
        await asyncio.wait_for(_until(lambda: "listen" in seen), TIMEOUT)
        t = _send_later(conn, "async_handled",
                        ["boom"] + [str(i) for i in range(10)])
        await asyncio.wait_for(done.wait(), TIMEOUT)
        t.join()
        sub.unlisten()

    asyncio.run(main())
    assert seen == ["listen"] + [str(i) for i in range(10)]
    assert not overlap
    assert "handler failure on purpose" in caplog.text


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_async_handler_outside_a_loop_is_refused(listener: pgl.Listener) -> None:
    async def handler(n: pgl.Notification) -> None:
        pass

    with pytest.raises(TypeError, match="event loop"):
        listener.listen("no_loop", handler=handler)
    assert listener.subscriptions == ()


# ---------------------------------------------------------------------------
# trio


def test_trio_get_async_batch_and_iteration(listener: pgl.Listener, conn: Conn) -> None:
    trio = pytest.importorskip("trio")
    sub = listen_ready(listener, "trio_ch")

    async def main() -> tuple[str, list[str], list[str]]:
        t = _send_later(conn, "trio_ch", [str(i) for i in range(30)])
        first = (await sub.get_async(timeout=TIMEOUT)).payload
        batch: list[str] = []
        while len(batch) < 9:
            batch += [n.payload for n in
                      await sub.get_batch_async(max_items=9 - len(batch),
                                                timeout=TIMEOUT)]
        rest = []
        async for n in sub:
            rest.append(n.payload)
            if len(rest) == 20:
                break
        t.join()
        with pytest.raises(pgl.Empty):
            await sub.get_async(timeout=0.05)
        return first, batch, rest

    first, batch, rest = trio.run(main)
    assert [first, *batch, *rest] == [str(i) for i in range(30)]


def test_trio_waiters_share_the_fd_and_end_at_close(
    listener: pgl.Listener, conn: Conn
) -> None:
    trio = pytest.importorskip("trio")
    sub = listen_ready(listener, "trio_many")
    got: list[str] = []

    async def consumer() -> None:
        async for n in sub:
            got.append(n.payload)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(3):          # three tasks wait on one fd
                nursery.start_soon(consumer)
            await trio.sleep(0.05)
            pgl.notify_many(conn, "trio_many", [str(i) for i in range(50)])
            with trio.fail_after(TIMEOUT):
                while len(got) < 50:
                    await trio.sleep(0.01)
            sub.unlisten()              # every iteration ends once drained

    trio.run(main)
    assert sorted(got, key=int) == [str(i) for i in range(50)]


# ---------------------------------------------------------------------------
# anyio


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyio_on_either_backend(
    listener: pgl.Listener, conn: Conn, backend: str
) -> None:
    anyio = pytest.importorskip("anyio")
    if backend == "trio":
        pytest.importorskip("trio")
    sub = listen_ready(listener, f"anyio_{backend}")

    async def main() -> list[str]:
        t = _send_later(conn, f"anyio_{backend}", ["a", "b", "c"])
        out = []
        with anyio.fail_after(TIMEOUT):
            async for n in sub:
                out.append(n.payload)
                if len(out) == 3:
                    break
        t.join()
        return out

    assert anyio.run(main, backend=backend) == ["a", "b", "c"]


def test_async_methods_need_an_event_loop(listener: pgl.Listener) -> None:
    sub = listener.listen("no_loop_get")
    coro = sub.get_async(timeout=0)
    with pytest.raises(RuntimeError, match="event loop or trio"):
        coro.send(None)
    coro.close()


