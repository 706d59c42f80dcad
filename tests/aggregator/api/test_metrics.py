"""/metrics: every figure the service computes is exported and described, the fleet's orders
and moves are counted from the database, and promtool accepts the text."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator import config, service
from aggregator.api.metrics import FIGURES, render_metrics
from aggregator.fleet import queries
from aggregator.fleet.figures import LATENCY_BUCKETS_S, FleetFigures, Latency
from aggregator.service import Aggregator
from aggregator.store.writer import Store


def _promtool(text: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          check=False, timeout=30)


def _families(text: bytes) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out.setdefault(family.name, {})[key] = sample.value
    return out


def test_every_figure_the_service_computes_is_described_and_exported(workdir: Path) -> None:
    service.init(workdir / "agg")
    aggregator = Aggregator(workdir / "agg", config.load(workdir / "agg"))
    figures = aggregator.figures()
    assert set(figures) <= set(FIGURES), set(figures) - set(FIGURES)
    exported = _families(render_metrics(figures, FleetFigures()))
    for name in figures:
        assert name in exported, name


def test_a_figure_nobody_described_is_still_exported() -> None:
    text = render_metrics({"virt8ra_something_new": 3.0}, FleetFigures())
    samples = _families(text)["virt8ra_something_new"]
    assert list(samples.values()) == [3.0]
    assert _promtool(text).returncode == 0


def test_promtool_accepts_the_whole_text() -> None:
    latency = Latency(counts=tuple(range(len(LATENCY_BUCKETS_S))),
                      count=len(LATENCY_BUCKETS_S), sum_s=42.5)
    text = render_metrics({name: 1.0 for name in FIGURES}, FleetFigures(
        nodes={"online": 3}, orders={"succeeded": 7, "failed": 1}, moves={"migrating": 1},
        orders_published=11, orders_retried=3, latency=latency))
    checked = _promtool(text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    found = _families(text)
    assert found["virt8ra_orders"][("virt8ra_orders", (("state", "succeeded"),))] == 7
    assert found["virt8ra_orders"][("virt8ra_orders", (("state", "pending"),))] == 0
    assert found["virt8ra_moves"][("virt8ra_moves", (("state", "migrating"),))] == 1
    assert found["virt8ra_orders_retried"][("virt8ra_orders_retried_total", ())] == 3
    hist = found["virt8ra_order_latency_seconds"]
    assert hist[("virt8ra_order_latency_seconds_bucket", (("le", "+Inf"),))] == latency.count
    assert hist[("virt8ra_order_latency_seconds_sum", ())] == 42.5


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "fleet.sqlite")
    s.start()
    return s


async def test_order_figures_come_from_the_database(store: Store) -> None:
    """Published counts every publish, retried the ones after the first; latency runs from
    the first publish to the final report."""
    now = time.time()

    def fill(db: object) -> None:
        conn = db  # type: ignore[attr-defined]
        conn.execute("INSERT INTO nodes (id, site, country, provider, profile) VALUES"
                     " ('n1', 's', 'SI', 'p', 'tower-5g')")
        rows = [("o1", 1, "succeeded", 1, now - 10, 0.3), ("o2", 2, "failed", 3, now - 10, 7.0),
                ("o3", 3, "sent", 2, now - 5, None), ("o4", 4, "pending", 0, None, None)]
        for oid, seq, state, attempts, sent_at, latency in rows:
            conn.execute(
                "INSERT INTO orders (id, node_id, seq, action, payload, state, created_at,"
                " updated_at, expires_at, next_attempt_at, attempts, sent_at, latency_s)"
                " VALUES (?, 'n1', ?, 'start', x'00', ?, ?, ?, ?, ?, ?, ?, ?)",
                (oid, seq, state, now, now, now + 600, now, attempts, sent_at, latency))

    await store.write(fill)
    figures = await store.read(lambda c: queries.fleet_figures(c, now, 3.0, 5.0))
    store.stop()
    assert figures.orders == {"succeeded": 1, "failed": 1, "sent": 1, "pending": 1}
    assert (figures.orders_published, figures.orders_retried) == (6, 3)
    assert figures.latency.count == 2
    assert figures.latency.sum_s == pytest.approx(7.3)
    by_bound = dict(zip(LATENCY_BUCKETS_S, figures.latency.counts, strict=True))
    assert (by_bound[0.25], by_bound[0.5], by_bound[5.0], by_bound[10.0]) == (0, 1, 1, 2)
