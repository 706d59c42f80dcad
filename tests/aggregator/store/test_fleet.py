"""The fleet's read repository on a real SQLite file: rows as plain data, JSON decoded, the
windows, limits and orders each read promises (the JSON the API makes of them is tested
through queries, test_store.py and the API's tests)."""

from __future__ import annotations

from aggregator.store import fleet as repo
from aggregator.store.tx import Tx
from tests.aggregator.store.rows import add_move, add_node, add_order


def test_nodes_by_id_with_their_inventory_decoded(tx: Tx) -> None:
    add_node(tx, "n2", site="s", country="SI", provider="p", profile="tower-5g",
             enrolled_at=1.0, reported_status="online", last_seen=5.0, cordoned=1,
             inventory={"cpus": 4})
    add_node(tx, "n1", revoked_at=3.0, revoked_reason="stolen")
    n1, n2 = repo.nodes(tx)
    assert n2 == repo.NodeRecord("n2", "s", "SI", "p", "tower-5g", 1.0, "online", None, 5.0,
                                 10.0, {"cpus": 4}, 0, 0, 0, None, "", True)
    assert (n1.id, n1.inventory, n1.cordoned, n1.revoked_at, n1.revoked_reason) == (
        "n1", None, False, 3.0, "stolen")
    assert repo.node(tx, "n2") == n2
    assert repo.node(tx, "n3") is None
    assert repo.node_exists(tx, "n1")
    assert not repo.node_exists(tx, "n3")
    assert sorted(repo.liveness(tx)) == [repo.NodeLiveness("online", 5.0, 10.0, None),
                                         repo.NodeLiveness("unknown", None, 10.0, 3.0)]


def test_a_nodes_certificates_gaps_and_events(tx: Tx) -> None:
    for i in range(12):
        tx.execute("INSERT INTO certificates (serial, node_id, issued_at, not_after, kind)"
                   " VALUES (?, ?, ?, ?, 'renew')", (f"s{i}", "n1", float(i), 100.0 + i))
    tx.execute("INSERT INTO certificates (serial, node_id, issued_at, not_after) VALUES"
               " ('x', 'n2', 50, 60)")
    certs = repo.certificates(tx, "n1", limit=10)
    assert [c.serial for c in certs] == [f"s{i}" for i in range(11, 1, -1)]
    assert certs[0] == repo.Certificate("s11", "renew", 11.0, 111.0, None)
    tx.executemany("INSERT INTO gaps (node_id, channel, first_seq, last_seq, detected_at,"
                   " reason) VALUES ('n1', ?, ?, ?, 1.0, 'not received')",
                   [("telemetry", 9, 9), ("events", 5, 6), ("telemetry", 2, 3)])
    assert repo.gaps(tx, "n1") == [repo.Gap("events", 5, 6, 1.0, "not received"),
                                   repo.Gap("telemetry", 2, 3, 1.0, "not received"),
                                   repo.Gap("telemetry", 9, 9, 1.0, "not received")]
    tx.executemany("INSERT INTO events (node_id, seq, ts, received_at, type, summary, body)"
                   " VALUES ('n1', ?, ?, 0, 'lifecycle', ?, '{}')",
                   [(s, float(s), f"e{s}") for s in range(1, 4)])
    assert repo.recent_events(tx, "n1", limit=2) == [
        repo.Event(3, 3.0, "lifecycle", "", "", "e3"),
        repo.Event(2, 2.0, "lifecycle", "", "", "e2")]


def test_telemetry_in_a_window_and_its_rollups(tx: Tx) -> None:
    assert repo.latest_telemetry(tx, "n1") is None
    tx.executemany("INSERT INTO telemetry (node_id, seq, ts, received_at, payload) VALUES"
                   " ('n1', ?, ?, 0, ?)",
                   [(s, 100.0 + s, f"p{s}".encode()) for s in (3, 1, 2, 4, 5)])
    assert repo.latest_telemetry(tx, "n1") == b"p5"
    # the last `limit` samples in the window, oldest first
    assert repo.telemetry(tx, "n1", 101.0, 104.0, limit=3) == [b"p2", b"p3", b"p4"]
    assert repo.telemetry(tx, "n1", 101.0, 104.0, limit=10) == [b"p1", b"p2", b"p3", b"p4"]
    assert repo.telemetry(tx, "n2", 0, 1e9, limit=10) == []
    tx.executemany("INSERT INTO telemetry_rollup (node_id, bucket_start, metric, count, min,"
                   " max, sum) VALUES ('n1', ?, ?, 2, 1, 3, 4)",
                   [(0.0, "load1"), (0.0, "cpu_percent"), (300.0, "cpu_percent"),
                    (600.0, "cpu_percent")])
    assert repo.rollups(tx, "n1", 0.0, 300.0, ["cpu_percent", "load1"]) == [
        repo.Rollup(0.0, "cpu_percent", 2, 1.0, 3.0, 4.0),
        repo.Rollup(0.0, "load1", 2, 1.0, 3.0, 4.0),
        repo.Rollup(300.0, "cpu_percent", 2, 1.0, 3.0, 4.0)]
    assert repo.rollups(tx, "n1", 0.0, 1e9, []) == []


def test_the_figures_of_orders_and_moves(tx: Tx) -> None:
    empty = repo.order_latency(tx, (0.5, 1.0))
    assert (empty, repo.order_publishes(tx)) == (repo.LatencyCounts((0, 0), 0, 0.0),
                                                 repo.Publishes(0, 0))
    add_order(tx, "o1", "n1", 1, None, "start", "succeeded", attempts=1, latency_s=0.2)
    add_order(tx, "o2", "n1", 2, None, "start", "succeeded", attempts=3, latency_s=1.0)
    add_order(tx, "o3", "n1", 3, None, "start", "failed", attempts=2, latency_s=7.5)
    add_order(tx, "o4", "n1", 4, None, "start", "pending")
    assert repo.orders_by_state(tx) == {"failed": 1, "pending": 1, "succeeded": 2}
    assert repo.order_publishes(tx) == repo.Publishes(6, 3)
    assert repo.order_latency(tx, (0.5, 1.0, 5.0)) == repo.LatencyCounts((1, 2, 2), 3, 8.7)
    add_move(tx, "m1", "v1", "n1", "n2", state="failed", finished_at=1.0)
    add_move(tx, "m2", "v1", "n1", "n2")
    assert repo.moves_by_state(tx) == {"failed": 1, "migrating": 1}
