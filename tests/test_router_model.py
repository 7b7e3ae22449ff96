"""Model-based test of the notification router (``csrc/pglf_router.c``).

A Hypothesis state machine plays the Listener's selector thread and the
consumers of a few small subscription rings (4 and 8 KiB, "drop" and
"block", overlapping channel sets, the engine's ``reserve``).  It adds and
frees subscriptions, activates channels ("listen"/"reconnect"), routes
numbered notifications (unknown channels and payloads up to and beyond a
ring's maximum included), drains rings a few records at a time, loses the
connection (``deactivate_all`` then ``flush``, as the engine does), closes
rings and flushes; it never routes while the router is blocked.

The model does not replicate the router's space heuristics (pay threshold,
slack).  It observes each operation through the rings' counters, which tell
exactly which targets took, dropped or did not yet see a notification and in
which operation every marker was written, and then checks what the contract
(DESIGN.md "Ordering and marker rules", ``pglf_router.h``) promises:

1. per subscription and channel, the records drained are exactly the
   notifications routed to it while active, in routing order, each once,
   with their payloads; targets are served in fan-out order and only the
   first full "block" target stops a notification;
2. a channel's first record is a "listen" marker; every activation is
   covered by exactly one "listen"/"reconnect" marker: the first marker
   written after it, so activations merge only while their marker is still
   owed; nothing routed after an activation, delivered or counted, comes
   before its marker;
3. "drop": every lost notification is counted by exactly one overflow
   marker of its channel, written after the drops it counts (all of them
   that are owed at that time) and before any later notification of the
   channel: the notifications around a marker are contiguous with the lost
   ones in between; the ring's dropped counter equals what is counted plus
   what is still owed, and once the consumer catches up nothing is owed;
4. "block": nothing is lost except records that can never fit the ring;
   ``route`` returns True exactly when a full "block" target kept the
   notification aside, ``flush`` delivers it (in order) once there is room,
   the producer fd is signalled when the blocking ring has been drained, and
   a connection loss discards it;
5. the router's counters (received, dropped, markers) are the sums of what
   happened; channel states follow NEW -> LIVE -> PAUSED -> LIVE;
6. nothing reaches a freed subscription's ring, and nothing (notification
   or marker) reaches a ring its consumer closed.

Liveness is checked against generous bounds rather than the heuristics: a
notification is taken by a ring with ample free space, markers are written at
activation when they fit, notifications leave ``reserve`` bytes free unless
the ring was empty, and draining everything then flushing settles the router.

Deterministic tests at the end run two deep scenarios through the model (an
overflow marker owed across a reconnect, a reconnect merged into an owed
"listen"), pin down the slack rule (a stalled consumer gets one overflow
marker per gap, not a run of dropped=1 markers), and pin four fixed bugs:
markers written into closed rings, a "block" ring that stalled on a record
that can never fit, an overflow marker for such a record left unpaid, and
the return value of ``activate``.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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

from pglisten_fast._ring import Kind, RawRecord, Reason, Ring
from pglisten_fast._router import ChannelState, Router, RouterSub

REC_HDR = 16
REASON_REC = 16     # bytes of a "listen"/"reconnect" marker record
OVERFLOW_REC = 24   # bytes of an "overflow" marker record (8-byte count)
#: Upper bound of the bytes a channel's owed markers can take, pads included.
MARKER_ROOM = 2 * (OVERFLOW_REC + OVERFLOW_REC - 1)

CHANNELS: tuple[str, ...] = ("a", "b", "c")
UNKNOWN: tuple[str, ...] = ("zz", "A")
MAX_SUBS = 7

#: Set to True to tolerate (narrowly) owed markers written into a ring its
#: consumer closed: a fixed bug (test_no_marker_into_a_closed_ring_*).
CLOSED_RINGS_MAY_GET_MARKERS = False
#: Set to True to tolerate a "block" ring waiting for room for a record
#: larger than its maximum: a fixed bug
#: (test_block_ring_drops_a_record_that_never_fits_at_once).
TOO_BIG_MAY_BLOCK = False


def rec_size(length: int) -> int:
    """Bytes a record with a ``length``-byte payload occupies in a ring."""
    return (REC_HDR + length + 7) & ~7


def reserve_for(capacity: int, nchannels: int) -> int:
    """The reserve the engine passes (``SubSpec.reserve``)."""
    return min(capacity // 4, 64 * nchannels + 64)


def payload_for(seq: int, length: int) -> bytes:
    """Payload of notification ``seq``: its number, then seeded bytes."""
    head = b"%08d:" % seq
    return (head + random.Random(seq).randbytes(max(0, length - len(head))))[:length]


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def clear_eventfd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)


# ---------------------------------------------------------------------------
# the model


@dataclass
class Candidate:
    """A notification routed to an active target: delivered or lost there."""

    seq: int
    op: int      # operation that served it (route, or the flush that retried it)
    lost: bool


@dataclass
class Track:
    """One channel of one subscription, as its consumer must see it."""

    acts: list[int] = field(default_factory=list)      # op of each activation
    listen: list[bool] = field(default_factory=list)   # it owes "listen"
    cands: list[Candidate] = field(default_factory=list)
    active: bool = False
    covered: int = 0    # activations covered by the reason markers read
    resolved: int = 0   # candidates read or counted by overflow markers read
    counted: int = 0    # sum of the overflow markers read

    def acts_before(self, op: int) -> int:
        return bisect.bisect_left(self.acts, op)

    def acts_until(self, op: int) -> int:
        return bisect.bisect_right(self.acts, op)

    def state(self) -> ChannelState:
        if self.active:
            return ChannelState.LIVE
        return ChannelState.LAPSED if self.acts else ChannelState.NEW


@dataclass
class SubModel:
    key: int
    rsub: RouterSub
    ring: Ring
    channels: tuple[str, ...]
    block: bool
    reserve: int
    tracks: list[Track]
    freed: bool = False
    closed: bool = False
    marker_ops: list[int] = field(default_factory=list)  # op of each marker written
    markers_read: int = 0
    notifications_read: int = 0
    last_op_read: int = 0

    @property
    def name(self) -> str:
        policy = "block" if self.block else "drop"
        return f"sub{self.key}({policy}, {self.ring.capacity}, {self.channels})"

    @property
    def free(self) -> int:
        return self.ring.capacity - self.ring.used

    def ample_for(self, length: int) -> int:
        """Free bytes that certainly make room for a record and all markers."""
        return (self.reserve + 2 * rec_size(length)
                + len(self.channels) * MARKER_ROOM + self.ring.capacity // 4)


@dataclass
class Stash:
    """The notification a full "block" ring kept aside."""

    seq: int
    channel: str
    payload: bytes
    served: set[tuple[int, int]]   # targets (sub key, index) already served


@dataclass
class Observed:
    """What one router call did to every ring."""

    result: Any
    used_before: dict[int, int]
    written: dict[int, int]
    dropped: dict[int, int]
    markers: dict[int, int]


# ---------------------------------------------------------------------------
# the state machine

CAPACITIES = st.sampled_from([4096, 8192])
CHANNEL_SETS = st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3, unique=True)
#: Routed channels: mostly subscribed ones, sometimes one nobody listens to.
ROUTED = st.sampled_from(CHANNELS + CHANNELS + UNKNOWN)
SIZE_KINDS = ("tiny", "tiny", "small", "small", "small", "medium", "max4k", "max8k")


def length_for(kind: str, n: int) -> int:
    return {
        "tiny": n % 24,
        "small": 24 + n % 200,
        "medium": 224 + n % 1200,
        "max4k": 2032 - 12 + n % 20,    # around a 4 KiB ring's max payload
        "max8k": 4080 - 12 + n % 20,    # around an 8 KiB ring's max payload
    }[kind]


class RouterMachine(RuleBasedStateMachine):
    """Drive a real Router and its rings against an observational model."""

    def __init__(self) -> None:
        super().__init__()
        self.router = Router()
        self.pfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.subs: list[SubModel] = []
        self.op = 0
        self.seq = 0
        self.received = 0
        self.payloads: dict[int, bytes] = {}
        self.stash: Stash | None = None
        self.blocker: SubModel | None = None

    # -- helpers ---------------------------------------------------------
    def _pick(self, pick: int, ok: Callable[[SubModel], bool]) -> SubModel:
        subs = [s for s in self.subs if ok(s)]
        return subs[pick % len(subs)]

    def _run(self, call: Callable[[], Any]) -> Observed:
        """Make one router call, attribute every counter change to it."""
        self.op += 1
        before = {s.key: s.ring.stats() for s in self.subs}
        used_before = {s.key: s.ring.used for s in self.subs}
        counters = self.router.counters()
        result = call()
        obs = Observed(result, used_before, {}, {}, {})
        for s in self.subs:
            written, delivered, dropped, markers = (
                a - b for a, b in zip(s.ring.stats(), before[s.key], strict=True))
            assert delivered == 0
            assert written in (0, 1) and dropped in (0, 1) and markers >= 0
            if s.freed:
                assert (written, dropped, markers) == (0, 0, 0), \
                    f"{s.name}: written to after free()"
            if s.closed:
                assert (written, dropped) == (0, 0), \
                    f"{s.name}: notification routed into a closed ring"
                if not CLOSED_RINGS_MAY_GET_MARKERS:
                    assert markers == 0, f"{s.name}: marker written after close"
            s.marker_ops.extend([self.op] * markers)
            obs.written[s.key] = written
            obs.dropped[s.key] = dropped
            obs.markers[s.key] = markers
        now = self.router.counters()
        assert now.dropped - counters.dropped == sum(obs.dropped.values())
        assert now.markers - counters.markers == sum(obs.markers.values())
        return obs

    def _targets(self, channel: str) -> list[tuple[SubModel, int]]:
        """Registered targets of ``channel`` in fan-out (attach) order."""
        return [(s, s.channels.index(channel)) for s in self.subs
                if not s.freed and channel in s.channels]

    def _serve(self, seq: int, channel: str, served: set[tuple[int, int]],
               obs: Observed) -> tuple[SubModel | None, set[int]]:
        """Check one pass of ``route_seq`` over the targets of ``channel``.

        Returns the target that blocked (or None) and the subscriptions
        that were delivered to (the only ones a route may write markers to).
        """
        length = len(self.payloads[seq])
        blocker: SubModel | None = None
        touched: set[int] = set()
        for s, idx in self._targets(channel):
            t = s.tracks[idx]
            took = (obs.written[s.key], obs.dropped[s.key])
            if not t.active or (s.key, idx) in served:
                assert took == (0, 0), f"{s.name}: served twice or while inactive"
                continue
            if blocker is not None:
                assert took == (0, 0), f"{s.name}: served after a blocked target"
                continue
            if s.closed:
                assert took == (0, 0)
                served.add((s.key, idx))
                continue
            touched.add(s.key)
            too_big = length > s.ring.max_payload
            if took == (0, 0):
                assert s.block, f"{s.name}: a 'drop' ring neither took nor dropped"
                assert not too_big or (
                    TOO_BIG_MAY_BLOCK and obs.used_before[s.key] > 0
                ), f"{s.name}: blocked by a record that never fits"
                assert obs.used_before[s.key] == 0 or \
                    s.ring.capacity - obs.used_before[s.key] < s.ample_for(length), \
                    f"{s.name}: blocked with ample room"
                blocker = s
                continue
            assert took in ((1, 0), (0, 1)), f"{s.name}: {took}"
            lost = took == (0, 1)
            if too_big:
                assert lost, f"{s.name}: took a record larger than its maximum"
            elif lost:
                assert not s.block, f"{s.name}: a 'block' ring lost a notification"
                room = s.ring.capacity - obs.used_before[s.key]
                assert room < s.ample_for(length), \
                    f"{s.name}: dropped with {room} bytes free"
            else:
                # Notifications leave the reserve free, unless the ring was
                # empty when the record was written (nothing to protect).
                reserve = min(s.reserve, s.ring.capacity // 2)
                assert s.free >= reserve or (
                    obs.used_before[s.key] == 0 and obs.markers[s.key] == 0
                ), f"{s.name}: a notification ate into the marker reserve"
            t.cands.append(Candidate(seq, self.op, lost))
            served.add((s.key, idx))
        return blocker, touched

    def _route(self, channel: str, length: int) -> None:
        self.seq += 1
        seq = self.seq
        payload = payload_for(seq, length)
        self.payloads[seq] = payload
        raw = channel.encode()
        self.received += 1
        obs = self._run(lambda: self.router.route(raw, seq, payload))
        served: set[tuple[int, int]] = set()
        blocker, touched = self._serve(seq, channel, served, obs)
        for s in self.subs:
            if s.key not in touched:
                assert obs.markers[s.key] == 0, f"{s.name}: marker from another route"
        assert obs.result is (blocker is not None)
        assert self.router.blocked is (blocker is not None)
        if blocker is not None:
            self.stash = Stash(seq, channel, payload, served)
            self.blocker = blocker

    def _flush(self) -> None:
        """Like the engine after a wake-up: clear the fd, then flush."""
        clear_eventfd(self.pfd)
        stash, blocker_before = self.stash, self.blocker
        obs = self._run(self.router.flush)
        if stash is None:
            assert obs.result is False
            assert not any(obs.written.values()) and not any(obs.dropped.values())
            registered = [s for s in self.subs if not s.freed]
            if all(obs.used_before[s.key] == 0 and not s.closed for s in registered):
                assert not self.router.owing, "markers still owed to empty rings"
            return
        blocker, _ = self._serve(stash.seq, stash.channel, stash.served, obs)
        assert obs.result is (blocker is not None)
        assert self.router.blocked is (blocker is not None)
        if blocker is None:
            self.stash = self.blocker = None
            return
        self.blocker = blocker
        if blocker is blocker_before and obs.used_before[blocker.key] == 0:
            # An empty ring may block only behind markers just written to it.
            assert obs.markers[blocker.key] > 0, f"{blocker.name}: stalled while empty"

    def _consume(self, s: SubModel, max_records: int,
                 as_objects: bool) -> list[RawRecord]:
        if as_objects:
            recs = [self._raw(s, n) for n in s.ring.drain(s.channels, max_records)]
        else:
            recs = s.ring.drain_raw(max_records)
        for rec in recs:
            self._check_record(s, rec)
        assert s.ring.stats()[1] == s.notifications_read
        return recs

    @staticmethod
    def _raw(s: SubModel, n: Any) -> RawRecord:
        """A drained ``Notification`` back as the raw record it must be."""
        chan = s.channels.index(n.channel)
        if n.reason is None:
            assert n.connection_reset is False and n.dropped == 0
            return RawRecord(Kind.NOTIFY, 0, chan, n.pid, n.payload)
        assert n.connection_reset is True and n.payload == "" and n.pid == 0
        reason = {"listen": Reason.LISTEN, "reconnect": Reason.RECONNECT,
                  "overflow": Reason.OVERFLOW}[n.reason]
        if reason == Reason.OVERFLOW:
            return RawRecord(Kind.MARKER, reason, chan, 0, struct.pack("<Q", n.dropped))
        assert n.dropped == 0
        return RawRecord(Kind.MARKER, reason, chan, 0, b"")

    def _check_record(self, s: SubModel, rec: RawRecord) -> None:
        assert 0 <= rec.chan < len(s.channels), f"{s.name}: bad channel index"
        t = s.tracks[rec.chan]
        where = f"{s.name} channel {s.channels[rec.chan]!r}"
        if rec.kind == Kind.NOTIFY:
            assert t.resolved < len(t.cands), f"{where}: unexpected {rec}"
            c = t.cands[t.resolved]
            assert not c.lost, \
                f"{where}: #{rec.pid} read while #{c.seq} was lost and not counted"
            assert rec.pid == c.seq, f"{where}: #{rec.pid} read, #{c.seq} expected"
            expected = self.payloads[c.seq]
            if isinstance(rec.payload, str):
                expected_text = expected.decode("utf-8", "replace")
                assert rec.payload == expected_text, f"{where}: payload of #{c.seq}"
            else:
                assert rec.payload == expected, f"{where}: payload of #{c.seq}"
            assert t.acts_before(c.op) == t.covered, \
                f"{where}: #{c.seq} read before the marker of its activation"
            t.resolved += 1
            s.notifications_read += 1
            op = c.op
        else:
            assert rec.kind == Kind.MARKER and rec.pid == 0, f"{where}: {rec}"
            op = s.marker_ops[s.markers_read]
            s.markers_read += 1
            if rec.reason == Reason.OVERFLOW:
                self._check_overflow(t, rec, op, where)
            else:
                assert rec.reason in (Reason.LISTEN, Reason.RECONNECT), \
                    f"{where}: {rec}"
                assert rec.payload == b"", f"{where}: {rec}"
                k = t.acts_until(op)
                assert k > t.covered, f"{where}: {Reason(rec.reason).name} marker " \
                    "without an activation"
                want = Reason.LISTEN if any(t.listen[t.covered:k]) else Reason.RECONNECT
                assert rec.reason == want, \
                    f"{where}: {Reason(rec.reason).name} marker, {want.name} owed"
                t.covered = k
        assert op >= s.last_op_read, f"{s.name}: records out of write order"
        s.last_op_read = op

    @staticmethod
    def _check_overflow(t: Track, rec: RawRecord, op: int, where: str) -> None:
        assert len(rec.payload) == 8, f"{where}: {rec}"
        n = struct.unpack("<Q", rec.payload)[0]
        assert n >= 1, f"{where}: overflow marker counting nothing"
        gap = t.cands[t.resolved:t.resolved + n]
        assert len(gap) == n and all(c.lost for c in gap), \
            f"{where}: overflow marker of {n} does not stand at a gap of {n}"
        assert all(c.op <= op for c in gap), f"{where}: drop counted before it happened"
        # It counts every drop owed when it was written (a drop in the same
        # router call may come before or after it).
        owed = sum(1 for c in t.cands[t.resolved:] if c.op < op)
        assert n in (owed, owed + 1), f"{where}: counts {n}, {owed} were owed"
        for c in gap:
            assert t.acts_before(c.op) <= t.covered, \
                f"{where}: drop of #{c.seq} counted before its activation's marker"
        t.resolved += n
        t.counted += n

    def _drain_all(self) -> None:
        for s in self.subs:
            while self._consume(s, 1 << 20, as_objects=False):
                pass
            assert s.ring.used == 0

    # -- rules -----------------------------------------------------------
    @initialize(specs=st.lists(st.tuples(CAPACITIES, st.booleans(), CHANNEL_SETS),
                               min_size=1, max_size=4))
    def first_subs(self, specs: list[tuple[int, bool, list[str]]]) -> None:
        for capacity, block, channels in specs:
            self.add_sub(capacity, block, channels, live="all")

    @precondition(lambda self: len(self.subs) < MAX_SUBS)
    @rule(capacity=CAPACITIES, block=st.booleans(), channels=CHANNEL_SETS,
          live=st.sampled_from(["all", "first", "none"]))
    def add_sub(self, capacity: int, block: bool, channels: list[str],
                live: str) -> None:
        names = tuple(channels)
        ring = Ring(capacity, producer_wfd=self.pfd)
        reserve = reserve_for(capacity, len(names))
        rsub = self.router.add(ring, names, block=block, reserve=reserve)
        s = SubModel(len(self.subs), rsub, ring, names, block, reserve,
                     [Track() for _ in names])
        self.subs.append(s)
        # Added while connected, the channels already LISTENed on are in
        # effect at once (the engine passes RECONNECT; the first marker is
        # "listen" anyway); the others follow when the server confirms.
        for idx in range({"all": len(names), "first": 1, "none": 0}[live]):
            self._activate(s, idx, Reason.RECONNECT)

    @precondition(lambda self: any(not s.freed for s in self.subs))
    @rule(pick=st.integers(0, 63), idx=st.integers(0, 2),
          reason=st.sampled_from([Reason.RECONNECT, Reason.LISTEN]),
          new_in_fullest=st.booleans())
    def activate(self, pick: int, idx: int, reason: Reason,
                 new_in_fullest: bool) -> None:
        """LISTEN confirmed for one channel of one subscription; or steer to
        a channel never activated, in the fullest ring that has one (where
        its "listen" marker may have to wait)."""
        fresh = [s for s in self.subs
                 if not s.freed and any(not t.acts for t in s.tracks)]
        if new_in_fullest and fresh:
            s = min(fresh, key=lambda s: (s.free, s.key))
            idx = next(i for i, t in enumerate(s.tracks) if not t.acts)
            self._activate(s, idx, reason)
            return
        s = self._pick(pick, lambda s: not s.freed)
        self._activate(s, idx % len(s.channels), reason)

    def _activate(self, s: SubModel, idx: int, reason: Reason) -> None:
        t = s.tracks[idx]
        room = s.free
        obs = self._run(lambda: s.rsub.activate(idx, reason))
        for other in self.subs:
            assert obs.written[other.key] == obs.dropped[other.key] == 0
            if other is not s:
                assert obs.markers[other.key] == 0
        # The first marker of a channel is always "listen".
        t.listen.append(not t.acts or reason == Reason.LISTEN)
        t.acts.append(self.op)
        t.active = True
        if not s.closed and room >= len(s.channels) * MARKER_ROOM + OVERFLOW_REC:
            # Markers have their reserve: written at once when they fit.
            assert obs.result is False, f"{s.name}: marker owed with {room} free"
            assert obs.markers[s.key] >= 1

    @precondition(lambda self: self.stash is None)
    @rule(channel=ROUTED,
          size=st.sampled_from(SIZE_KINDS), n=st.integers(0, 1 << 16))
    def route(self, channel: str, size: str, n: int) -> None:
        self._route(channel, length_for(size, n))

    @precondition(lambda self: self.stash is None)
    @rule(channel=st.sampled_from(CHANNELS), count=st.integers(2, 80),
          size=st.sampled_from(["tiny", "small", "small", "medium"]),
          n=st.integers(0, 1 << 16))
    def route_burst(self, channel: str, count: int, size: str, n: int) -> None:
        for i in range(count):
            if self.stash is not None:
                break   # the engine stops reading the socket
            self._route(channel, length_for(size, n + 7919 * i))

    @precondition(lambda self: bool(self.subs))
    @rule(pick=st.integers(0, 63), max_records=st.integers(1, 8),
          as_objects=st.booleans())
    def consume(self, pick: int, max_records: int, as_objects: bool) -> None:
        s = self._pick(pick, lambda s: True)
        self._consume(s, max_records, as_objects)
        b = self.blocker
        if b is not None and not b.freed and not b.closed and b.ring.used == 0:
            # A drained blocking ring must wake the selector thread.
            assert readable(self.pfd), f"{b.name}: drained, producer not woken"

    @rule()
    def flush(self) -> None:
        self._flush()

    @rule(reconnect=st.sampled_from(["all", "all", "announced", "no"]),
          flaps=st.integers(1, 16))
    def connection_lost(self, reconnect: str, flaps: int) -> None:
        """The connection drops (and comes back), ``flaps`` times in a row.

        On reconnect every channel is activated again, or only those that
        were announced before (the others' LISTEN is confirmed later, in
        another batch; see the ``activate`` rule).
        """
        for _ in range(flaps if reconnect != "no" else 1):
            self._connection_lost(reconnect)

    def _connection_lost(self, reconnect: str = "all") -> None:
        obs = self._run(self.router.deactivate_all)
        assert not any(obs.written.values()) and not any(obs.dropped.values())
        assert not any(obs.markers.values())
        for s in self.subs:
            for t in s.tracks:
                t.active = False
        # The engine flushes at once: a kept-aside notification belongs to the
        # old connection, and with every target inactive it is discarded.
        self.stash = self.blocker = None
        self._flush()
        assert not self.router.blocked
        if reconnect != "no":
            # LISTEN confirmed on the new connection: the targets of the
            # confirmed channels are activated again, in fan-out order.
            for s in self.subs:
                if not s.freed:
                    for idx, t in enumerate(s.tracks):
                        if reconnect == "all" or t.acts:
                            self._activate(s, idx, Reason.RECONNECT)

    @precondition(lambda self: any(not s.freed for s in self.subs))
    @rule(pick=st.integers(0, 63), close=st.booleans(), now=st.integers(0, 1))
    def free_sub(self, pick: int, close: bool, now: int) -> None:
        """Free a subscription (and close its ring, as the engine does)."""
        if now:         # now and then only: subscriptions are few
            return
        s = self._pick(pick, lambda s: not s.freed)
        obs = self._run(s.rsub.free)
        assert not any(obs.written.values()) and not any(obs.dropped.values())
        assert not any(obs.markers.values())
        s.freed = True
        s.rsub.free()   # idempotent
        if self.blocker is s:
            self.blocker = None
        if close:       # what the engine does after free()
            s.ring.close()
            s.closed = True

    @precondition(lambda self: any(not s.closed for s in self.subs))
    @rule(pick=st.integers(0, 63), now=st.integers(0, 1))
    def close_ring(self, pick: int, now: int) -> None:
        """The consumer unlistens: its ring closes before the router knows."""
        if now:         # now and then only
            return
        s = self._pick(pick, lambda s: not s.closed)
        s.ring.close()
        s.closed = True

    @rule(now=st.integers(0, 3))
    def catch_up(self, now: int) -> None:
        if now == 0:    # now and then only: full rings are the interesting case
            self.settle()

    def settle(self) -> None:
        """The consumers catch up: drain everything and flush (as the engine
        does on every loop while something is owed) until nothing is."""
        for _ in range(10):
            self._drain_all()
            self._flush()
            if self.stash is None and not self.router.owing:
                break
        else:
            assert self.stash is None, "the router stays blocked"
            # Only a closed ring may keep a debt (if markers stop going there).
            assert any(s.closed for s in self.subs if not s.freed), \
                "markers stay owed"
        self._drain_all()
        for s in self.subs:
            assert s.markers_read == len(s.marker_ops)
            assert s.notifications_read == s.ring.stats()[0]
            if s.freed or s.closed:
                continue
            for name, t in zip(s.channels, s.tracks, strict=True):
                where = f"{s.name} channel {name!r}"
                assert t.covered == len(t.acts), f"{where}: activation without marker"
                assert t.resolved == len(t.cands), f"{where}: drops never counted"
            assert s.ring.stats()[2] == sum(t.counted for t in s.tracks)
        if all(not s.closed for s in self.subs if not s.freed):
            assert not self.router.owing

    # -- invariants ------------------------------------------------------
    @invariant()
    def counters_and_states(self) -> None:
        received, dropped, markers = self.router.counters()
        assert received == self.received
        assert dropped == sum(s.ring.stats()[2] for s in self.subs)
        assert markers == sum(s.ring.stats()[3] for s in self.subs)
        assert self.router.blocked is (self.stash is not None)
        for s in self.subs:
            lost = sum(c.lost for t in s.tracks for c in t.cands)
            assert s.ring.stats()[2] == lost
            assert s.ring.stats()[3] == len(s.marker_ops)
            if not s.freed:
                for idx, t in enumerate(s.tracks):
                    assert s.rsub.state(idx) == t.state(), f"{s.name} channel {idx}"

    def teardown(self) -> None:
        try:
            self.settle()
        finally:
            for s in self.subs:
                s.rsub.free()
            os.close(self.pfd)


TestRouterStateMachine = RouterMachine.TestCase
TestRouterStateMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------
# deterministic cases


def test_drops_owed_across_a_reconnect_are_counted_after_its_marker() -> None:
    """When only the "reconnect" marker fits, the overflow marker for drops
    from before the reconnect follows it (pglf_sub_activate); run through
    the model, which accepts that and nothing looser."""
    m = RouterMachine()
    try:
        m.add_sub(4096, False, ["a"], live="all")
        s = m.subs[0]
        while s.ring.stats()[2] == 0:      # fill until one is dropped
            m._route("a", 0)
        m._consume(s, 2, as_objects=False)
        m._flush()                         # its overflow marker is paid
        m._route("a", 0)
        while s.free > REASON_REC:         # a flapping connection eats the reserve
            m._connection_lost()
        assert s.free == REASON_REC
        m._route("a", 1)                   # dropped, owed
        m._connection_lost()               # only the "reconnect" marker fits
        m.counters_and_states()
        records = m._consume(s, 1 << 20, as_objects=False)
        m._flush()
        records += m._consume(s, 1 << 20, as_objects=True)
        assert [(r.kind, r.reason) for r in records[-2:]] == [
            (Kind.MARKER, Reason.RECONNECT), (Kind.MARKER, Reason.OVERFLOW)]
        assert records[-1].payload == struct.pack("<Q", 1)
    finally:
        m.teardown()


def test_reconnect_merges_into_an_owed_listen_marker() -> None:
    """A channel first activated when not even a marker fits owes "listen";
    a reconnect before it is written merges into it and it stays "listen"
    (run through the model, which checks every record)."""
    m = RouterMachine()
    try:
        m.add_sub(4096, False, ["a", "b"], live="first")
        s = m.subs[0]
        while s.ring.stats()[2] == 0:        # fill with "a" until one is dropped
            m._route("a", 8)
        while s.free >= REASON_REC:          # "a" reconnects eat the reserve
            m._connection_lost("announced")
        assert s.tracks[1].acts == []
        assert s.rsub.state(1) == ChannelState.NEW
        m._activate(s, 1, Reason.RECONNECT)  # "b" confirmed: its "listen" is owed
        m._connection_lost("announced")      # "b" reconnects before it is written
        assert len(s.tracks[1].acts) == 2
        records = m._consume(s, 1 << 20, as_objects=True)
        m._flush()
        records += m._consume(s, 1 << 20, as_objects=False)
        b_markers = [r.reason for r in records if r.chan == 1]
        assert b_markers == [Reason.LISTEN]
    finally:
        m.teardown()


def _overflow_counts(records: list[RawRecord]) -> list[int]:
    return [struct.unpack("<Q", r.payload)[0] for r in records
            if r.kind == Kind.MARKER and r.reason == Reason.OVERFLOW]


@pytest.mark.parametrize("length", [40, 200, 400, 900])
def test_stalled_consumer_gets_one_overflow_marker_per_gap(length: int) -> None:
    """The slack rule: no run of dropped=1 markers while nobody drains."""
    router = Router()
    ring = Ring(4096)
    sub = router.add(ring, ("a",), block=False, reserve=reserve_for(4096, 1))
    assert sub.activate(0, Reason.LISTEN) is False
    sent = 0
    while ring.stats()[2] == 0:
        sent += 1
        router.route(b"a", sent, payload_for(sent, length))
    for _ in range(200):           # the consumer is stalled
        sent += 1
        assert router.route(b"a", sent, payload_for(sent, length)) is False
        assert ring.stats()[3] == 1, "overflow markers while nobody drains"
    records = ring.drain_raw(10_000)
    assert router.flush() is False
    records += ring.drain_raw(10_000)
    written, _, dropped, _ = ring.stats()
    assert dropped == 201
    assert _overflow_counts(records) == [201]
    assert records[-1].kind == Kind.MARKER   # the gap is at the end
    notified = [r.pid for r in records if r.kind == Kind.NOTIFY]
    assert notified == list(range(1, written + 1))
    sub.free()


def test_block_ring_keeps_the_notification_aside() -> None:
    router = Router()
    ring = Ring(4096)
    sub = router.add(ring, ("a",), block=True, reserve=reserve_for(4096, 1))
    sub.activate(0, Reason.LISTEN)
    seq = 0
    while True:
        seq += 1
        if router.route(b"a", seq, payload_for(seq, 300)):
            break
    assert router.blocked and router.flush() is True
    records = ring.drain_raw(10_000)
    assert router.flush() is False and not router.blocked
    records += ring.drain_raw(10_000)
    assert [r.pid for r in records if r.kind == Kind.NOTIFY] == list(range(1, seq + 1))
    assert ring.stats()[2] == 0
    sub.free()


def test_block_ring_drops_a_record_that_never_fits_at_once() -> None:
    router = Router()
    ring = Ring(4096)
    sub = router.add(ring, ("a",), block=True, reserve=reserve_for(4096, 1))
    assert sub.activate(0, Reason.LISTEN) is False   # "listen" marker buffered
    too_big = b"x" * ring.capacity                    # PostgreSQL allows 7,999
    assert router.route(b"a", 1, too_big) is False    # dropped: it never fits
    assert ring.stats()[2] == 1                       # counted for its marker
    assert router.route(b"a", 2, too_big) is False    # dropped too, no block
    assert ring.stats()[2] == 2
    sub.free()


def test_overflow_marker_for_a_record_that_never_fits_is_written_at_once() -> None:
    router = Router()
    ring = Ring(4096)
    sub = router.add(ring, ("a",), block=False, reserve=reserve_for(4096, 1))
    assert sub.activate(0, Reason.LISTEN) is False
    assert router.route(b"a", 1, b"x" * ring.capacity) is False
    assert ring.stats()[2] == 1
    assert [r.reason for r in ring.drain_raw(10)] == [Reason.LISTEN, Reason.OVERFLOW]
    sub.free()


def _closed_with_owed_overflow() -> tuple[Router, Ring, RouterSub]:
    """A "drop" ring that owes an overflow marker, closed by its consumer."""
    router = Router()
    ring = Ring(4096)
    sub = router.add(ring, ("a",), block=False, reserve=reserve_for(4096, 1))
    sub.activate(0, Reason.LISTEN)
    seq = 0
    while ring.stats()[2] == 0:
        seq += 1
        router.route(b"a", seq, payload_for(seq, 200))
    assert router.owing
    ring.close()
    assert len(ring.drain_raw(10_000)) > 0   # what was buffered is still read
    return router, ring, sub


def test_no_marker_into_a_closed_ring_on_flush() -> None:
    router, ring, sub = _closed_with_owed_overflow()
    markers = ring.stats()[3]
    router.flush()
    assert ring.stats()[3] == markers
    assert ring.drain_raw(10) == []
    sub.free()


def test_no_marker_into_a_closed_ring_on_activate() -> None:
    router = Router()
    ring = Ring(4096)
    sub = router.add(ring, ("a",), block=False, reserve=reserve_for(4096, 1))
    ring.close()
    sub.activate(0, Reason.LISTEN)
    assert ring.stats()[3] == 0
    assert ring.drain_raw(10) == []
    sub.free()


def test_activate_reports_its_own_marker() -> None:
    router = Router()
    ring = Ring(4096)
    sub = router.add(ring, ("a", "b"), block=False, reserve=reserve_for(4096, 2))
    sub.activate(0, Reason.LISTEN)
    sub.activate(1, Reason.LISTEN)
    seq = 0
    while ring.stats()[2] == 0:       # fill with "b" until one is dropped
        seq += 1
        router.route(b"b", seq, b"x" * 8)
    # Reconnect markers (the consumer is stalled) eat the reserve.
    while ring.free_bytes() >= OVERFLOW_REC:
        router.deactivate_all()
        router.flush()
        sub.activate(0, Reason.RECONNECT)
        sub.activate(1, Reason.RECONNECT)
    assert ring.free_bytes() >= REASON_REC
    seq += 1
    router.route(b"b", seq, b"y")     # dropped: "b" owes an overflow marker
    assert ring.stats()[2] == 2 and router.owing
    router.deactivate_all()
    router.flush()
    markers = ring.stats()[3]
    still_owed = sub.activate(0, Reason.RECONNECT)
    assert ring.stats()[3] == markers + 1        # the "reconnect" of "a" is written
    assert ring.drain_raw(10_000)[-1][:3] == (Kind.MARKER, Reason.RECONNECT, 0)
    assert still_owed is False
