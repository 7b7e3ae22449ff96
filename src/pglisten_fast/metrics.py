"""Export a Listener's statistics to Prometheus and OpenTelemetry.

Both exporters read ``listener.stats`` and every open subscription's
``stats`` when metrics are collected (a scrape, an export cycle); nothing
is counted twice and nothing runs between collections.

Prometheus (``pip install prometheus_client``)::

    from pglisten_fast.metrics import register_prometheus

    register_prometheus(listener)                    # the default REGISTRY
    register_prometheus(other, name="audit")         # a second listener

OpenTelemetry (``pip install opentelemetry-api`` and an SDK)::

    from pglisten_fast.metrics import register_opentelemetry

    registration = register_opentelemetry(listener)  # global meter provider
    ...
    registration.close()                             # report nothing more

The exporters hold listeners weakly: a listener the application has dropped
simply stops being reported.  A stopped listener that is still referenced
keeps reporting its final counters (and ``connected`` 0).

Several listeners may be reported through one registry or meter: give each
a distinct ``name``, which becomes a ``listener`` label (Prometheus) or a
``pglisten_fast.listener.name`` attribute (OpenTelemetry).  Per-subscription
series are labelled with the subscription's channels joined by commas;
subscriptions of one listener with the same channels are summed into one
series (so when one of them closes, its counters leave the sum).

The optional libraries are imported only when an exporter is created:
importing this module, or ``pglisten_fast``, needs neither.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import Error
from .listener import Listener, ListenerStats

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "OpenTelemetryRegistration",
    "PrometheusCollector",
    "register_opentelemetry",
    "register_prometheus",
]


def _require(module: str, extra: str) -> None:
    """Import ``module`` now, or say which extra provides it."""
    try:
        __import__(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed: pip install 'pglisten_fast[{extra}]'"
        ) from e


# -- snapshots shared by both exporters ------------------------------------------
@dataclass(frozen=True)
class _SubTotals:
    """The open subscriptions of one listener with the same channels, summed."""

    channels: str
    count: int
    delivered: int
    dropped: int
    markers: int
    buffered_bytes: int
    buffer_size: int


@dataclass(frozen=True)
class _Snapshot:
    """What one collection reports about one listener."""

    name: str | None
    stats: ListenerStats
    connected: bool
    subscriptions: tuple[_SubTotals, ...]


def _snapshot(listener: Listener, name: str | None) -> _Snapshot | None:
    """One consistent read of ``listener``; None if it cannot be read.

    (An inherited listener refuses use after ``fork()``: a child process
    exporting its own metrics simply does not report it.)
    """
    try:
        stats = listener.stats
        connected = listener.connected
        subs = listener.subscriptions
    except Error:
        return None
    totals: dict[str, list[int]] = {}
    for sub in subs:
        try:
            s = sub.stats
        except Error:
            continue
        key = ",".join(sub.channels)
        t = totals.setdefault(key, [0, 0, 0, 0, 0, 0])
        t[0] += 1
        t[1] += s.delivered
        t[2] += s.dropped
        t[3] += s.markers
        t[4] += s.buffered_bytes
        t[5] += sub.buffer_size
    return _Snapshot(
        name=name,
        stats=stats,
        connected=connected,
        subscriptions=tuple(_SubTotals(k, *v) for k, v in totals.items()),
    )


class _Sources:
    """The listeners one exporter reports, held weakly, with their names."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._lock = threading.Lock()
        self._entries: list[tuple[weakref.ref[Listener], str | None]] = []

    def add(self, listener: Listener, name: str | None) -> None:
        if not isinstance(listener, Listener):
            raise TypeError(
                f"expected a pglisten_fast.Listener, got {type(listener).__name__}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("name must be a non-empty str (or None)")
        with self._lock:
            live = [(r, n) for r, n in self._entries if r() is not None]
            for ref, other in live:
                if ref() is listener:
                    raise ValueError(
                        f"this listener is already reported by {self._what}"
                    )
                if name is None or other is None or name == other:
                    raise ValueError(
                        f"several listeners reported by {self._what} need distinct "
                        f"names (got {other!r} and {name!r}); pass name=..."
                    )
            self._entries = [*live, (weakref.ref(listener), name)]

    def remove(self, listener: Listener) -> bool:
        with self._lock:
            found = any(r() is listener for r, _ in self._entries)
            self._entries = [
                (r, n) for r, n in self._entries if r() not in (None, listener)
            ]
            return found

    def snapshots(self) -> list[_Snapshot]:
        with self._lock:
            entries = list(self._entries)
        out = []
        for ref, name in entries:
            listener = ref()
            if listener is not None:
                snap = _snapshot(listener, name)
                del listener
                if snap is not None:
                    out.append(snap)
        return out


# -- Prometheus ------------------------------------------------------------------
_PROM_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class PrometheusCollector:
    """A ``prometheus_client`` collector for one or more listeners.

    :param listener: the listener to report (held weakly).
    :param namespace: prefix of every metric name.
    :param name: value of a ``listener`` label on every series (needed when
        one collector reports several listeners; see :meth:`add`).

    Register it yourself (``registry.register(collector)``) or use
    :func:`register_prometheus`, which also lets several listeners share a
    registry.  Each scrape reads one ``listener.stats`` snapshot and each
    open subscription's ``stats``.  Metrics (with the default namespace):

    Counters: ``pglisten_fast_connects_total``, ``..._reconnects_total``,
    ``..._notifications_received_total``, ``..._markers_total``,
    ``..._notifications_dropped_total``.  Gauges: ``..._connected`` (0 or 1),
    ``..._notification_queue_usage_ratio`` (once the listener has sampled
    it, on its health-check schedule), ``..._subscriptions`` (open ones).
    Per subscription, with a ``channels`` label: counters
    ``..._subscription_delivered_total``, ``..._subscription_dropped_total``,
    ``..._subscription_markers_total``; gauges
    ``..._subscription_buffered_bytes``, ``..._subscription_buffer_size_bytes``.
    Every series has a ``listener`` label when a ``name`` is given.
    """

    def __init__(
        self,
        listener: Listener,
        *,
        namespace: str = "pglisten_fast",
        name: str | None = None,
    ) -> None:
        if not isinstance(namespace, str) or not _PROM_NAME.fullmatch(namespace):
            raise ValueError(
                f"namespace {namespace!r} is not a valid metric name prefix"
            )
        _require("prometheus_client", "prometheus")
        self._ns = namespace
        self._sources = _Sources(f"this collector (namespace {namespace!r})")
        self._registry: weakref.ref[CollectorRegistry] | None = None
        self.add(listener, name=name)

    @property
    def namespace(self) -> str:
        return self._ns

    def add(self, listener: Listener, *, name: str | None = None) -> None:
        """Report ``listener`` too (each listener then needs a distinct name)."""
        self._sources.add(listener, name)

    def remove(self, listener: Listener) -> bool:
        """Stop reporting ``listener``; False if it was not reported."""
        return self._sources.remove(listener)

    def unregister(self) -> None:
        """Remove this collector from the registry :func:`register_prometheus` used."""
        ref, self._registry = self._registry, None
        registry = None if ref is None else ref()
        if registry is not None:
            _forget_collector(registry, self)
            registry.unregister(self)

    def describe(self) -> list[Metric]:
        """The metric families, without samples (for the registry's name checks)."""
        return [f for f, _ in self._families(labelled=False)]

    def collect(self) -> Iterator[Metric]:
        """The metric families with one sample per listener (and subscription)."""
        snaps = self._sources.snapshots()
        if not snaps:
            return
        labelled = any(s.name is not None for s in snaps)
        for family, fill in self._families(labelled=labelled):
            for snap in snaps:
                fill(family, snap)
            if family.samples:
                yield family

    def _families(
        self, *, labelled: bool
    ) -> list[tuple[Metric, Callable[[Any, _Snapshot], None]]]:
        from prometheus_client.core import (  # noqa: PLC0415 - optional dependency
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        ns = self._ns
        top = ["listener"] if labelled else []
        per_sub = [*top, "channels"]

        def name_of(snap: _Snapshot) -> list[str]:
            return [snap.name or ""] if labelled else []

        def listener_value(
            attr: Callable[[_Snapshot], float | None],
        ) -> Callable[[Any, _Snapshot], None]:
            def fill(family: Any, snap: _Snapshot) -> None:
                value = attr(snap)
                if value is not None:
                    family.add_metric(name_of(snap), value)
            return fill

        def sub_value(attr: str) -> Callable[[Any, _Snapshot], None]:
            def fill(family: Any, snap: _Snapshot) -> None:
                for t in snap.subscriptions:
                    family.add_metric([*name_of(snap), t.channels], getattr(t, attr))
            return fill

        def counter(suffix: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"{ns}_{suffix}", doc, labels=labels)

        def gauge(
            suffix: str, doc: str, labels: list[str], unit: str = ""
        ) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{ns}_{suffix}", doc, labels=labels, unit=unit)

        return [
            (counter("connects", "Connections established by the listener "
                     "(the first one included).", top),
             listener_value(lambda s: s.stats.connects)),
            (counter("reconnects", "Connections re-established after a loss.", top),
             listener_value(lambda s: s.stats.reconnects)),
            (counter("notifications_received", "Notifications read from the "
                     "server.", top),
             listener_value(lambda s: s.stats.received)),
            (counter("markers", "Markers (connection_reset=True) queued into "
                     "subscriptions.", top),
             listener_value(lambda s: s.stats.markers)),
            (counter("notifications_dropped", "Notifications dropped by full "
                     "overflow='drop' subscriptions.", top),
             listener_value(lambda s: s.stats.dropped)),
            (gauge("connected", "1 while the listener's connection is "
                   "established, else 0.", top),
             listener_value(lambda s: 1.0 if s.connected else 0.0)),
            (gauge("notification_queue_usage", "Fraction of the server's "
                   "notification queue in use (pg_notification_queue_usage()), "
                   "sampled on the health-check schedule.", top, unit="ratio"),
             listener_value(lambda s: s.stats.queue_usage)),
            (gauge("subscriptions", "Open subscriptions.", top),
             listener_value(lambda s: sum(t.count for t in s.subscriptions))),
            (counter("subscription_delivered", "Notifications handed to the "
                     "subscription's consumers (markers excluded).", per_sub),
             sub_value("delivered")),
            (counter("subscription_dropped", "Notifications the subscription "
                     "lost because its buffer was full.", per_sub),
             sub_value("dropped")),
            (counter("subscription_markers", "Markers queued for the "
                     "subscription.", per_sub),
             sub_value("markers")),
            (gauge("subscription_buffered", "Bytes waiting in the subscription's "
                   "ring buffer.", per_sub, unit="bytes"),
             sub_value("buffered_bytes")),
            (gauge("subscription_buffer_size", "Capacity of the subscription's "
                   "ring buffer.", per_sub, unit="bytes"),
             sub_value("buffer_size")),
        ]


#: registry -> namespace -> the collector register_prometheus() put there.
_collectors: weakref.WeakKeyDictionary[Any, dict[str, PrometheusCollector]] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def _forget_collector(registry: Any, collector: PrometheusCollector) -> None:
    with _collectors_lock:
        by_ns = _collectors.get(registry, {})
        if by_ns.get(collector.namespace) is collector:
            del by_ns[collector.namespace]


def _still_registered(registry: CollectorRegistry, collector: Any) -> bool:
    """False if someone called ``registry.unregister(collector)`` directly.

    Registering it again is the public way to ask: the registry refuses a
    collector whose metric names it already holds.
    """
    try:
        registry.register(collector)
    except ValueError:
        return True
    registry.unregister(collector)
    return False


def register_prometheus(
    listener: Listener,
    registry: CollectorRegistry | None = None,
    *,
    namespace: str = "pglisten_fast",
    name: str | None = None,
) -> PrometheusCollector:
    """Report ``listener`` through a Prometheus ``registry``.

    :param registry: default ``prometheus_client.REGISTRY``.
    :param namespace: prefix of every metric name.
    :param name: value of a ``listener`` label on every series.

    The first call for a registry and namespace registers a
    :class:`PrometheusCollector`; later calls add their listener to it
    (each then needs a distinct ``name``).  Returns the collector:
    ``collector.remove(listener)`` stops reporting one listener,
    ``collector.unregister()`` all of them.
    """
    if registry is None:
        from prometheus_client import REGISTRY  # noqa: PLC0415 - optional dependency

        registry = REGISTRY
    with _collectors_lock:
        by_ns = _collectors.setdefault(registry, {})
        collector = by_ns.get(namespace)
        if collector is not None and _still_registered(registry, collector):
            collector.add(listener, name=name)
            return collector
        collector = PrometheusCollector(listener, namespace=namespace, name=name)
        registry.register(collector)
        collector._registry = weakref.ref(registry)
        by_ns[namespace] = collector
        return collector


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
