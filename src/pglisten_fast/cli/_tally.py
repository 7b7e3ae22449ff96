"""The demo's check of a received burst: completeness, order, gaps, markers.

The demo sends the payloads ``0, 1, 2...`` (zero-padded numbers) in one
transaction; :class:`Tally` takes what arrives, batch by batch, and counts
what is missing, out of order, beyond the count or foreign.  An
``"overflow"`` marker accounts for the notifications dropped exactly where
it stands.
"""

from __future__ import annotations

import pglisten_fast as pgl


class Tally:
    """Checks the received stream: completeness, order, gaps, markers."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.expected = 0          # the next index we should see
        self.received = 0
        self.dropped = 0           # reported by overflow markers
        self.markers: dict[str, int] = {}
        self.order_errors: list[str] = []
        self.bad_payloads = 0
        self.extra = 0

    def add(self, batch: list[pgl.Notification]) -> None:
        """Account for one batch, in the order it was received."""
        # Fast path: no marker, exactly the next consecutive indexes.
        try:
            values = list(map(int, [n.payload for n in batch]))
        except ValueError:
            pass
        else:
            start = self.expected
            if values == list(range(start, start + len(values))):
                self.expected += len(values)
                self.received += len(values)
                return
        for n in batch:
            if n.connection_reset:
                reason = n.reason or "?"
                self.markers[reason] = self.markers.get(reason, 0) + 1
                if reason == "overflow":
                    self.dropped += n.dropped
                    self.expected += n.dropped
                continue
            try:
                value = int(n.payload)
            except ValueError:
                self.bad_payloads += 1
                continue
            if value >= self.total:
                self.extra += 1
                continue
            if value != self.expected and len(self.order_errors) < 5:
                self.order_errors.append(f"got #{value} where #{self.expected} was due")
            self.expected = value + 1
            self.received += 1

    @property
    def complete(self) -> bool:
        """Everything arrived or was reported dropped."""
        return self.received + self.dropped >= self.total
