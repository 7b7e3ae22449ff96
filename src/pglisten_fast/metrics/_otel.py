"""The OpenTelemetry exporter (``opentelemetry-api``)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..listener import Listener

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
from ._common import _require, _Snapshot, _Sources, _SubTotals

# -- OpenTelemetry ---------------------------------------------------------------
#: Instrument name -> (kind, unit, description); kinds: counter, gauge, updown.
OTEL_INSTRUMENTS: dict[str, tuple[str, str, str]] = {
    "pglisten_fast.connects": (
        "counter", "{connection}",
        "Connections established by the listener (the first one included)."),
    "pglisten_fast.reconnects": (
        "counter", "{connection}", "Connections re-established after a loss."),
    "pglisten_fast.notifications.received": (
        "counter", "{notification}", "Notifications read from the server."),
    "pglisten_fast.markers": (
        "counter", "{marker}",
        "Markers (connection_reset=True) queued into subscriptions."),
    "pglisten_fast.notifications.dropped": (
        "counter", "{notification}",
        "Notifications dropped by full overflow='drop' subscriptions."),
    "pglisten_fast.connected": (
        "gauge", "1", "1 while the listener's connection is established, else 0."),
    "pglisten_fast.notification_queue.usage": (
        "gauge", "1",
        "Fraction of the server's notification queue in use "
        "(pg_notification_queue_usage()), sampled on the health-check schedule."),
    "pglisten_fast.subscription.count": (
        "updown", "{subscription}", "Open subscriptions."),
    "pglisten_fast.subscription.delivered": (
        "counter", "{notification}",
        "Notifications handed to the subscription's consumers (markers excluded)."),
    "pglisten_fast.subscription.dropped": (
        "counter", "{notification}",
        "Notifications the subscription lost because its buffer was full."),
    "pglisten_fast.subscription.markers": (
        "counter", "{marker}", "Markers queued for the subscription."),
    "pglisten_fast.subscription.buffer.usage": (
        "updown", "By", "Bytes waiting in the subscription's ring buffer."),
    "pglisten_fast.subscription.buffer.limit": (
        "updown", "By", "Capacity of the subscription's ring buffer."),
}

#: Attribute names.
LISTENER_ATTRIBUTE = "pglisten_fast.listener.name"
CHANNELS_ATTRIBUTE = "pglisten_fast.subscription.channels"

_LISTENER_VALUES: dict[str, Callable[[_Snapshot], float | None]] = {
    "pglisten_fast.connects": lambda s: s.stats.connects,
    "pglisten_fast.reconnects": lambda s: s.stats.reconnects,
    "pglisten_fast.notifications.received": lambda s: s.stats.received,
    "pglisten_fast.markers": lambda s: s.stats.markers,
    "pglisten_fast.notifications.dropped": lambda s: s.stats.dropped,
    "pglisten_fast.connected": lambda s: 1 if s.connected else 0,
    "pglisten_fast.notification_queue.usage": lambda s: s.stats.queue_usage,
    "pglisten_fast.subscription.count": lambda s: sum(
        t.count for t in s.subscriptions),
}

_SUB_VALUES: dict[str, Callable[[_SubTotals], int]] = {
    "pglisten_fast.subscription.delivered": lambda t: t.delivered,
    "pglisten_fast.subscription.dropped": lambda t: t.dropped,
    "pglisten_fast.subscription.markers": lambda t: t.markers,
    "pglisten_fast.subscription.buffer.usage": lambda t: t.buffered_bytes,
    "pglisten_fast.subscription.buffer.limit": lambda t: t.buffer_size,
}


class _OtelGroup:
    """The instruments of one meter; their callbacks read every registration."""

    def __init__(self, meter: Meter) -> None:
        self.sources = _Sources("this meter")
        for inst, (kind, unit, doc) in OTEL_INSTRUMENTS.items():
            create = {
                "counter": meter.create_observable_counter,
                "gauge": meter.create_observable_gauge,
                "updown": meter.create_observable_up_down_counter,
            }[kind]
            create(inst, callbacks=[self._callback(inst)], unit=unit, description=doc)

    def _callback(
        self, instrument: str
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        from opentelemetry.metrics import (  # noqa: PLC0415 - optional dependency
            Observation,
        )

        listener_value = _LISTENER_VALUES.get(instrument)
        sub_value = _SUB_VALUES.get(instrument)

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out: list[Observation] = []
            for snap in self.sources.snapshots():
                top = {} if snap.name is None else {LISTENER_ATTRIBUTE: snap.name}
                if listener_value is not None:
                    value = listener_value(snap)
                    if value is not None:
                        out.append(Observation(value, top))
                elif sub_value is not None:
                    for t in snap.subscriptions:
                        attrs = {**top, CHANNELS_ATTRIBUTE: t.channels}
                        out.append(Observation(sub_value(t), attrs))
            return out

        return observe


#: meter -> its instruments (OpenTelemetry ignores the callbacks of an
#: instrument created twice, so every listener of a meter shares them).
_groups: weakref.WeakKeyDictionary[Any, _OtelGroup] = weakref.WeakKeyDictionary()
_strong_groups: dict[int, tuple[Any, _OtelGroup]] = {}  # meters without weakrefs
_groups_lock = threading.Lock()
_default_meter: list[Meter] = []  # get_meter() once: a proxy meter each call


def _group_of(meter: Meter) -> _OtelGroup:
    """The instruments of ``meter``, created on first use (``_groups_lock`` held)."""
    try:
        group = _groups.get(meter)
    except TypeError:
        entry = _strong_groups.get(id(meter))
        if entry is None:
            entry = _strong_groups[id(meter)] = (meter, _OtelGroup(meter))
        return entry[1]
    if group is None:
        group = _groups[meter] = _OtelGroup(meter)
    return group


class OpenTelemetryRegistration:
    """What :func:`register_opentelemetry` returns: ``close()`` ends the reporting.

    OpenTelemetry has no way to delete an instrument: after ``close()`` (or
    once the listener is garbage-collected) the instruments stay on the
    meter and simply observe nothing for this listener.  Usable as a
    context manager.
    """

    def __init__(self, group: _OtelGroup, listener: Listener) -> None:
        self._group = group
        self._listener = weakref.ref(listener)

    @property
    def listener(self) -> Listener | None:
        """The listener, or None once it has been garbage-collected."""
        return self._listener()

    def close(self) -> None:
        """Stop reporting the listener (idempotent)."""
        listener = self._listener()
        if listener is not None:
            self._group.sources.remove(listener)

    unregister = close

    def __enter__(self) -> OpenTelemetryRegistration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def register_opentelemetry(
    listener: Listener, meter: Meter | None = None, *, name: str | None = None
) -> OpenTelemetryRegistration:
    """Report ``listener`` through observable instruments on ``meter``.

    :param meter: an OpenTelemetry ``Meter``; default
        ``opentelemetry.metrics.get_meter("pglisten_fast", __version__)``
        (the global meter provider, even if it is set later).
    :param name: value of the ``pglisten_fast.listener.name`` attribute;
        needed, and distinct, when several listeners share a meter.

    The instruments (see :data:`OTEL_INSTRUMENTS`) are created once per
    meter; counters are cumulative, per-subscription series carry the
    ``pglisten_fast.subscription.channels`` attribute.  The listener is
    held weakly.
    """
    _require("opentelemetry.metrics", "otel")
    with _groups_lock:
        if meter is None:
            if not _default_meter:
                from opentelemetry import (  # noqa: PLC0415 - optional dependency
                    metrics,
                )

                _default_meter.append(metrics.get_meter("pglisten_fast", __version__))
            meter = _default_meter[0]
        group = _group_of(meter)
    group.sources.add(listener, name)
    return OpenTelemetryRegistration(group, listener)

