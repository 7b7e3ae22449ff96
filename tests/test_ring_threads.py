"""Two-thread stress tests of the C record ring (csrc/pglf_ring.c).

* A Python producer thread and a Python consumer thread share a 64 KiB ring
  through cffi: sequence-numbered payloads of random sizes carrying a
  CRC-32, the producer sleeping on its eventfd when the ring is full and
  waking the consumer after each batch, the consumer sleeping in ``wait()``
  and draining with ``drain_raw()`` and ``drain()`` in turn.  Order and
  checksums are verified for every record.
* The C stress program csrc/tests/ring_stress.c is compiled with gcc and
  run for 10,000,000 records (and once briefly with another seed).
"""

from __future__ import annotations

import os
import random
import re
import select
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from pglisten_fast._records import Notification
from pglisten_fast._ring import Kind, RawRecord, Ring, Status

ROOT = Path(__file__).resolve().parent.parent
RING_CAP = 64 * 1024
N_RECORDS = 300_000
WAIT_S = 10.0  # a wake-up that takes this long was lost
PREFIX = struct.Struct("<QI")  # sequence number, CRC-32 of (seq bytes + body)
CHANNELS: tuple[str, ...] = ("c0", "c1", "c2", "c3")
REC_HDR = 16


def rec_size(length: int) -> int:
    return (REC_HDR + length + 7) & ~7


def make_payload(seq: int, body: bytes) -> bytes:
    seq_bytes = seq.to_bytes(8, "little")
    return PREFIX.pack(seq, zlib.crc32(body, zlib.crc32(seq_bytes))) + body


def check_payload(expected_seq: int, payload: bytes) -> None:
    seq, crc = PREFIX.unpack_from(payload)
    if seq != expected_seq:
        raise AssertionError(f"out of order: got seq {seq}, expected {expected_seq}")
    body = payload[PREFIX.size :]
    computed = zlib.crc32(body, zlib.crc32(payload[:8]))
    if computed != crc:
        raise AssertionError(
            f"seq {seq}: checksum {computed:08x} != stored {crc:08x} "
            f"(len {len(payload)})"
        )


class Worker:
    """A thread that keeps its exception for the test to re-raise."""

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self._fn = fn
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # re-raised by the test
            self.error = exc

    def start(self) -> None:
        self.thread.start()


class Producer:
    def __init__(self, ring: Ring, pfd: int, n: int, seed: int) -> None:
        self.ring = ring
        self.pfd = pfd
        self.n = n
        self.rng = random.Random(seed)
        self.pool = self.rng.randbytes(1 << 17)
        self.max_body = ring.max_payload - PREFIX.size
        self.full = 0
        self.sleeps = 0

    def body_length(self) -> int:
        r = self.rng.random()
        if r < 0.002:
            return self.rng.randint(0, self.max_body)
        if r < 0.0025:
            return self.max_body
        return self.rng.randint(0, 300 - PREFIX.size)

    def wait_for_space(self, need: int) -> None:
        self.full += 1
        self.ring.wake_consumer()
        if self.ring.producer_wait_arm(need):
            return
        self.sleeps += 1
        readable, _, _ = select.select([self.pfd], [], [], WAIT_S)
        if not readable:
            raise AssertionError(
                f"producer: no wake-up within {WAIT_S} s (used {self.ring.used})"
            )
        os.read(self.pfd, 8)

    def run(self) -> None:
        ring, pool, rng = self.ring, self.pool, self.rng
        seq = 0
        while seq < self.n:
            for _ in range(min(rng.randint(1, 64), self.n - seq)):
                length = self.body_length()
                off = rng.randrange(len(pool) - length + 1)
                payload = make_payload(seq, pool[off : off + length])
                chan, pid = seq % len(CHANNELS), seq & 0x7FFFFFFF
                while (rc := ring.write(payload, chan=chan, pid=pid)) == Status.FULL:
                    self.wait_for_space(2 * rec_size(len(payload)))
                if rc != Status.OK:
                    raise AssertionError(f"producer: write returned {rc} at seq {seq}")
                seq += 1
            ring.wake_consumer()
        ring.close()


