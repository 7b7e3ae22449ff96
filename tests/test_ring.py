"""Tests of the C record ring (csrc/pglf_ring.c) through ``pglisten_fast._ring``.

The core is a Hypothesis state machine that drives a small ring (4 or 8 KiB,
so wrap-around happens all the time) and a pure-Python model of the C
placement rule side by side, and checks return codes, ``used``, the records
drained (raw and as ``Notification`` objects), the statistics and the
consumer/producer wake-up handshakes after every step.  Plain unit tests
cover capacity rounding, size limits, marker decoding and ``wait()``; the
``Notification`` type itself is tested in ``tests/test_notification.py``.
"""

from __future__ import annotations

import os
import random
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pglisten_fast._pglf import lib

from pglisten_fast._records import Notification
from pglisten_fast._ring import (
    MAX_CAPACITY,
    MIN_CAPACITY,
    Kind,
    RawRecord,
    Reason,
    Ring,
    RingFull,
    Status,
    round_capacity,
)

REC_HDR = 16
CHANNELS: tuple[str, ...] = ("zero", "one", "two", "three")
UNKNOWN_CHAN = 2**32 - 1
JOIN_TIMEOUT = 10.0


def rec_size(length: int) -> int:
    """Bytes a record with a ``length``-byte payload occupies in the ring."""
    return (REC_HDR + length + 7) & ~7


def payload_for(seq: int, length: int) -> bytes:
    """Deterministic, sequence-specific payload bytes."""
    return random.Random(seq).randbytes(length)


def read_eventfd(fd: int) -> int | None:
    """The eventfd counter (which resets it), or None when it is not signalled."""
    try:
        data = os.read(fd, 8)
    except BlockingIOError:
        return None
    return int.from_bytes(data, "little")


def expected_notification(
    rec: RawRecord, channels: tuple[str, ...], encoding: str | None = None
) -> Notification:
    """What ``Ring.drain`` must build for ``rec``."""
    channel = channels[rec.chan]
    if rec.kind == Kind.NOTIFY:
        text = rec.payload.decode(encoding or "utf-8", "replace")
        return Notification(channel, text, rec.pid)
    if rec.reason == Reason.LISTEN:
        return Notification(channel, "", 0, True, reason="listen")
    if rec.reason == Reason.RECONNECT:
        return Notification(channel, "", 0, True, reason="reconnect")
    dropped = int.from_bytes(rec.payload[:8], "little") if len(rec.payload) >= 8 else 0
    return Notification(channel, "", 0, True, reason="overflow", dropped=dropped)


# ---------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class Stored:
    record: RawRecord
    end: int  # free-running byte position just past the record


