"""The selector thread's registry of subscriptions.

Which subscriptions exist, which of them listen on each channel, and their
router-side state: registering one in the router and the
:class:`~._channels.ChannelBook`, activating its channels once LISTEN is in
effect (which queues their markers), and closing them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._channels import ChannelBook
from ._commands import SubSpec
from ._ring import Reason
from ._router import ChannelState, Router, RouterSub

__all__ = ["Registry"]


class Registry:
    """Subscriptions by spec and by channel (selector thread only)."""

    __slots__ = ("_book", "_router", "_subs", "_targets")

    def __init__(self, router: Router, book: ChannelBook) -> None:
        self._router = router
        self._book = book
        self._subs: dict[SubSpec, RouterSub] = {}
        # channel -> (subscription, channel index) of every subscription on it
        self._targets: dict[str, list[tuple[SubSpec, int]]] = {}

    def add(self, spec: SubSpec, in_effect: Callable[[str], bool]) -> None:
        """Register ``spec``; channels already LISTENed (``in_effect``) are
        activated at once, with their "listen" marker."""
        if spec in self._subs or spec.ring.closed:
            return
        rsub = self._router.add(spec.ring, spec.channels, block=spec.block,
                                reserve=spec.reserve)
        self._subs[spec] = rsub
        self._book.want(spec.channels)
        for idx, ch in enumerate(spec.channels):
            self._targets.setdefault(ch, []).append((spec, idx))
            if in_effect(ch):
                rsub.activate(idx, Reason.RECONNECT)
        self._router.wake()

    def remove(self, spec: SubSpec) -> None:
        """Unregister ``spec`` (idempotent), close its ring and let it go."""
        rsub = self._subs.pop(spec, None)
        if rsub is None:
            return
        rsub.free()
        self._book.unwant(spec.channels)
        for ch in spec.channels:
            targets = [t for t in self._targets.get(ch, ()) if t[0] is not spec]
            if targets:
                self._targets[ch] = targets
            else:
                self._targets.pop(ch, None)
        spec.ring.close()
        # The router no longer writes it: its fd and memory may go once
        # the consumer is done too.
        spec.ring.detach_producer()

    def listened(self, channels: Iterable[str]) -> None:
        """LISTEN on ``channels`` took effect: activate every subscription
        channel not yet live, owing it its "listen" or "reconnect" marker."""
        for ch in channels:
            for spec, idx in self._targets.get(ch, ()):
                rsub = self._subs[spec]
                if rsub.state(idx) != ChannelState.LIVE:
                    rsub.activate(idx, Reason.RECONNECT)
        self._router.wake()

    def on_channel(self, channel: str) -> list[SubSpec]:
        """The subscriptions listening on ``channel``."""
        return [spec for spec, _idx in self._targets.get(channel, ())]

    def specs(self) -> list[SubSpec]:
        return list(self._subs)
