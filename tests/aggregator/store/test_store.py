"""The fleet store on a real SQLite file: batching, sequence gaps, liveness data, retention."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.fleet import queries
from aggregator.store.ingest import EventIn, MalformedIn, StatusIn, TelemetryIn
from aggregator.store.tx import Tx
from aggregator.store.writer import Store
from contract.wire import HostSample, Inventory, Status, Telemetry, TelemetryGap, encode


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "fleet.sqlite")
    s.start()
    yield s
    s.stop()


def _telemetry(node: str, seq: int, ts: float = 1000.0, cpu: float = 10.0) -> TelemetryIn:
    host = HostSample(cpu_percent=cpu, cpu_count=2, load1=0.5, load5=0.4, load15=0.3,
                      mem_total_bytes=8, mem_available_bytes=4, mem_used_bytes=4,
                      swap_total_bytes=0, swap_used_bytes=0, uptime_s=10.0)
    msg = Telemetry(node=node, seq=seq, ts=ts, interval_s=10.0, host=host)
    return TelemetryIn(node, seq, ts, ts, encode(msg))


def _gaps(conn: Tx, node: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(
        "SELECT channel, first_seq, last_seq, reason FROM gaps WHERE node_id = ?"
        " ORDER BY channel, first_seq", (node,))]


async def test_gaps_are_recorded_and_filled_by_late_arrivals(store: Store) -> None:
    for seq in (1, 2, 6, 7, 4, 7):  # 3..5 missing, then 4 arrives late, 7 twice
        store.ingest(_telemetry("n1", seq))
    await store.flush()
    assert await store.read(lambda c: _gaps(c, "n1")) == [
        ("telemetry", 3, 3, "not received"), ("telemetry", 5, 5, "not received")]
    seqs = await store.read(
        lambda c: [r[0] for r in c.execute("SELECT seq FROM telemetry ORDER BY seq")])
    assert seqs == [1, 2, 4, 6, 7]
    assert store.duplicates == 1
    assert store.stored_samples == 5


async def test_a_gap_the_node_explains_replaces_the_detected_one(store: Store) -> None:
    store.ingest(_telemetry("n1", 1))
    store.ingest(_telemetry("n1", 9))  # detected: 2..8 not received
    store.ingest(EventIn(TelemetryGap(node="n1", seq=1, ts=1.0, first_seq=2, last_seq=6,
                                      reason="agent spool full"), 2.0))
    await store.flush()
    assert await store.read(lambda c: _gaps(c, "n1")) == [
        ("telemetry", 2, 6, "agent spool full"), ("telemetry", 7, 8, "not received")]


async def test_sequence_state_survives_a_restart(tmp_path: Path) -> None:
    s = Store(tmp_path / "fleet.sqlite")
    s.start()
    s.ingest(_telemetry("n1", 1))
    s.ingest(_telemetry("n1", 2))
    await s.flush()
    s.stop()
    s = Store(tmp_path / "fleet.sqlite")
    s.start()
    s.ingest(_telemetry("n1", 4))
    await s.flush()
    assert await s.read(lambda c: _gaps(c, "n1")) == [("telemetry", 3, 3, "not received")]
    s.stop()


async def test_status_and_liveness_columns(store: Store) -> None:
    inv = Inventory(hostname="h", agent_version="0", domain_type="kvm", cpu_model="x86_64",
                    cpus=8, cpu_mhz=2000, sockets=1, cores_per_socket=8, threads_per_core=1,
                    memory_bytes=2**34, libvirt_version="9.0.0", hypervisor="QEMU")
    store.ingest(StatusIn(Status(node="n1", state="online", ts=1.0, interval_s=5.0,
                                 inventory=inv), received_at=100.0, retained=False))
    store.ingest(StatusIn(Status(node="n2", state="online", ts=1.0), 100.0, retained=True))
    store.ingest(MalformedIn("n1"))
    await store.flush()
    nodes = {n["id"]: n for n in await store.read(
        lambda c: queries.list_nodes(c, 101.0, 3.0, 5.0, {}))}
    assert nodes["n1"]["status"] == "online"
    assert nodes["n1"]["capacity"]["cpus"] == 8
    assert nodes["n1"]["interval_s"] == 5.0
    # A retained status is history, not a sign of life.
    assert nodes["n2"]["status"] == "offline"
    detail = await store.read(lambda c: queries.node_detail(c, "n1", 101.0, 3.0, 5.0, {}))
    assert detail is not None
    assert detail["malformed_messages"] == 1


async def test_shedding_is_counted_and_recorded_as_a_gap(tmp_path: Path) -> None:
    s = Store(tmp_path / "fleet.sqlite", queue_max=2)
    s.start()
    busy, release = threading.Event(), threading.Event()

    def hold(db: Tx) -> None:  # the writer is busy until released
        busy.set()
        release.wait(10)

    blocked = asyncio.ensure_future(s.write(hold))
    assert await asyncio.to_thread(busy.wait, 10)  # not a guess at how long it takes to start
    s.ingest(_telemetry("n1", 1))
    s.ingest(_telemetry("n1", 2))
    assert s.ingest(_telemetry("n1", 3)) is False  # past the bound: shed, counted
    assert s.shed == 1
    release.set()
    await blocked
    s.ingest(_telemetry("n1", 4))
    await s.flush()
    assert await s.read(lambda c: _gaps(c, "n1")) == [
        ("telemetry", 3, 3, "shed by the aggregator under load")]
    s.stop()


async def test_retention_rolls_old_samples_up(store: Store) -> None:
    for seq in range(1, 7):
        store.ingest(_telemetry("n1", seq, ts=1000.0 + seq * 60, cpu=float(seq * 10)))
    await store.flush()
    now = 1000.0 + 48 * 3600 + 150  # samples 1..2 are older than 48 h
    rolled, dropped = await store.write(lambda db: Store.sweep(db, now, 48.0, 300, 90.0))
    assert (rolled, dropped) == (2, 0)
    result = await store.read(lambda c: queries.telemetry(c, "n1", 0, now, ["cpu_percent"], 100))
    assert result is not None
    assert [s["seq"] for s in result["samples"]] == [3, 4, 5, 6]
    assert result["rollups"] == [{"bucket_start": 900.0, "metric": "cpu_percent", "count": 2,
                                  "min": 10.0, "max": 20.0, "avg": 15.0}]
    rolled, dropped = await store.write(lambda db: Store.sweep(db, now + 91 * 86400, 48.0, 300,
                                                               90.0))
    assert rolled == 4
    assert dropped > 0


async def test_a_reported_gap_leaves_out_what_did_arrive(store: Store) -> None:
    # Sample 3 reached the broker but its acknowledgement did not reach the node, which later
    # dropped it from its full spool and reported 2..4 as lost.
    for seq in (1, 3, 5):
        store.ingest(_telemetry("n1", seq))
    store.ingest(EventIn(TelemetryGap(node="n1", seq=1, ts=1.0, first_seq=2, last_seq=4,
                                      reason="agent spool full"), 2.0))
    await store.flush()
    assert await store.read(lambda c: _gaps(c, "n1")) == [
        ("telemetry", 2, 2, "agent spool full"), ("telemetry", 4, 4, "agent spool full")]


async def test_a_failed_batch_leaves_the_writer_alive_and_shows_as_a_gap(store: Store) -> None:
    store.ingest(_telemetry("n1", 1))
    await store.flush()
    pages = await store.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await store.write(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))  # disk full
    release = threading.Event()
    busy = asyncio.ensure_future(store.write(lambda db: release.wait(10)))
    await asyncio.sleep(0.1)
    for seq in range(2, 40):  # one batch, queued while the writer is busy
        store.ingest(_telemetry("n1", seq))
    release.set()
    await busy
    await store.flush()  # the writer answers: it survived the failed batch
    await store.write(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
    store.ingest(_telemetry("n1", 40))
    await store.flush()
    assert await store.read(lambda c: _gaps(c, "n1")) == [("telemetry", 2, 39, "not received")]


async def test_a_huge_reported_gap_is_recorded_without_stalling(store: Store) -> None:
    for seq in range(1, 2001):
        store.ingest(_telemetry("n1", seq))
    store.ingest(EventIn(TelemetryGap(node="n1", seq=1, ts=1.0, first_seq=1, last_seq=2**62,
                                      reason="agent spool full"), 2.0))
    await asyncio.wait_for(store.flush(), 5)
    assert await store.read(lambda c: _gaps(c, "n1")) == [
        ("telemetry", 2001, 2**62, "agent spool full")]
