"""Which channels to LISTEN next: desired versus confirmed channels.

Pure bookkeeping, no I/O: the selector thread asks :class:`ChannelBook`
for the next LISTEN/UNLISTEN batch, sends it as one query, and reports the
server's answer back.  Several subscriptions may want one channel; the
server sees one LISTEN, and one UNLISTEN when the last of them leaves.

A batch the server refuses (a name with no equivalent in the database
encoding, for instance) is retried one channel per query, so that one bad
channel cannot cost the others their LISTEN.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Batch", "ChannelBook"]


@dataclass(frozen=True, slots=True)
class Batch:
    """One round trip of UNLISTENs then LISTENs."""

    listen: tuple[str, ...] = ()
    unlisten: tuple[str, ...] = ()


class ChannelBook:
    """Desired channels (with how many subscriptions want each) and the
    channels the server confirmed on the current connection."""

    __slots__ = ("_inflight", "_isolate", "_server", "_wanted")

    def __init__(self) -> None:
        self._wanted: dict[str, int] = {}
        self._server: set[str] = set()
        self._isolate: set[str] = set()   # LISTEN these one per batch
        self._inflight: Batch | None = None

    # -- what subscriptions want --------------------------------------------
    def want(self, channels: Iterable[str]) -> None:
        """One more subscription wants each of ``channels``."""
        for ch in channels:
            self._wanted[ch] = self._wanted.get(ch, 0) + 1

    def unwant(self, channels: Iterable[str]) -> None:
        """One subscription of each of ``channels`` left."""
        for ch in channels:
            left = self._wanted.get(ch, 0) - 1
            if left > 0:
                self._wanted[ch] = left
            else:
                self._wanted.pop(ch, None)

    def wanted(self, channel: str) -> int:
        """How many subscriptions want ``channel``."""
        return self._wanted.get(channel, 0)

    # -- what the server has -------------------------------------------------
    @property
    def confirmed(self) -> frozenset[str]:
        """Channels LISTENed on the current connection."""
        return frozenset(self._server)

    def in_effect(self, channel: str) -> bool:
        """LISTEN on ``channel`` is in effect and no UNLISTEN is on its way."""
        batch = self._inflight
        return channel in self._server and not (
            batch is not None and channel in batch.unlisten
        )

    @property
    def inflight(self) -> Batch | None:
        """The batch sent and not yet answered."""
        return self._inflight

    def next_batch(self) -> Batch | None:
        """The next batch to send (now in flight), or None when in sync.

        :raises RuntimeError: a batch is already in flight.
        """
        if self._inflight is not None:
            raise RuntimeError("a LISTEN/UNLISTEN batch is already in flight")
        unlisten = tuple(ch for ch in self._server if ch not in self._wanted)
        listen = tuple(ch for ch in self._wanted if ch not in self._server)
        suspects = tuple(ch for ch in listen if ch in self._isolate)
        if suspects:
            unlisten, listen = (), suspects[:1]
        if not unlisten and not listen:
            return None
        self._inflight = Batch(listen=listen, unlisten=unlisten)
        return self._inflight

    def confirm(self) -> Batch:
        """The server applied the batch in flight; returns it."""
        batch = self._take_inflight()
        self._server.difference_update(batch.unlisten)
        self._server.update(batch.listen)
        self._isolate.difference_update(batch.listen)
        return batch

    def refuse(self) -> str | None:
        """The server refused the batch in flight (none of it took effect).

        Returns the channel refused on its own (its subscriptions must be
        closed: retrying will not help), or None when the batch's channels
        are to be retried one per batch.
        """
        batch = self._take_inflight()
        if len(batch.listen) == 1 and not batch.unlisten:
            self._isolate.discard(batch.listen[0])
            return batch.listen[0]
        self._isolate.update(batch.listen)
        return None

    def reset(self) -> None:
        """The connection is gone: nothing is LISTENed, nothing in flight."""
        self._server.clear()
        self._inflight = None

    def _take_inflight(self) -> Batch:
        batch = self._inflight
        if batch is None:
            raise RuntimeError("no LISTEN/UNLISTEN batch in flight")
        self._inflight = None
        return batch