class Consumer:
    def __init__(self, ring: Ring, n: int) -> None:
        self.ring = ring
        self.n = n
        self.next = 0
        self.sleeps = 0
        self.via_raw = 0
        self.via_notifications = 0

    def check_raw(self, rec: RawRecord) -> None:
        seq = self.next
        expected = (Kind.NOTIFY, 0, seq % len(CHANNELS), seq & 0x7FFFFFFF)
        if (rec.kind, rec.reason, rec.chan, rec.pid) != expected:
            raise AssertionError(f"seq {seq}: header {rec[:4]} != {expected}")
        check_payload(seq, rec.payload)
        self.next += 1

    def check_notification(self, note: Notification) -> None:
        seq = self.next
        if (note.channel, note.pid, note.connection_reset) != (
            CHANNELS[seq % len(CHANNELS)],
            seq & 0x7FFFFFFF,
            False,
        ):
            raise AssertionError(f"seq {seq}: unexpected {note!r:.200}")
        # latin-1 maps bytes to code points one to one: nothing is lost.
        payload = note.payload
        check_payload(seq, payload if isinstance(payload, bytes)
                      else payload.encode("latin-1"))
        self.next += 1

    def run(self) -> None:
        ring = self.ring
        turn = 0
        while True:
            turn += 1
            if turn % 3 == 2:
                # take(): drain, or sleep until records come and drain them.
                taken = ring.take(CHANNELS, 256, WAIT_S, True)
                if taken == Status.CLOSED:
                    break
                if not isinstance(taken, list):
                    raise AssertionError(
                        f"consumer: take returned {taken} at seq {self.next}")
                for note in taken:
                    self.check_notification(note)
                self.via_notifications += len(taken)
                continue
            if turn % 3:
                records = ring.drain_raw(256, 1 << 17)
                for rec in records:
                    self.check_raw(rec)
                self.via_raw += len(records)
                got = len(records)
            else:
                notes = ring.drain(CHANNELS, 256, "latin-1")
                for note in notes:
                    self.check_notification(note)
                self.via_notifications += len(notes)
                got = len(notes)
            if got:
                continue
            self.sleeps += 1
            rc = ring.wait(WAIT_S)
            if rc == Status.CLOSED:
                break
            if rc not in (Status.READY, Status.EINTR):
                raise AssertionError(f"consumer: wait returned {rc} at seq {self.next}")
        if self.next != self.n:
            raise AssertionError(f"CLOSED after {self.next} of {self.n} records")


def test_python_threads_stress() -> None:
    pfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        ring = Ring(RING_CAP, producer_wfd=pfd)
        producer = Producer(ring, pfd, N_RECORDS, seed=20240611)
        consumer = Consumer(ring, N_RECORDS)
        workers = [Worker("consumer", consumer.run), Worker("producer", producer.run)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.thread.join(120)
        elapsed = time.monotonic() - t0
        for w in workers:
            assert not w.thread.is_alive(), f"{w.thread.name} still running"
            if w.error is not None:
                raise w.error
        assert consumer.next == N_RECORDS
        assert consumer.via_raw + consumer.via_notifications == N_RECORDS
        assert consumer.via_raw > 0
        assert consumer.via_notifications > 0
        assert producer.full > 0, "the ring never filled: the test is too gentle"
        assert ring.used == 0
        assert ring.stats() == (N_RECORDS, N_RECORDS, 0, 0)
        print(
            f"{N_RECORDS} records in {elapsed:.2f} s; producer FULL {producer.full}x "
            f"(slept {producer.sleeps}), consumer slept {consumer.sleeps}x"
        )
        del ring
    finally:
        os.close(pfd)


# ---------------------------------------------------------------------------
# the C stress program


@pytest.fixture(scope="module")
def ring_stress(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    exe = tmp_path_factory.mktemp("ring_stress") / "ring_stress"
    # pglf_ring.c needs POSIX declarations (posix_memalign, clock_gettime)
    # that strict -std=c11 hides; the package build defines _GNU_SOURCE too.
    cmd = [
        gcc, "-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-pthread",
        "-I", "csrc", "csrc/tests/ring_stress.c", "csrc/pglf_ring.c", "-o", str(exe),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    return exe


def run_stress(exe: Path, *args: str, timeout: float) -> str:
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"ring_stress {args} failed:\n{proc.stdout}{proc.stderr}"
    )
    assert proc.stderr == ""
    return proc.stdout


STRESS_LINE = re.compile(
    r"^ok (?P<n>\d+) records \((?P<notify>\d+) notifications, (?P<marker>\d+) "
    r"markers, .*; (?P<drain>\d+) via drain, (?P<peek>\d+) via peek, .*"
    r"producer FULL (?P<full>\d+) times"
)


def check_stress_output(out: str, n: int) -> None:
    m = STRESS_LINE.match(out)
    assert m is not None, f"unexpected output: {out!r}"
    counts = {k: int(v) for k, v in m.groupdict().items()}
    assert counts["n"] == n
    assert counts["notify"] + counts["marker"] == n
    assert counts["drain"] + counts["peek"] == n
    assert counts["drain"] > 0
    assert counts["peek"] > 0
    assert counts["marker"] > 0
    assert counts["full"] > 0, "the ring never filled"


def test_c_ring_stress_other_seed(ring_stress: Path) -> None:
    out = run_stress(ring_stress, "300000", "0xc0ffee", timeout=60)
    check_stress_output(out, 300_000)


def test_c_ring_stress_10m(ring_stress: Path) -> None:
    out = run_stress(ring_stress, "10000000", timeout=240)
    check_stress_output(out, 10_000_000)
