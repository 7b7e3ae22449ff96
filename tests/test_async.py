"""asyncio consumption: get_async, get_batch_async, async iteration, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl


@pytest.fixture
def listener(dsn: str) -> Iterator[pgl.Listener]:
    with pgl.Listener(dsn, reconnect_delay=0.05) as lst:
        yield lst


def _listen_ready(listener: pgl.Listener, *channels: str) -> pgl.Subscription:
    sub = listener.listen(*channels)
    for ch in channels:
        marker = sub.get(timeout=10)
        assert marker.connection_reset and marker.reason == "listen"
        assert marker.channel == ch
    return sub


def test_get_async_receives_in_order(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    sub = _listen_ready(listener, "a_order")

    async def main() -> list[str]:
        # Send from a thread while the coroutine waits: the wake-up must come
        # through the event loop's reader on the subscription's fd.
        def send() -> None:
            pgl.notify_many(conn, "a_order", [str(i) for i in range(100)])

        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, send)
        got = [(await sub.get_async(timeout=10)).payload for _ in range(100)]
        await fut
        return got

    assert asyncio.run(main()) == [str(i) for i in range(100)]


def test_get_async_timeout_raises_empty(listener: pgl.Listener) -> None:
    sub = _listen_ready(listener, "a_empty")

    async def main() -> None:
        with pytest.raises(pgl.Empty):
            await sub.get_async(timeout=0.05)
        assert await sub.get_batch_async(timeout=0.05) == []

    asyncio.run(main())


def test_get_batch_async(listener: pgl.Listener, conn: psycopg.Connection[Any]) -> None:
    sub = _listen_ready(listener, "a_batch")
    with conn.transaction():
        pgl.notify_many(conn, "a_batch", [str(i) for i in range(5000)])

    async def main() -> list[str]:
        out: list[str] = []
        while len(out) < 5000:
            batch = await sub.get_batch_async(max_items=700, timeout=10)
            assert 0 < len(batch) <= 700
            out += [n.payload for n in batch]
        return out

    assert asyncio.run(main()) == [str(i) for i in range(5000)]


def test_async_for_ends_after_unlisten(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    sub = _listen_ready(listener, "a_iter")
    pgl.notify_many(conn, "a_iter", ["x", "y", "z"])

    async def main() -> list[str]:
        seen: list[str] = []
        async for n in sub:
            seen.append(n.payload)
            if len(seen) == 3:
                # Closing from inside the loop: buffered items are still
                # returned, then iteration ends.
                sub.unlisten()
        return seen

    assert asyncio.run(main()) == ["x", "y", "z"]


def test_cancelled_waiter_leaves_subscription_usable(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    sub = _listen_ready(listener, "a_cancel")

    async def main() -> str:
        task = asyncio.create_task(sub.get_async())
        await asyncio.sleep(0)  # let it register its reader
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pgl.notify(conn, "a_cancel", "after-cancel")
        return (await sub.get_async(timeout=10)).payload

    assert asyncio.run(main()) == "after-cancel"
    # And the blocking API still works on the same subscription.
    pgl.notify(conn, "a_cancel", "sync")
    assert sub.get(timeout=10).payload == "sync"


def test_stop_wakes_async_waiter(dsn: str) -> None:
    lst = pgl.Listener(dsn).start()
    sub = _listen_ready(lst, "a_stop")

    async def main() -> None:
        waiter = asyncio.create_task(sub.get_async())
        await asyncio.sleep(0)
        stopper = threading.Thread(target=lst.stop, daemon=True)
        stopper.start()
        with pytest.raises(pgl.Closed):
            await asyncio.wait_for(waiter, 10)
        assert not lst.connected
        stopper.join(10)

    asyncio.run(main())
    assert not lst.connected and lst.backend_pid is None


def test_many_tasks_share_one_subscription(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    sub = _listen_ready(listener, "a_share")
    total = 2000

    async def consumer(out: list[int]) -> None:
        while True:
            try:
                n = await sub.get_async(timeout=2)
            except pgl.Empty:
                return
            out.append(int(n.payload))

    async def main() -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in range(4)]
        tasks = [asyncio.create_task(consumer(o)) for o in outs]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, pgl.notify_many, conn, "a_share", [str(i) for i in range(total)]
        )
        await asyncio.gather(*tasks)
        return outs

    outs = asyncio.run(main())
    merged = sorted(x for o in outs for x in o)
    assert merged == list(range(total))  # each exactly once
    for o in outs:
        assert o == sorted(o)  # each task sees its share in server order


def test_uvloop_if_installed(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    uvloop = pytest.importorskip("uvloop")
    sub = _listen_ready(listener, "a_uv")

    async def main() -> str:
        pgl.notify(conn, "a_uv", "uv")
        return (await sub.get_async(timeout=10)).payload

    assert uvloop.run(main()) == "uv"


def test_two_tasks_of_one_loop_both_wake(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    """Two waiters in one event loop share the fd reader: both are served."""
    sub = _listen_ready(listener, "a_two")

    async def main() -> tuple[str, str]:
        a = asyncio.create_task(sub.get_async(timeout=10))
        b = asyncio.create_task(sub.get_async(timeout=10))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pgl.notify_many, conn, "a_two", ["1", "2"])
        x, y = await asyncio.gather(a, b)
        return x.payload, y.payload

    assert sorted(asyncio.run(main())) == ["1", "2"]


def test_unlisten_wakes_every_async_waiter(listener: pgl.Listener) -> None:
    sub = _listen_ready(listener, "a_close_all")

    async def main() -> None:
        tasks = [asyncio.create_task(sub.get_async()) for _ in range(3)]
        await asyncio.sleep(0)
        sub.unlisten()
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), 10
        )
        assert all(isinstance(r, pgl.Closed) for r in results), results

    asyncio.run(main())


def test_async_and_thread_consumers_together(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    """A thread blocked in get() and an asyncio task share one subscription."""
    sub = _listen_ready(listener, "a_mixed")
    total = 400
    from_thread: list[int] = []

    def thread_consumer() -> None:
        while True:
            try:
                from_thread.append(int(sub.get(timeout=3).payload))
            except (pgl.Empty, pgl.Closed):
                return

    t = threading.Thread(target=thread_consumer)
    t.start()

    async def main() -> list[int]:
        got: list[int] = []
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, pgl.notify_many, conn, "a_mixed", [str(i) for i in range(total)]
        )
        while True:
            try:
                got.append(int((await sub.get_async(timeout=3)).payload))
            except pgl.Empty:
                return got

    from_task = asyncio.run(main())
    t.join(15)
    assert not t.is_alive()
    assert sorted(from_thread + from_task) == list(range(total))


def test_a_timed_out_waiter_does_not_strand_another(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    sub = _listen_ready(listener, "a_timeout_other")

    async def main() -> str:
        a = asyncio.create_task(sub.get_async(timeout=10))
        with pytest.raises(pgl.Empty):
            await sub.get_async(timeout=0.1)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pgl.notify, conn, "a_timeout_other", "x")
        return (await a).payload

    assert asyncio.run(main()) == "x"


def test_task_waiting_beside_a_blocked_thread_gets_its_share(
    listener: pgl.Listener, conn: psycopg.Connection[Any]
) -> None:
    """A thread asleep in get() holds the consumer lock; the task still wakes."""
    sub = _listen_ready(listener, "a_beside_thread")
    got_thread: list[str] = []
    entered = threading.Event()

    def thread_consumer() -> None:
        entered.set()
        got_thread.append(sub.get(timeout=10).payload)

    t = threading.Thread(target=thread_consumer)
    t.start()
    assert entered.wait(10)

    async def main() -> str:
        task = asyncio.create_task(sub.get_async(timeout=10))
        await asyncio.sleep(0.05)  # both consumers are asleep now
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pgl.notify, conn, "a_beside_thread", "one")
        await loop.run_in_executor(None, t.join, 10)
        await loop.run_in_executor(None, pgl.notify, conn, "a_beside_thread", "two")
        return (await task).payload

    from_task = asyncio.run(main())
    assert not t.is_alive()
    assert sorted([*got_thread, from_task]) == ["one", "two"]