class RingModel:
    """Byte-exact model of the C ring's placement and accounting rules."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.head = 0
        self.tail = 0
        self.records: deque[Stored] = deque()
        self.written = 0
        self.markers = 0
        self.delivered = 0
        self.closed = False
        self.consumer_armed = False
        self.producer_armed = False
        self.producer_need = 0

    @property
    def used(self) -> int:
        return self.tail - self.head

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def to_end(self) -> int:
        return self.capacity - self.tail % self.capacity

    def placement(self, length: int) -> tuple[int, int]:
        """(pad, size): bytes skipped before the record, and its size."""
        size = rec_size(length)
        to_end = self.to_end
        return (to_end if to_end < size else 0), size

    def effective_reserve(self, reserve: int) -> int:
        return min(reserve, self.capacity // 2)

    def write(self, rec: RawRecord, reserve: int) -> int:
        if rec.kind not in (Kind.NOTIFY, Kind.MARKER):
            return Status.EINVAL  # only the ring itself writes PAD (or other) kinds
        pad, size = self.placement(len(rec.payload))
        if size > self.capacity // 2:
            return Status.E2BIG
        limit = self.capacity - self.effective_reserve(reserve)
        if self.tail + pad + size - self.head > limit:
            return Status.FULL
        self.tail += pad + size
        self.records.append(Stored(rec, self.tail))
        if rec.kind == Kind.NOTIFY:
            self.written += 1
        elif rec.kind == Kind.MARKER:
            self.markers += 1
        return Status.OK

    def take(self, n: int) -> list[RawRecord]:
        """Consume the first ``n`` records."""
        out: list[RawRecord] = []
        for _ in range(n):
            stored = self.records.popleft()
            self.head = stored.end
            out.append(stored.record)
            if stored.record.kind == Kind.NOTIFY:
                self.delivered += 1
        return out

    def drain_count(self, max_records: int, out_cap: int) -> int:
        """How many records ``pglf_ring_drain`` copies."""
        n = used = 0
        for stored in self.records:
            if n >= max_records:
                break
            size = rec_size(len(stored.record.payload))
            if used + size > out_cap:
                break
            used += size
            n += 1
        return n

    def producer_signal_due(self) -> bool:
        """After the consumer released space: must it signal the producer fd?"""
        if self.producer_armed and self.free >= self.producer_need:
            self.producer_armed = False
            return True
        return False


# ---------------------------------------------------------------------------
# the state machine

LENGTH_SHAPES = (
    "random",
    "tiny",
    "fit_end",
    "pad_end",
    "leave_fragment",
    "fill",
    "overfill",
    "max",
    "too_big",
)
RESERVES = ("zero", "zero", "small", "markers", "quarter", "half", "over")
OUT_CAPS = ("big", "exact", "short", "too_small", "zero")


class RingMachine(RuleBasedStateMachine):
    """Drive a C ring and :class:`RingModel` with the same operations."""

    def __init__(self) -> None:
        super().__init__()
        self.ring: Ring | None = None
        self.model = RingModel(4096)
        self.pfd = -1
        self.seq = 0

    # -- helpers ---------------------------------------------------------
    @property
    def r(self) -> Ring:
        assert self.ring is not None
        return self.ring

    def _reserve(self, which: str, n: int) -> int:
        cap = self.model.capacity
        return {
            "zero": 0,
            "small": 8 * (n % 4),
            "markers": 48,
            "quarter": cap // 4,
            "half": cap // 2,
            "over": cap + n % 100,
        }[which]

    def _length(self, shape: str, n: int, reserve: int) -> int:
        m = self.model
        cap = m.capacity
        max_payload = cap // 2 - REC_HDR
        jitter = n % 8
        if shape == "random":
            length = n % (max_payload + 1)
        elif shape == "tiny":
            length = n % 25
        elif shape in ("fit_end", "pad_end", "leave_fragment"):
            # Aim at the end of the buffer; from afar, halve the distance.
            to_end = m.to_end
            if to_end > cap // 2:
                size = to_end - cap // 2
            elif shape == "fit_end":  # the record ends exactly at the end
                size = to_end
            elif shape == "pad_end":  # one alignment step too big: a pad
                size = to_end + 8
            else:  # leaves 8 bytes (an implicit fragment) or a PAD of 16..40
                size = to_end - (8 if n % 3 else 8 * (2 + n % 4))
            length = max(0, size - REC_HDR) - jitter
        elif shape in ("fill", "overfill"):
            # The record that leaves exactly `reserve` bytes free (if any).
            room = m.free - m.effective_reserve(reserve)
            to_end = m.to_end
            size = room if room <= to_end else room - to_end
            if room > to_end and size <= to_end:
                size = to_end  # no exact fill possible: the largest unpadded one
            if shape == "overfill":
                size += 8
            length = size - REC_HDR - jitter
        elif shape == "max":
            length = max_payload - jitter
        else:  # too_big
            length = max_payload + 1 + n % 64
        return max(0, length)

    def _check_producer_fd(self, released: bool) -> None:
        due = released and self.model.producer_signal_due()
        assert read_eventfd(self.pfd) == (1 if due else None)

    # -- rules -----------------------------------------------------------
    @initialize(capacity=st.sampled_from([4096, 8192]))
    def create(self, capacity: int) -> None:
        self.pfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ring = Ring(capacity, producer_wfd=self.pfd)
        self.model = RingModel(capacity)
        assert self.r.capacity == capacity
        assert self.r.max_payload == capacity // 2 - REC_HDR
        assert self.r.used == 0

    def _write(
        self,
        length: int,
        *,
        kind: int = Kind.NOTIFY,
        reason: int = 0,
        chan: int = 0,
        pid: int = 0,
        reserve: int = 0,
    ) -> None:
        self.seq += 1
        payload = bytearray(payload_for(self.seq, length))
        if kind != Kind.NOTIFY and length >= 8:
            payload[7] &= 0x7F  # overflow counts are below 2**63
        rec = RawRecord(kind, reason, chan, pid, bytes(payload))
        where = f"tail={self.model.tail} head={self.model.head}"
        expected = self.model.write(rec, reserve)
        rc = self.r.write(
            rec.payload, kind=kind, reason=reason, chan=chan, pid=pid, reserve=reserve
        )
        assert rc == expected, (
            f"write(len={length}, reserve={reserve}) at {where}: "
            f"rc {rc}, model {expected}"
        )
        assert self.r.used == self.model.used

    @rule(
        shape=st.sampled_from(LENGTH_SHAPES),
        n=st.integers(0, 1 << 20),
        kind=st.sampled_from(
            [Kind.NOTIFY, Kind.NOTIFY, Kind.NOTIFY, Kind.MARKER, 0, 200]
        ),
        reason=st.integers(0, 255),
        chan=st.sampled_from([0, 1, 2, 3, UNKNOWN_CHAN]),
        pid=st.integers(-(2**31), 2**31 - 1),
        reserve_kind=st.sampled_from(RESERVES),
    )
    def write_shaped(
        self,
        *,
        shape: str,
        n: int,
        kind: int,
        reason: int,
        chan: int,
        pid: int,
        reserve_kind: str,
    ) -> None:
        reserve = self._reserve(reserve_kind, n)
        length = self._length(shape, n, reserve)
        self._write(
            length, kind=kind, reason=reason, chan=chan, pid=pid, reserve=reserve
        )

    @rule(
        length=st.integers(0, 300),
        chan=st.integers(0, 3),
        pid=st.integers(0, 2**31 - 1),
        reserve=st.sampled_from([0, 0, 48, 64]),
    )
    def write_traffic(self, length: int, chan: int, pid: int, reserve: int) -> None:
        self._write(length, chan=chan, pid=pid, reserve=reserve)

    @rule(
        length=st.integers(0, 300),
        chan=st.integers(0, 3),
        reason=st.sampled_from([Reason.LISTEN, Reason.RECONNECT, Reason.OVERFLOW]),
    )
    def write_traffic_marker(self, length: int, chan: int, reason: int) -> None:
        self._write(length % 9, kind=Kind.MARKER, reason=reason, chan=chan)

    @rule(
        max_records=st.integers(0, 40),
        cap_kind=st.sampled_from(OUT_CAPS),
        n=st.integers(0, 1000),
    )
    def drain_raw(self, max_records: int, cap_kind: str, n: int) -> None:
        m = self.model
        k = min(max_records, len(m.records))
        sizes = [rec_size(len(s.record.payload)) for s in list(m.records)[:k]]
        if cap_kind == "big":
            out_cap = 1 << 16
        elif cap_kind == "exact":
            out_cap = sum(sizes)
        elif cap_kind == "short":
            out_cap = max(0, sum(sizes) - 8 - 8 * (n % 3))
        elif cap_kind == "too_small":
            out_cap = max(0, (sizes[0] if sizes else 16) - 8 - n % 8)
        else:
            out_cap = 0
        count = m.drain_count(max_records, out_cap)
        if cap_kind == "too_small":
            assert count == 0
        expected = m.take(count)
        got = self.r.drain_raw(max_records, out_cap)
        assert got == expected, f"drain_raw({max_records}, {out_cap})"
        assert self.r.used == m.used
        self._check_producer_fd(released=count > 0)

    @rule(
        max_items=st.integers(-1, 20),
        encoding=st.sampled_from([None, "utf-8", "latin-1"]),
    )
    def drain_notifications(self, max_items: int, encoding: str | None) -> None:
        m = self.model
        good = 0
        for stored in m.records:
            if good >= max_items or stored.record.chan >= len(CHANNELS):
                break
            good += 1
        blocked = max_items > 0 and good == 0 and bool(m.records)
        if blocked:
            # The first record names a channel the tuple lacks: error, kept.
            with pytest.raises(RuntimeError, match="unknown channel"):
                self.r.drain(CHANNELS, max_items, encoding)
            assert self.r.used == m.used
            self._check_producer_fd(released=False)
            return
        expected = [
            expected_notification(rec, CHANNELS, encoding) for rec in m.take(good)
        ]
        got = self.r.drain(CHANNELS, max_items, encoding)
        assert got == expected
        assert [type(x) for x in got] == [Notification] * len(expected)
        assert self.r.used == m.used
        self._check_producer_fd(released=good > 0)

    @rule()
    def free_bytes(self) -> None:
        # Also refreshes the producer's cached head: the other rules leave it
        # stale so that write() has to refresh it itself.
        assert self.r.free_bytes() == self.model.free

    @rule()
    def wait_now(self) -> None:
        rc = self.r.wait(0)
        if self.model.records:
            assert rc == Status.READY
        else:
            assert rc == (Status.CLOSED if self.model.closed else Status.TIMEOUT)
        self.model.consumer_armed = False

    @rule()
    def consumer_arm(self) -> None:
        ready = self.r.consumer_wait_arm()
        m = self.model
        assert ready == (bool(m.records) or m.closed)
        m.consumer_armed = not ready

    @rule()
    def consumer_disarm(self) -> None:
        self.r.consumer_wait_disarm()
        self.model.consumer_armed = False

    @rule()
    def wake_consumer(self) -> None:
        woke = self.r.wake_consumer()
        assert woke == self.model.consumer_armed
        self.model.consumer_armed = False
        assert read_eventfd(self.r.wake.rfd) == (1 if woke else None)

    @rule(
        need_kind=st.sampled_from(["zero", "free", "free+8", "capacity", "random"]),
        n=st.integers(0, 1 << 16),
    )
    def producer_arm(self, need_kind: str, n: int) -> None:
        m = self.model
        need = {
            "zero": 0,
            "free": m.free,
            "free+8": m.free + 8,
            "capacity": m.capacity,
            "random": n % (m.capacity + 1),
        }[need_kind]
        enough = self.r.producer_wait_arm(need)
        assert enough == (m.free >= need)
        m.producer_armed = not enough
        m.producer_need = need
        assert read_eventfd(self.pfd) is None

    @precondition(lambda self: not self.model.closed)
    @rule()
    def close(self) -> None:
        self.r.close()
        self.r.close()  # idempotent: a single signal
        self.model.closed = True
        assert self.r.closed
        assert read_eventfd(self.r.wake.rfd) == 1

    @invariant()
    def counters_match(self) -> None:
        if self.ring is None:
            return
        m = self.model
        assert self.r.used == m.used
        assert 0 <= m.used <= m.capacity
        assert self.r.stats() == (m.written, m.delivered, 0, m.markers)

    def teardown(self) -> None:
        if self.ring is not None:
            # Whatever is left must still drain intact.
            rest = self.model.take(len(self.model.records))
            assert self.ring.drain_raw(len(rest) + 1, 1 << 16) == rest
            assert self.ring.used == 0
            self.ring = None
        if self.pfd >= 0:
            os.close(self.pfd)
            self.pfd = -1


TestRingStateMachine = RingMachine.TestCase
TestRingStateMachine.settings = settings(
    max_examples=500,
    stateful_step_count=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------
# capacity and size limits


@pytest.mark.parametrize(
    ("requested", "capacity"),
    [
        (1, 4096),
        (4096, 4096),
        (4097, 8192),
        (5000, 8192),
        (65536, 65536),
        (65537, 131072),
    ],
)
def test_ring_capacity_rounds_up_to_power_of_two(requested: int, capacity: int) -> None:
    ring = Ring(requested)
    assert ring.capacity == capacity
    assert ring.max_payload == capacity // 2 - REC_HDR
    assert ring.used == 0
    assert ring.free_bytes() == capacity


@pytest.mark.parametrize("bad", [0, -1, MAX_CAPACITY + 1])
def test_ring_rejects_capacity_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Ring(bad)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1, MIN_CAPACITY),
        (4096, MIN_CAPACITY),
        (MIN_CAPACITY, MIN_CAPACITY),
        (MIN_CAPACITY + 1, 2 * MIN_CAPACITY),
        (1_000_000, 1 << 20),
        (MAX_CAPACITY, MAX_CAPACITY),
    ],
)
def test_round_capacity(size: int, expected: int) -> None:
    assert MIN_CAPACITY == 64 * 1024
    assert round_capacity(size) == expected


@pytest.mark.parametrize("bad", ["65536", 1.5, True, None, b"1"])
def test_round_capacity_rejects_non_int(bad: object) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        round_capacity(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, -(2**40), MAX_CAPACITY + 1])
def test_round_capacity_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        round_capacity(bad)


def test_e2big_above_max_payload() -> None:
    ring = Ring(4096)
    assert ring.max_payload == 2032
    assert ring.write(b"x" * (ring.max_payload + 1)) == Status.E2BIG
    assert ring.write(b"x" * 10_000) == Status.E2BIG
    assert ring.used == 0
    with pytest.raises(ValueError, match="maximum payload of 2032 bytes"):
        ring.write_or_raise(b"x" * 2033)
    assert ring.write(b"y" * ring.max_payload) == Status.OK
    assert ring.used == 2048
    assert ring.drain_raw(10) == [RawRecord(Kind.NOTIFY, 0, 0, 0, b"y" * 2032)]


def test_full_edges() -> None:
    ring = Ring(4096)
    # 4 records of 1024 bytes fill the ring exactly.
    for i in range(4):
        assert ring.write(bytes([i]) * (1024 - REC_HDR), chan=i) == Status.OK
    assert ring.used == 4096
    assert ring.free_bytes() == 0
    assert ring.write(b"") == Status.FULL
    with pytest.raises(RingFull):
        ring.write_or_raise(b"")
    assert [r.chan for r in ring.drain_raw(1)] == [0]
    # 1024 bytes free, but a reserve of 8 leaves room for 1016 only.
    assert ring.write(b"a" * (1024 - REC_HDR), reserve=8) == Status.FULL
    assert ring.write(b"a" * (1016 - REC_HDR), reserve=8) == Status.OK
    assert ring.used == 4096 - 8
    assert [r.chan for r in ring.drain_raw(10)] == [1, 2, 3, 0]
    assert ring.used == 0


def test_wrap_inserts_pad() -> None:
    ring = Ring(4096)
    assert ring.write(b"a" * (2048 - REC_HDR)) == Status.OK  # [0, 2048)
    assert ring.write(b"b" * (1024 - REC_HDR)) == Status.OK  # [2048, 3072)
    assert len(ring.drain_raw(2)) == 2
    # 1024 bytes before the end: a 1504-byte record is padded to offset 0.
    assert ring.write(b"c" * (1504 - REC_HDR), chan=7) == Status.OK
    assert ring.used == 1024 + 1504
    assert ring.free_bytes() == 4096 - 2528
    # The pad is consumed together with the record behind it.
    assert ring.drain_raw(5) == [RawRecord(Kind.NOTIFY, 0, 7, 0, b"c" * 1488)]
    assert ring.used == 0


def test_wrap_skips_fragment_shorter_than_header() -> None:
    ring = Ring(4096)
    assert ring.write(b"a" * (2048 - REC_HDR)) == Status.OK  # [0, 2048)
    assert ring.write(b"b" * (2040 - REC_HDR)) == Status.OK
    assert ring.used == 4088
    assert len(ring.drain_raw(2)) == 2
    # 8 bytes before the end: too short for a PAD header, skipped implicitly.
    assert ring.write(b"", chan=1) == Status.OK
    assert ring.used == 8 + 16
    assert ring.write(b"tiny", chan=2) == Status.OK
    assert ring.drain_raw(5) == [
        RawRecord(Kind.NOTIFY, 0, 1, 0, b""),
        RawRecord(Kind.NOTIFY, 0, 2, 0, b"tiny"),
    ]
    assert ring.used == 0


def test_stats_counters() -> None:
    ring = Ring(8192)
    for i in range(5):
        assert ring.write(f"n{i}".encode(), chan=1, pid=100 + i) == Status.OK
    assert ring.write(b"", kind=Kind.MARKER, reason=Reason.LISTEN) == Status.OK
    assert (
        ring.write(struct.pack("<Q", 3), kind=Kind.MARKER, reason=Reason.OVERFLOW)
        == Status.OK
    )
    assert ring.write(b"other", kind=0) == Status.EINVAL  # refused, not counted
    assert ring.stats() == (5, 0, 0, 2)
    assert len(ring.drain_raw(3)) == 3
    assert ring.stats() == (5, 3, 0, 2)
    assert len(ring.drain_raw(100)) == 4
    assert ring.stats() == (5, 5, 0, 2)


# ---------------------------------------------------------------------------
# drain() -> Notification


def test_drain_builds_notifications() -> None:
    ring = Ring(8192)
    channels = ("alpha", "beta", "gamma")
    assert ring.write("héllo".encode(), chan=1, pid=4242) == Status.OK
    assert ring.write(b"bad \xff\xfe bytes", chan=2, pid=-7) == Status.OK
    assert ring.write(b"", chan=0, pid=1) == Status.OK
    got = ring.drain(channels, 10)
    assert got == [
        Notification("beta", "héllo", 4242),
        Notification("gamma", "bad \ufffd\ufffd bytes", -7),
        Notification("alpha", "", 1),
    ]
    first = got[0]
    assert first.channel is channels[1]
    assert first.connection_reset is False
    assert first.reason is None
    assert first.dropped == 0
    assert ring.used == 0
    assert ring.stats() == (3, 3, 0, 0)


def test_drain_markers() -> None:
    ring = Ring(8192)
    channels = ("a", "b")
    marker = {"kind": Kind.MARKER}
    assert ring.write(b"", **marker, reason=Reason.LISTEN, chan=0, pid=99) == Status.OK
    assert ring.write(b"", **marker, reason=Reason.RECONNECT, chan=1) == Status.OK
    big = 2**40 + 7
    overflow = struct.pack("<Q", big)
    assert ring.write(overflow, **marker, reason=Reason.OVERFLOW, chan=1) == Status.OK
    assert ring.write(b"\x05\x00", **marker, reason=Reason.OVERFLOW) == Status.OK
    got = ring.drain(channels, 10)
    assert [
        (n.channel, n.connection_reset, n.reason, n.dropped, n.pid, n.payload)
        for n in got
    ] == [
        ("a", True, "listen", 0, 0, ""),
        ("b", True, "reconnect", 0, 0, ""),
        ("b", True, "overflow", big, 0, ""),
        ("a", True, "overflow", 0, 0, ""),  # short payload: count unknown
    ]
    assert ring.stats() == (0, 0, 0, 4)


def test_drain_max_items_and_encoding() -> None:
    ring = Ring(8192)
    for i in range(5):
        assert ring.write(f"caf\xe9 {i}".encode("latin-1"), chan=0, pid=i) == Status.OK
    assert ring.drain(("ch",), 0) == []
    assert ring.drain(("ch",), -3) == []
    assert ring.used > 0
    got = ring.drain(("ch",), 2, "latin-1")
    assert got == [Notification("ch", "café 0", 0), Notification("ch", "café 1", 1)]
    got = ring.drain(("ch",), 10, "utf-8")
    assert [n.payload for n in got] == [f"caf\ufffd {i}" for i in (2, 3, 4)]
    assert ring.used == 0


def test_drain_unknown_channel_keeps_record() -> None:
    ring = Ring(8192)
    assert ring.write(b"ok", chan=0) == Status.OK
    assert ring.write(b"lost?", chan=5) == Status.OK
    # A partial batch is returned and the bad record stays in the ring.
    assert ring.drain(("only",), 10) == [Notification("only", "ok", 0)]
    used = ring.used
    assert used == rec_size(5)
    with pytest.raises(RuntimeError, match="unknown channel"):
        ring.drain(("only",), 10)
    assert ring.used == used
    assert ring.drain_raw(10) == [RawRecord(Kind.NOTIFY, 0, 5, 0, b"lost?")]


# ---------------------------------------------------------------------------
# wait() and the wake-up handshake


def test_wait_timeout_on_empty_ring() -> None:
    ring = Ring(4096)
    t0 = time.monotonic()
    assert ring.wait(0.05) == Status.TIMEOUT
    assert time.monotonic() - t0 >= 0.045
    assert ring.wait(0) == Status.TIMEOUT


def test_wait_ready_when_data_present() -> None:
    ring = Ring(4096)
    assert ring.write(b"x") == Status.OK
    t0 = time.monotonic()
    assert ring.wait(5.0) == Status.READY
    assert ring.wait(None) == Status.READY
    assert time.monotonic() - t0 < 1.0
    assert ring.drain_raw(1) == [RawRecord(Kind.NOTIFY, 0, 0, 0, b"x")]
    assert ring.wait(0) == Status.TIMEOUT


def test_wait_closed_only_after_drained() -> None:
    ring = Ring(4096)
    assert ring.write(b"last") == Status.OK
    ring.close()
    assert ring.closed
    assert ring.wait(0) == Status.READY  # data first
    assert ring.drain_raw(5) == [RawRecord(Kind.NOTIFY, 0, 0, 0, b"last")]
    assert ring.wait(0) == Status.CLOSED
    assert ring.wait(None) == Status.CLOSED
    assert ring.consumer_wait_arm() is True


def test_take_drains_without_waiting_when_records_are_there() -> None:
    ring = Ring(4096)
    assert ring.write(b"a", chan=1, pid=5) == Status.OK
    assert ring.write(b"\xff", chan=2, pid=6) == Status.OK
    got = ring.take(CHANNELS, 1, None, False)
    assert got == [Notification("one", "a", 5)]
    got = ring.take(CHANNELS, 10, None, True)
    assert got == [Notification("two", b"\xff", 6)]


def test_take_times_out_on_empty_ring() -> None:
    ring = Ring(4096)
    assert ring.take(CHANNELS, 10, 0, False) == Status.TIMEOUT
    t0 = time.monotonic()
    assert ring.take(CHANNELS, 10, 0.05, False) == Status.TIMEOUT
    assert time.monotonic() - t0 >= 0.045


def test_take_closed_only_after_drained() -> None:
    ring = Ring(4096)
    assert ring.write(b"last") == Status.OK
    ring.close()
    assert ring.take(CHANNELS, 10, None, False) == [Notification("zero", "last", 0)]
    assert ring.take(CHANNELS, 10, None, False) == Status.CLOSED
    assert ring.take(CHANNELS, 10, 0, False) == Status.CLOSED


def test_take_refuses_an_empty_batch() -> None:
    ring = Ring(4096)
    assert ring.write(b"x") == Status.OK
    with pytest.raises(ValueError, match="max_items"):
        ring.take(CHANNELS, 0, None, False)
    assert ring.used > 0


def test_take_keeps_a_record_of_an_unknown_channel() -> None:
    ring = Ring(4096)
    assert ring.write(b"x", chan=UNKNOWN_CHAN) == Status.OK
    with pytest.raises(RuntimeError, match="unknown channel"):
        ring.take(CHANNELS, 10, 0, False)
    assert ring.used > 0


class _Thread:
    """Run ``fn`` in a thread, keeping its result or exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._fn = fn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.started.set()
        try:
            self.result = self._fn()
        except BaseException as exc:  # re-raised by join()
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = JOIN_TIMEOUT) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "thread did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


