"""The fleet as the read side sees it: nodes and their liveness columns, certificates, gaps,
events, telemetry, roll-ups, the order and move figures of /metrics (API tokens are
:mod:`aggregator.store.trust`'s).

Reads only; :mod:`aggregator.fleet.queries` decides (statuses) and shapes the API's JSON. Stored
JSON is decoded here; telemetry payloads come as stored (the nodes' encoded messages), for the
caller to decode. Rows read once per node of the fleet (:class:`NodeRecord`,
:class:`NodeLiveness`) are named tuples, made ~6x faster than frozen dataclasses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from aggregator.store.tx import Tx

_NODE_COLUMNS = (
    "id, site, country, provider, profile, enrolled_at, reported_status, status_changed_at,"
    " last_seen, interval_s, inventory, malformed_messages, telemetry_last_seq, events_last_seq,"
    " revoked_at, revoked_reason, cordoned"
)


class NodeRecord(NamedTuple):
    id: str
    site: str
    country: str
    provider: str
    profile: str
    enrolled_at: float | None
    reported_status: str
    status_changed_at: float | None
    last_seen: float | None
    interval_s: float
    inventory: dict[str, Any] | None  # the last reported Inventory, as plain data
    malformed_messages: int
    telemetry_last_seq: int
    events_last_seq: int
    revoked_at: float | None
    revoked_reason: str
    cordoned: bool


class NodeLiveness(NamedTuple):
    reported_status: str
    last_seen: float | None
    interval_s: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class Certificate:
    serial: str
    kind: str
    issued_at: float
    not_after: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class Gap:
    channel: str
    first_seq: int
    last_seq: int
    detected_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts: float
    type: str
    vm_uuid: str
    vm_name: str
    summary: str


@dataclass(frozen=True, slots=True)
class Rollup:
    bucket_start: float
    metric: str
    count: int
    min: float
    max: float
    sum: float


@dataclass(frozen=True, slots=True)
class Publishes:
    published: int  # every publish of every order, resends included
    retried: int  # publishes after an order's first


@dataclass(frozen=True, slots=True)
class LatencyCounts:
    """Orders with a latency: ``under[i]`` of them took at most ``bounds[i]`` seconds."""

    under: tuple[int, ...]
    count: int
    sum_s: float


def _node(row: Sequence[Any]) -> NodeRecord:
    values = list(row)
    values[10] = json.loads(values[10]) if values[10] else None  # inventory
    values[16] = bool(values[16])  # cordoned
    return NodeRecord._make(values)


def nodes(tx: Tx) -> list[NodeRecord]:
    """Every node, by id."""
    return [_node(r) for r in tx.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id")]


def node(tx: Tx, node_id: str) -> NodeRecord | None:
    row = tx.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return None if row is None else _node(row)


def node_exists(tx: Tx, node_id: str) -> bool:
    return tx.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None


def liveness(tx: Tx) -> list[NodeLiveness]:
    """Every node's liveness columns, in no particular order."""
    return list(map(NodeLiveness._make, tx.execute(
        "SELECT reported_status, last_seen, interval_s, revoked_at FROM nodes")))


def certificates(tx: Tx, node_id: str, limit: int) -> list[Certificate]:
    """The node's latest ``limit`` certificates, newest first."""
    return [Certificate(*row) for row in tx.execute(
        "SELECT serial, kind, issued_at, not_after, revoked_at FROM certificates"
        " WHERE node_id = ? ORDER BY issued_at DESC LIMIT ?", (node_id, limit))]


def gaps(tx: Tx, node_id: str) -> list[Gap]:
    """The node's missing sequence numbers, by channel and first number."""
    return [Gap(*row) for row in tx.execute(
        "SELECT channel, first_seq, last_seq, detected_at, reason FROM gaps"
        " WHERE node_id = ? ORDER BY channel, first_seq", (node_id,))]


def recent_events(tx: Tx, node_id: str, limit: int) -> list[Event]:
    """The node's latest ``limit`` events, newest first."""
    return [Event(*row) for row in tx.execute(
        "SELECT seq, ts, type, vm_uuid, vm_name, summary FROM events WHERE node_id = ?"
        " ORDER BY seq DESC LIMIT ?", (node_id, limit))]


def latest_telemetry(tx: Tx, node_id: str) -> bytes | None:
    """The payload of the node's telemetry with the highest sequence number."""
    row = tx.execute(
        "SELECT payload FROM telemetry WHERE node_id = ? ORDER BY seq DESC LIMIT 1", (node_id,)
    ).fetchone()
    return None if row is None else bytes(row[0])


def telemetry(tx: Tx, node_id: str, since: float, until: float, limit: int) -> list[bytes]:
    """The payloads of the node's last ``limit`` samples taken from ``since`` to ``until``
    (inclusive), by sequence number."""
    return [bytes(payload) for (payload,) in tx.execute(
        "SELECT payload FROM (SELECT seq, payload FROM telemetry WHERE node_id = ? AND ts >= ?"
        " AND ts <= ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
        (node_id, since, until, limit),
    ).fetchall()]


def rollups(tx: Tx, node_id: str, since: float, until: float,
            metrics: Sequence[str]) -> list[Rollup]:
    """The node's roll-ups of ``metrics`` with buckets starting from ``since`` to ``until``
    (inclusive), by bucket and metric."""
    if not metrics:
        return []
    return [Rollup(*row) for row in tx.execute(
        "SELECT bucket_start, metric, count, min, max, sum FROM telemetry_rollup"
        " WHERE node_id = ? AND bucket_start >= ? AND bucket_start <= ?"
        f" AND metric IN ({','.join('?' * len(metrics))}) ORDER BY bucket_start, metric",
        (node_id, since, until, *metrics))]


def orders_by_state(tx: Tx) -> dict[str, int]:
    return {state: int(n) for state, n in tx.execute(
        "SELECT state, COUNT(*) FROM orders GROUP BY state")}


def moves_by_state(tx: Tx) -> dict[str, int]:
    return {state: int(n) for state, n in tx.execute(
        "SELECT state, COUNT(*) FROM moves GROUP BY state")}


def order_publishes(tx: Tx) -> Publishes:
    published, retried = tx.execute(
        "SELECT TOTAL(attempts), TOTAL(max(attempts - 1, 0)) FROM orders").fetchone()
    return Publishes(int(published), int(retried))


def order_latency(tx: Tx, bounds: Sequence[float]) -> LatencyCounts:
    """How many orders with a latency took at most each of ``bounds`` seconds; their count
    and the sum of their latencies."""
    under = "".join("COUNT(CASE WHEN latency_s <= ? THEN 1 END), " for _ in bounds)
    *counts, count, total = tx.execute(
        f"SELECT {under}COUNT(*), TOTAL(latency_s) FROM orders WHERE latency_s IS NOT NULL",
        tuple(bounds)).fetchone()
    return LatencyCounts(tuple(int(n) for n in counts), int(count), float(total))
