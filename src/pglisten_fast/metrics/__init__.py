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

from ._otel import (
    CHANNELS_ATTRIBUTE,
    LISTENER_ATTRIBUTE,
    OTEL_INSTRUMENTS,
    OpenTelemetryRegistration,
    register_opentelemetry,
)
from ._prometheus import PrometheusCollector, register_prometheus

__all__ = [
    "CHANNELS_ATTRIBUTE",
    "LISTENER_ATTRIBUTE",
    "OTEL_INSTRUMENTS",
    "OpenTelemetryRegistration",
    "PrometheusCollector",
    "register_opentelemetry",
    "register_prometheus",
]