def _until_consumer_sleeps(ring: Ring, waiter: _Thread) -> None:
    """Return once ``waiter`` is blocked in ``ring.wait()``.

    ``wake_consumer()`` returns True only when the consumer announced that it
    sleeps; the wake-up it sends is spurious (nothing was written), so the
    consumer clears its fd and goes back to sleep.
    """
    assert waiter.started.wait(JOIN_TIMEOUT)
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not ring.wake_consumer():
        assert waiter.alive, "consumer returned before anything was written"
        assert time.monotonic() < deadline, "consumer never went to sleep"


def test_wait_woken_by_producer_thread() -> None:
    ring = Ring(4096)
    waiter = _Thread(lambda: ring.wait(JOIN_TIMEOUT))
    _until_consumer_sleeps(ring, waiter)

    def produce() -> bool:
        assert ring.write(b"wake up", chan=3, pid=17) == Status.OK
        ring.wake_consumer()
        return True

    producer = _Thread(produce)
    assert producer.join() is True
    t0 = time.monotonic()
    assert waiter.join() == Status.READY
    assert time.monotonic() - t0 < JOIN_TIMEOUT / 2
    assert ring.drain_raw(10) == [RawRecord(Kind.NOTIFY, 0, 3, 17, b"wake up")]


def test_take_sleeps_until_a_producer_thread_writes() -> None:
    ring = Ring(4096)
    waiter = _Thread(lambda: ring.take(CHANNELS, 10, JOIN_TIMEOUT, False))
    _until_consumer_sleeps(ring, waiter)
    assert ring.write(b"wake up", chan=3, pid=17) == Status.OK
    ring.wake_consumer()
    assert waiter.join() == [Notification("three", "wake up", 17)]


