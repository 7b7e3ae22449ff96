"""A sleeping consumer is woken while the read loop is kept busy.

The read loop batches wake-ups during bursts and fast streams (at most
``batch_window`` late, see csrc/pglf_readloop.h); a consumer
of a quiet channel must still get its notification while a long stream on
another channel keeps the loop reading, not when the stream ends.  The
bound checked here is generous: this is about being woken at all during
the stream, not about latency.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl
from tests.helpers import TIMEOUT, listen_ready, wait_until

Conn = psycopg.Connection[Any]


@pytest.mark.parametrize("window", [0.0, 0.0005, 0.1],
                         ids=["no batching", "default window", "longest window"])
def test_a_quiet_consumer_is_woken_during_a_long_stream(
    dsn: str, window: float
) -> None:
    with pgl.Listener(dsn, batch_window=window) as listener:
        stream = listen_ready(listener, "long_stream", buffer_size=64 * 2**20)
        quiet = listen_ready(listener, "quiet")
        streaming = threading.Event()
        stop = threading.Event()
        received = 0

        def drain() -> None:
            nonlocal received
            while not stop.is_set():
                received += len(stream.get_batch(4096, timeout=0.1))

        def send() -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                i = 0
                while not stop.is_set():
                    pgl.notify_many(c, "long_stream",
                                    [str(i + k) for k in range(2000)])
                    i += 2000
                    if i >= 20_000:
                        streaming.set()

        threads = [threading.Thread(target=drain), threading.Thread(target=send)]
        for t in threads:
            t.start()
        try:
            assert streaming.wait(TIMEOUT), "the stream got going"
            with psycopg.connect(dsn, autocommit=True) as c:
                pgl.notify(c, "quiet", "wake up")
            n = quiet.get(timeout=TIMEOUT)
            assert n.payload == "wake up"
            # The stream goes on after it arrived: the loop did not wait for
            # the stream to end before waking this consumer.
            at_receipt = received
            wait_until(lambda: received > at_receipt + 4000,
                       message="the stream still flows")
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
