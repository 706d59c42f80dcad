"""/metrics in Prometheus text, through prometheus_client, from figures read at scrape time
(no second copy of the counters)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
    def __init__(self, figures: dict[str, float], nodes: dict[str, int]) -> None:
        self._figures = figures
        self._nodes = nodes

    def collect(self) -> Iterator[Metric]:
        for name, (kind, text) in FIGURES.items():
            value = self._figures.get(name, 0.0)
            if kind == "counter":
                yield CounterMetricFamily(name, text, value=value)
            else:
                yield GaugeMetricFamily(name, text, value=value)
        nodes = GaugeMetricFamily("virt8ra_nodes", "Nodes by status", labels=["status"])
        for status, count in sorted(self._nodes.items()):
            nodes.add_metric([status], count)
        yield nodes


def render_metrics(figures: dict[str, float], nodes: dict[str, int]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(figures, nodes))
    return generate_latest(registry)