def test_take_woken_by_close() -> None:
    ring = Ring(4096)
    waiter = _Thread(lambda: ring.take(CHANNELS, 10, None, False))
    _until_consumer_sleeps(ring, waiter)
    ring.close()
    assert waiter.join() == Status.CLOSED


def test_wait_woken_by_close() -> None:
    ring = Ring(4096)
    waiter = _Thread(lambda: ring.wait(None))
    _until_consumer_sleeps(ring, waiter)
    ring.close()
    assert waiter.join() == Status.CLOSED


def test_consumer_arm_then_wake_signals_fd() -> None:
    ring = Ring(4096)
    armed = threading.Event()

    def consumer() -> tuple[bool, list[int]]:
        ready = ring.consumer_wait_arm()
        armed.set()
        readable, _, _ = select.select([ring.wake.rfd], [], [], JOIN_TIMEOUT)
        return ready, readable

    thread = _Thread(consumer)
    assert armed.wait(JOIN_TIMEOUT)
    assert ring.write(b"data") == Status.OK
    assert ring.wake_consumer() is True  # the consumer announced its sleep
    assert ring.wake_consumer() is False  # one signal per announcement
    assert thread.join() == (False, [ring.wake.rfd])
    assert read_eventfd(ring.wake.rfd) == 1
    assert ring.consumer_wait_arm() is True  # data is there: do not sleep


