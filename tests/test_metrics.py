"""Metrics export: Prometheus and OpenTelemetry, with real libraries and traffic.

One scenario feeds both exporters: a listener with two subscriptions, one
with the default buffer on two channels (read to the end) and one with a
64 KiB buffer on one of them (not read, so a burst overflows it).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import pytest

import pglisten_fast as pgl

from .helpers import collect, listen_ready, wait_until

BURST = 3000
PAYLOAD = "x" * 200  # 216 bytes a record: the burst is ~10x the small ring


@dataclass
class Scenario:
    listener: pgl.Listener
    wide: pgl.Subscription   # channels (main, other); default buffer; read
    small: pgl.Subscription  # channel main; 64 KiB; not read
    main: str
    other: str

    @property
    def wide_label(self) -> str:
        return f"{self.main},{self.other}"


@pytest.fixture
def scenario(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[Scenario]:
    """The burst has been sent; ``wide`` has read all of it, ``small`` nothing."""
    main = f"metrics_{uuid.uuid4().hex[:8]}"
    other = f"{main}_other"
    listener = pgl.Listener(dsn, health_check_interval=0.2)
    with listener:
        wide = listen_ready(listener, main, other)
        small = listen_ready(listener, main, buffer_size=65536)
        pgl.notify_many(conn, main, (f"{i}:{PAYLOAD}" for i in range(BURST)))
        assert len(collect(wide, BURST)) == BURST
        wait_until(lambda: listener.stats.received == BURST)
        yield Scenario(listener, wide, small, main, other)


def drain(sub: pgl.Subscription) -> tuple[int, int]:
    """Read ``sub`` until it is empty: (notifications, dropped per markers)."""
    got = dropped = 0
    while True:
        try:
            batch = sub.get_batch(timeout=0.5)
        except pgl.Closed:
            break
        if not batch:
            break
        for n in batch:
            if n.connection_reset:
                assert n.reason == "overflow", n
                dropped += n.dropped
            else:
                got += 1
    return got, dropped


# -- Prometheus ------------------------------------------------------------------
def scrape(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``generate_latest`` parsed back: (sample name, labels) -> value."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_scrape_after_real_traffic(scenario: Scenario) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from pglisten_fast.metrics import register_prometheus

    listener, small = scenario.listener, scenario.small
    registry = prometheus_client.CollectorRegistry()
    register_prometheus(listener, registry)

    m = scrape(registry)
    wide = frozenset({("channels", scenario.wide_label)})
    narrow = frozenset({("channels", scenario.main)})
    none: frozenset[tuple[str, str]] = frozenset()
    dropped = small.stats.dropped
    assert 0 < dropped < BURST
    assert m["pglisten_fast_notifications_received_total", none] == BURST
    assert m["pglisten_fast_notifications_dropped_total", none] == dropped
    assert m["pglisten_fast_connected", none] == 1
    assert m["pglisten_fast_connects_total", none] == 1
    assert m["pglisten_fast_reconnects_total", none] == 0
    assert m["pglisten_fast_markers_total", none] == 3  # one "listen" per channel
    assert m["pglisten_fast_subscriptions", none] == 2
    usage = listener.stats.queue_usage  # None until the listener samples it
    assert m.get(("pglisten_fast_notification_queue_usage_ratio", none)) == usage
    assert m["pglisten_fast_subscription_delivered_total", wide] == BURST
    assert m["pglisten_fast_subscription_dropped_total", wide] == 0
    assert m["pglisten_fast_subscription_markers_total", wide] == 2
    assert m["pglisten_fast_subscription_buffered_bytes", wide] == 0
    assert m["pglisten_fast_subscription_buffer_size_bytes", wide] == 16 * 2**20
    assert m["pglisten_fast_subscription_delivered_total", narrow] == 0
    assert m["pglisten_fast_subscription_dropped_total", narrow] == dropped
    assert 0 < m["pglisten_fast_subscription_buffered_bytes", narrow] <= 65536
    assert m["pglisten_fast_subscription_buffer_size_bytes", narrow] == 65536

    # The small subscription's consumer catches up: what it got and what its
    # overflow marker reports add up to the burst, and the scrape follows.
    got, reported = drain(small)
    assert reported == dropped and got + dropped == BURST
    m = scrape(registry)
    assert m["pglisten_fast_subscription_delivered_total", narrow] == got
    assert m["pglisten_fast_subscription_markers_total", narrow] == 2
    assert m["pglisten_fast_subscription_buffered_bytes", narrow] == 0
    assert m["pglisten_fast_markers_total", none] == listener.stats.markers == 4


def test_prometheus_exposition_names_types_and_units(scenario: Scenario) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.openmetrics.exposition import generate_latest

    from pglisten_fast.metrics import PrometheusCollector

    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector(scenario.listener))
    text = generate_latest(registry).decode()
    for line in [
        "# TYPE pglisten_fast_connects counter",
        "# TYPE pglisten_fast_reconnects counter",
        "# TYPE pglisten_fast_notifications_received counter",
        "# TYPE pglisten_fast_markers counter",
        "# TYPE pglisten_fast_notifications_dropped counter",
        "# TYPE pglisten_fast_connected gauge",
        "# TYPE pglisten_fast_subscriptions gauge",
        "# TYPE pglisten_fast_subscription_delivered counter",
        "# TYPE pglisten_fast_subscription_dropped counter",
        "# TYPE pglisten_fast_subscription_markers counter",
        "# TYPE pglisten_fast_subscription_buffered_bytes gauge",
        "# UNIT pglisten_fast_subscription_buffered_bytes bytes",
        "# TYPE pglisten_fast_subscription_buffer_size_bytes gauge",
        "# UNIT pglisten_fast_subscription_buffer_size_bytes bytes",
        f'pglisten_fast_notifications_received_total {BURST}.0',
        f'pglisten_fast_subscription_delivered_total{{channels="{scenario.wide_label}"}}'
        f" {BURST}.0",
    ]:
        assert line + "\n" in text, f"{line!r} missing from:\n{text}"


class SampledListener(pgl.Listener):
    """A listener whose stats report a sampled notification queue usage."""

    @property
    def stats(self) -> pgl.ListenerStats:
        return replace(super().stats, queue_usage=0.25)


def test_prometheus_queue_usage_once_known(dsn: str) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.openmetrics.exposition import generate_latest

    from pglisten_fast.metrics import register_prometheus

    registry = prometheus_client.CollectorRegistry()
    listener = SampledListener(dsn)
    register_prometheus(listener, registry)
    text = generate_latest(registry).decode()
    for line in [
        "# TYPE pglisten_fast_notification_queue_usage_ratio gauge",
        "# UNIT pglisten_fast_notification_queue_usage_ratio ratio",
        "pglisten_fast_notification_queue_usage_ratio 0.25",
    ]:
        assert line + "\n" in text, f"{line!r} missing from:\n{text}"


def test_prometheus_queue_usage_only_once_sampled(dsn: str) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from pglisten_fast.metrics import register_prometheus

    registry = prometheus_client.CollectorRegistry()
    with pgl.Listener(dsn, health_check_interval=0) as listener:
        register_prometheus(listener, registry)
        m = scrape(registry)
        assert m["pglisten_fast_connected", frozenset()] == 1
        assert not any(k[0].startswith("pglisten_fast_notification_queue") for k in m)
        assert not any(k[0].startswith("pglisten_fast_subscription_") for k in m)
    m = scrape(registry)  # stopped, still referenced: final counters
    assert m["pglisten_fast_connected", frozenset()] == 0
    assert m["pglisten_fast_connects_total", frozenset()] == 1


def test_prometheus_holds_the_listener_weakly(dsn: str) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from pglisten_fast.metrics import register_prometheus

    registry = prometheus_client.CollectorRegistry()
    listener = pgl.Listener(dsn)
    with listener:
        sub = listener.listen("metrics_weak")
        register_prometheus(listener, registry)
        assert scrape(registry)["pglisten_fast_connected", frozenset()] == 1
    ref = weakref.ref(listener)
    del listener, sub
    gc.collect()
    assert ref() is None, "the collector kept the listener alive"
    assert scrape(registry) == {}


def test_prometheus_several_listeners_share_a_registry(dsn: str) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from pglisten_fast.metrics import PrometheusCollector, register_prometheus

    registry = prometheus_client.CollectorRegistry()
    a, b = pgl.Listener(dsn), pgl.Listener(dsn)  # never started: zeros
    subs = [a.listen("ch_a"), b.listen("ch_b", "ch_c", buffer_size=1)]
    collector = register_prometheus(a, registry, name="a")
    with pytest.raises(ValueError, match="distinct names"):
        register_prometheus(b, registry)
    with pytest.raises(ValueError, match="distinct names"):
        register_prometheus(b, registry, name="a")
    with pytest.raises(ValueError, match="already reported"):
        register_prometheus(a, registry, name="a2")
    assert register_prometheus(b, registry, name="b") is collector
    m = scrape(registry)
    assert m["pglisten_fast_connected", frozenset({("listener", "a")})] == 0
    assert m["pglisten_fast_connected", frozenset({("listener", "b")})] == 0
    assert m[
        "pglisten_fast_subscription_buffer_size_bytes",
        frozenset({("listener", "b"), ("channels", "ch_b,ch_c")}),
    ] == 65536
    # A collector of its own for the same names is refused by the registry.
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(PrometheusCollector(a))
    # A namespace of its own is not.
    other = register_prometheus(a, registry, namespace="app_listen")
    assert other is not collector
    assert scrape(registry)["app_listen_connected", frozenset()] == 0

    assert collector.remove(b) and not collector.remove(b)
    assert not any(("listener", "b") in k[1] for k in scrape(registry))
    collector.unregister()
    other.unregister()
    assert scrape(registry) == {}
    # Unregistered, the next registration starts afresh...
    again = register_prometheus(b, registry)
    assert again is not collector
    assert scrape(registry)["pglisten_fast_connected", frozenset()] == 0
    # ...also when the registry was told directly.
    registry.unregister(again)
    assert register_prometheus(a, registry) is not again
    assert scrape(registry)["pglisten_fast_connected", frozenset()] == 0
    a.stop()
    b.stop()
    assert all(sub.closed for sub in subs)


def test_prometheus_refuses_a_bad_namespace_or_a_non_listener(dsn: str) -> None:
    pytest.importorskip("prometheus_client")
    from pglisten_fast.metrics import PrometheusCollector

    with pytest.raises(ValueError, match="namespace"):
        PrometheusCollector(pgl.Listener(dsn), namespace="my-app")
    with pytest.raises(TypeError, match="Listener"):
        PrometheusCollector(object())  # type: ignore[arg-type]


# -- OpenTelemetry ---------------------------------------------------------------
@pytest.fixture
def otel() -> Iterator[tuple[Any, Any]]:
    """A real SDK MeterProvider with an in-memory reader: (meter, reader)."""
    pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider.get_meter("test"), reader
    provider.shutdown()


@dataclass(frozen=True)
class Point:
    value: float
    unit: str
    kind: str  # "counter", "updown" or "gauge"


def otel_points(reader: Any) -> dict[tuple[str, frozenset[tuple[str, Any]]], Point]:
    """One collection: (instrument, attributes) -> point."""
    from opentelemetry.sdk.metrics.export import Gauge, Sum

    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                d = metric.data
                if isinstance(d, Sum):
                    kind = "counter" if d.is_monotonic else "updown"
                else:
                    assert isinstance(d, Gauge)
                    kind = "gauge"
                for p in d.data_points:
                    key = (metric.name, frozenset((p.attributes or {}).items()))
                    out[key] = Point(p.value, metric.unit, kind)
    return out


def test_opentelemetry_collect_after_real_traffic(
    scenario: Scenario, otel: tuple[Any, Any]
) -> None:
    from pglisten_fast.metrics import CHANNELS_ATTRIBUTE, register_opentelemetry

    meter, reader = otel
    listener, small = scenario.listener, scenario.small
    registration = register_opentelemetry(listener, meter)
    dropped = small.stats.dropped
    assert 0 < dropped < BURST

    p = otel_points(reader)
    none: frozenset[tuple[str, Any]] = frozenset()
    wide = frozenset({(CHANNELS_ATTRIBUTE, scenario.wide_label)})
    narrow = frozenset({(CHANNELS_ATTRIBUTE, scenario.main)})
    def counter(value: int, unit: str = "{notification}") -> Point:
        return Point(value, unit, "counter")

    assert p["pglisten_fast.notifications.received", none] == counter(BURST)
    assert p["pglisten_fast.notifications.dropped", none] == counter(dropped)
    assert p["pglisten_fast.connects", none] == counter(1, "{connection}")
    assert p["pglisten_fast.reconnects", none] == counter(0, "{connection}")
    assert p["pglisten_fast.markers", none] == counter(3, "{marker}")
    assert p["pglisten_fast.connected", none] == Point(1, "1", "gauge")
    if listener.stats.queue_usage is None:  # not sampled yet: not reported
        assert ("pglisten_fast.notification_queue.usage", none) not in p
    assert p["pglisten_fast.subscription.count", none] == Point(
        2, "{subscription}", "updown")
    assert p["pglisten_fast.subscription.delivered", wide] == counter(BURST)
    assert p["pglisten_fast.subscription.dropped", wide] == counter(0)
    assert p["pglisten_fast.subscription.delivered", narrow] == counter(0)
    assert p["pglisten_fast.subscription.dropped", narrow] == counter(dropped)
    assert p["pglisten_fast.subscription.markers", narrow] == counter(1, "{marker}")
    assert p["pglisten_fast.subscription.buffer.limit", narrow] == Point(
        65536, "By", "updown")
    buffered = p["pglisten_fast.subscription.buffer.usage", narrow]
    assert buffered.unit == "By" and buffered.kind == "updown"
    assert 0 < buffered.value <= 65536

    got, reported = drain(small)
    assert reported == dropped and got + dropped == BURST
    p = otel_points(reader)
    assert p["pglisten_fast.subscription.delivered", narrow].value == got
    assert p["pglisten_fast.subscription.buffer.usage", narrow].value == 0
    assert p["pglisten_fast.markers", none].value == 4

    registration.close()
    registration.close()
    assert otel_points(reader) == {}, "a closed registration still reports"


def test_opentelemetry_queue_usage_once_known(
    dsn: str, otel: tuple[Any, Any]
) -> None:
    from pglisten_fast.metrics import register_opentelemetry

    meter, reader = otel
    listener = SampledListener(dsn)
    register_opentelemetry(listener, meter)
    p = otel_points(reader)
    assert p["pglisten_fast.notification_queue.usage", frozenset()] == Point(
        0.25, "1", "gauge")


def test_opentelemetry_several_listeners_on_one_meter(
    dsn: str, otel: tuple[Any, Any]
) -> None:
    from pglisten_fast.metrics import (
        CHANNELS_ATTRIBUTE,
        LISTENER_ATTRIBUTE,
        register_opentelemetry,
    )

    meter, reader = otel
    a, b = pgl.Listener(dsn), pgl.Listener(dsn)
    with a:
        subs = [a.listen("otel_a"), b.listen("otel_b", buffer_size=100_000)]
        register_opentelemetry(a, meter, name="a")
        with pytest.raises(ValueError, match="distinct names"):
            register_opentelemetry(b, meter)
        with register_opentelemetry(b, meter, name="b"):
            p = otel_points(reader)
            assert p["pglisten_fast.connected", frozenset({(LISTENER_ATTRIBUTE, "a")})
                     ].value == 1
            assert p["pglisten_fast.connected", frozenset({(LISTENER_ATTRIBUTE, "b")})
                     ].value == 0
            assert p["pglisten_fast.subscription.buffer.limit", frozenset({
                (LISTENER_ATTRIBUTE, "b"), (CHANNELS_ATTRIBUTE, "otel_b"),
            })].value == 131072
        p = otel_points(reader)
        assert p["pglisten_fast.connected", frozenset({(LISTENER_ATTRIBUTE, "a")})
                 ].value == 1
        assert ("pglisten_fast.connected", frozenset({(LISTENER_ATTRIBUTE, "b")})
                ) not in p
    b.stop()
    assert all(sub.closed for sub in subs)


def test_opentelemetry_holds_the_listener_weakly(
    dsn: str, otel: tuple[Any, Any]
) -> None:
    from pglisten_fast.metrics import register_opentelemetry

    meter, reader = otel
    listener = pgl.Listener(dsn)
    registration = register_opentelemetry(listener, meter)
    assert otel_points(reader)["pglisten_fast.connected", frozenset()].value == 0
    ref = weakref.ref(listener)
    del listener
    gc.collect()
    assert ref() is None and registration.listener is None
    assert otel_points(reader) == {}
    registration.close()


def test_opentelemetry_default_meter_is_the_global_one(dsn: str) -> None:
    """Without a meter, instruments go to the global provider (a new process)."""
    pytest.importorskip("opentelemetry.sdk.metrics")
    code = textwrap.dedent(f"""
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import pglisten_fast as pgl
        from pglisten_fast.metrics import register_opentelemetry

        a, b = pgl.Listener({dsn!r}), pgl.Listener({dsn!r})
        register_opentelemetry(a, name="a")   # before the SDK is set up
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        register_opentelemetry(b, name="b")
        names = set()
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                assert sm.scope.name == "pglisten_fast", sm.scope
                for m in sm.metrics:
                    if m.name == "pglisten_fast.connected":
                        for p in m.data.data_points:
                            names.add(p.attributes["pglisten_fast.listener.name"])
        print(sorted(names))
    """)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['a', 'b']"


# -- optional dependencies -------------------------------------------------------
def test_importing_needs_neither_library() -> None:
    code = textwrap.dedent("""
        import sys
        for name in ("prometheus_client", "opentelemetry"):
            sys.modules[name] = None  # "not installed"
        import pglisten_fast as pgl
        import pglisten_fast.metrics as m
        assert not any(k.startswith(("prometheus_client", "opentelemetry"))
                       and sys.modules[k] is not None for k in sys.modules)
        for call, extra in [(lambda: m.PrometheusCollector(pgl.Listener()),
                             "prometheus"),
                            (lambda: m.register_opentelemetry(pgl.Listener()),
                             "otel")]:
            try:
                call()
            except ImportError as e:
                assert f"pglisten_fast[{extra}]" in str(e), e
            else:
                raise AssertionError("no ImportError")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env=env, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
