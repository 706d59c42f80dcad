"""/metrics in Prometheus text, through prometheus_client, from figures read at scrape time
(no second copy of the counters).

Two sources: the service's in-process counters (ingest, store, broker, renewals: named in
:data:`FIGURES`) and the fleet's state in the database (nodes, orders and moves by state,
orders published and retried, order latency: :class:`FleetFigures`). A counter the service
computes but :data:`FIGURES` does not describe is still exported (untyped), never dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from aggregator.fleet.figures import LATENCY_BUCKETS_S, MOVE_STATES, ORDER_STATES, FleetFigures

# name -> (kind, help); the snapshot supplies the values under the same names.
FIGURES: Final = {
    "virt8ra_ingest_received": ("counter", "MQTT messages received by ingest"),
    "virt8ra_ingest_malformed": ("counter", "Messages dropped because they broke the contract"),
    "virt8ra_ingest_shed": (
        "counter", "Telemetry shed because storage fell behind (gaps recorded)"
    ),
    "virt8ra_ingest_connects": ("counter", "Ingest connections to the broker"),
    "virt8ra_ingest_restarts": ("counter", "Restarts of the ingest process after it died"),
    "virt8ra_store_samples": ("counter", "Telemetry samples stored"),
    "virt8ra_store_events": ("counter", "Events stored"),
    "virt8ra_store_duplicates": ("counter", "Replayed samples already stored"),
    "virt8ra_store_gaps": ("counter", "Sequence gaps detected"),
    "virt8ra_store_batches": ("counter", "Write batches committed"),
    "virt8ra_store_backlog": ("gauge", "Messages waiting for the store's writer"),
    "virt8ra_broker_restarts": ("counter", "Restarts of the managed broker"),
    "virt8ra_certificates_renewed": ("counter", "Node certificates renewed over MQTT"),
}

class _Snapshot(Collector):
    def __init__(self, figures: dict[str, float], fleet: FleetFigures) -> None:
        self._figures = figures
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        for name, value in {**dict.fromkeys(FIGURES, 0.0), **self._figures}.items():
            kind, text = FIGURES.get(name, ("untyped", "(undocumented)"))
            if kind == "counter":
                yield CounterMetricFamily(name, text, value=value)
            elif kind == "gauge":
                yield GaugeMetricFamily(name, text, value=value)
            else:
                yield UnknownMetricFamily(name, text, value=value)
        f = self._fleet
        yield _by("virt8ra_nodes", "Nodes by status", "status",
                  {"online": 0, "offline": 0, "revoked": 0, **f.nodes})
        yield _by("virt8ra_orders", "Orders by state", "state",
                  {**dict.fromkeys(ORDER_STATES, 0), **f.orders})
        yield _by("virt8ra_moves", "Moves of VMs by state", "state",
                  {**dict.fromkeys(MOVE_STATES, 0), **f.moves})
        yield CounterMetricFamily("virt8ra_orders_published",
                                  "Orders published to nodes, resends included",
                                  value=f.orders_published)
        yield CounterMetricFamily("virt8ra_orders_retried",
                                  "Orders published again (unanswered, or asked how they ended)",
                                  value=f.orders_retried)
        lat = f.latency
        buckets = [(_le(bound), float(n)) for bound, n in zip(LATENCY_BUCKETS_S, lat.counts,
                                                               strict=True)]
        buckets.append(("+Inf", float(lat.count)))
        yield HistogramMetricFamily(
            "virt8ra_order_latency_seconds",
            "From an order's first publish to the node's final report",
            buckets=buckets, sum_value=lat.sum_s)


def _by(name: str, text: str, label: str, counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([key], count)
    return family


def _le(bound: float) -> str:
    return repr(bound)


def render_metrics(figures: dict[str, float], fleet: FleetFigures) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(figures, fleet))
    return generate_latest(registry)