def test_consumer_disarm_keeps_a_sent_signal() -> None:
    """A signal sent before disarm stays pending: the next wait re-checks."""
    ring = Ring(4096)
    assert ring.consumer_wait_arm() is False
    assert ring.write(b"x") == Status.OK
    assert ring.wake_consumer() is True
    ring.consumer_wait_disarm()
    readable, _, _ = select.select([ring.wake.rfd], [], [], 0)
    assert readable == [ring.wake.rfd]
    assert ring.wait(0) == Status.READY
    assert [r.payload for r in ring.drain_raw(10)] == [b"x"]


def test_pad_kind_is_refused() -> None:
    ring = Ring(4096)
    assert ring.write(b"abc", kind=2) == Status.EINVAL
    assert ring.write(b"x") == Status.OK
    assert [r.payload for r in ring.drain_raw(10)] == [b"x"]


def test_producer_wait_signalled_when_space_frees() -> None:
    pfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        ring = Ring(4096, producer_wfd=pfd)
        for _ in range(4):
            assert ring.write(b"z" * (1024 - REC_HDR)) == Status.OK
        assert ring.producer_wait_arm(2048) is False
        assert len(ring.drain_raw(1)) == 1  # 1024 free: not enough
        assert read_eventfd(pfd) is None
        assert len(ring.drain_raw(1)) == 1  # 2048 free: signal once
        assert read_eventfd(pfd) == 1
        assert len(ring.drain_raw(1)) == 1
        assert read_eventfd(pfd) is None
        assert ring.producer_wait_arm(2048) is True
        del ring
    finally:
        os.close(pfd)


def test_fd_helpers() -> None:
    ring = Ring(4096)
    ring.wake.signal()
    ring.wake.signal()
    assert select.select([ring.wake.rfd], [], [], 0)[0] == [ring.wake.rfd]
    ring.wake.clear()
    assert select.select([ring.wake.rfd], [], [], 0)[0] == []
    lib.pglf_fd_signal(-1)  # ignored
    lib.pglf_fd_clear(-1)
