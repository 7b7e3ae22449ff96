"""What API threads ask of the selector thread.

A subscription is known to the selector thread only as a :class:`SubSpec`:
its channels, its ring and its overflow policy.  The selector thread ends
a subscription by closing its ring (the listener stopped, or the server
refused a channel).  Commands travel through ``Engine.submit``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._ring import Ring

__all__ = ["AddSub", "Command", "RemoveSub", "SubSpec"]


@dataclass(frozen=True, slots=True, eq=False)
class SubSpec:
    """The selector thread's view of one subscription (compared by identity)."""

    channels: tuple[str, ...]
    ring: Ring
    block: bool

    @property
    def reserve(self) -> int:
        """Bytes notifications leave free in the ring for markers."""
        return min(self.ring.capacity // 4, 64 * len(self.channels) + 64)


@dataclass(frozen=True, slots=True)
class AddSub:
    """Start routing to a subscription and LISTEN its channels."""

    spec: SubSpec


@dataclass(frozen=True, slots=True)
class RemoveSub:
    """Stop routing to a subscription; UNLISTEN channels nobody else wants."""

    spec: SubSpec


Command = AddSub | RemoveSub
