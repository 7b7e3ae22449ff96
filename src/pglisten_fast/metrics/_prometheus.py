"""The Prometheus exporter (``prometheus_client``)."""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..listener import Listener

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry
from ._common import _require, _Snapshot, _Sources

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


