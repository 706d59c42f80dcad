"""Read-side queries over the fleet: each takes a transaction handle, reads rows through
:mod:`aggregator.store.fleet`, and returns JSON-able data (or /metrics' figures); nodes'
statuses are decided here. They run on the store's reader threads (``Store.read``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from typing import Any, Final

from aggregator.fleet import telemetry as fleet
from aggregator.fleet.figures import LATENCY_BUCKETS_S, FleetFigures, Latency
from aggregator.store import fleet as repo
from aggregator.store import trust as trust_rows
from aggregator.store.tx import Tx
from contract.profiles import Profile
from contract.wire import HostSample, Telemetry, decode, to_plain

# The host figures a client may ask for by name.
HOST_METRICS: Final = tuple(
    f.name for f in dataclasses.fields(HostSample) if f.type in ("float", "int")
)


def token_identity(conn: Tx, token_hash: str) -> tuple[int, str, str] | None:
    """``(id, name, role)`` of an unrevoked API token."""
    token = trust_rows.active_api_token(conn, token_hash)
    return None if token is None else (token.id, token.name, token.role)


def parse_time(raw: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError("not a finite time")
        return value
    parsed = dt.datetime.fromisoformat(raw)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _capacity(inventory: dict[str, Any] | None, profile: Profile | None) -> dict[str, Any] | None:
    if not inventory:
        return None
    cpus = inventory.get("cpus")
    memory = inventory.get("memory_bytes")
    if not isinstance(cpus, int) or not isinstance(memory, int):
        return None
    reserved_cpus = profile.reserved.cpus if profile else 0
    reserved_mem = profile.reserved.memory_mib * 1024 * 1024 if profile else 0
    return {
        "cpus": cpus,
        "memory_bytes": memory,
        "cpu_model": inventory.get("cpu_model"),
        "cpu_mhz": inventory.get("cpu_mhz"),
        "domain_type": inventory.get("domain_type"),
        "arch": inventory.get("arch") or None,
        "reserved_cpus": reserved_cpus,
        "reserved_memory_bytes": reserved_mem,
        "allocatable_cpus": max(0, cpus - reserved_cpus),
        "allocatable_memory_bytes": max(0, memory - reserved_mem),
    }


def _status(node: repo.NodeRecord | repo.NodeLiveness, now: float, factor: float,
            min_timeout: float) -> str:
    if node.revoked_at is not None:
        return "revoked"
    return fleet.node_status(node.reported_status, node.last_seen, node.interval_s, now, factor,
                             min_timeout)


def _node(n: repo.NodeRecord, now: float, factor: float, min_timeout: float,
          profiles: dict[str, Profile]) -> dict[str, Any]:
    profile = profiles.get(n.profile)
    revoked = n.revoked_at is not None
    return {
        "id": n.id,
        "status": _status(n, now, factor, min_timeout),
        "site": n.site,
        "country": n.country,
        "provider": n.provider,
        "profile": n.profile,
        "labels": dict(profile.labels) if profile else {},
        "capacity": _capacity(n.inventory, profile),
        "last_seen": n.last_seen,
        "last_seen_at": _iso(n.last_seen),
        "enrolled_at": _iso(n.enrolled_at),
        "reported_status": n.reported_status,
        "interval_s": n.interval_s,
        "cordoned": n.cordoned,
        "revoked_at": _iso(n.revoked_at),
        "revoked_reason": n.revoked_reason if revoked else None,
    }


def list_nodes(conn: Tx, now: float, factor: float, min_timeout: float,
               profiles: dict[str, Profile]) -> list[dict[str, Any]]:
    return [_node(n, now, factor, min_timeout, profiles) for n in repo.nodes(conn)]


def status_counts(conn: Tx, now: float, factor: float,
                  min_timeout: float) -> dict[str, int]:
    counts = {"online": 0, "offline": 0, "revoked": 0}
    for node in repo.liveness(conn):
        counts[_status(node, now, factor, min_timeout)] += 1
    return counts


def fleet_figures(conn: Tx, now: float, factor: float,
                  min_timeout: float) -> FleetFigures:
    """What /metrics reads from the database: nodes, orders and moves by state, publishes
    and the order latency histogram (orders are never deleted: the counters only grow)."""
    publishes = repo.order_publishes(conn)
    latency = repo.order_latency(conn, LATENCY_BUCKETS_S)
    return FleetFigures(
        nodes=status_counts(conn, now, factor, min_timeout), orders=repo.orders_by_state(conn),
        moves=repo.moves_by_state(conn), orders_published=publishes.published,
        orders_retried=publishes.retried,
        latency=Latency(latency.under, latency.count, latency.sum_s))


def _latest(conn: Tx, node_id: str) -> Telemetry | None:
    payload = repo.latest_telemetry(conn, node_id)
    if payload is None:
        return None
    msg = decode(payload)
    return msg if isinstance(msg, Telemetry) else None


def node_detail(conn: Tx, node_id: str, now: float, factor: float,
                min_timeout: float, profiles: dict[str, Profile]) -> dict[str, Any] | None:
    n = repo.node(conn, node_id)
    if n is None:
        return None
    node = _node(n, now, factor, min_timeout, profiles)
    node["inventory"] = n.inventory
    latest = _latest(conn, node_id)
    node["latest"] = None if latest is None else {
        "seq": latest.seq,
        "ts": latest.ts,
        "host": to_plain(latest.host),
    }
    node["vms"] = [] if latest is None else [to_plain(g) for g in latest.guests]
    if n.revoked_at is not None:  # what becomes of them is the operator's decision
        for vm in node["vms"]:
            vm["on_revoked_node"] = True
    node["certificates"] = [
        {"serial": c.serial, "kind": c.kind, "issued_at": _iso(c.issued_at),
         "not_after": _iso(c.not_after), "revoked_at": _iso(c.revoked_at)}
        for c in repo.certificates(conn, node_id, limit=10)
    ]
    node["sequence"] = {
        "telemetry_last_seq": n.telemetry_last_seq,
        "events_last_seq": n.events_last_seq,
    }
    node["malformed_messages"] = n.malformed_messages
    node["gaps"] = [
        {"channel": g.channel, "first_seq": g.first_seq, "last_seq": g.last_seq,
         "missing": g.last_seq - g.first_seq + 1, "detected_at": _iso(g.detected_at),
         "reason": g.reason}
        for g in repo.gaps(conn, node_id)
    ]
    node["events"] = [
        {"seq": e.seq, "ts": e.ts, "type": e.type, "vm_uuid": e.vm_uuid, "vm_name": e.vm_name,
         "summary": e.summary}
        for e in repo.recent_events(conn, node_id, limit=50)
    ]
    return node


def _sample(msg: Telemetry, metrics: list[str]) -> dict[str, Any]:
    if metrics:
        return {"seq": msg.seq, "ts": msg.ts,
                "values": {m: getattr(msg.host, m) for m in metrics}}
    return {"seq": msg.seq, "ts": msg.ts, "host": to_plain(msg.host),
            "vms": [to_plain(g) for g in msg.guests]}


def telemetry(conn: Tx, node_id: str, since: float | None, until: float | None,
              metrics: list[str], limit: int) -> dict[str, Any] | None:
    if not repo.node_exists(conn, node_id):
        return None
    until = time.time() if until is None else until
    since = until - 3600 if since is None else since
    samples = []
    for payload in repo.telemetry(conn, node_id, since, until, limit):
        msg = decode(payload)
        if isinstance(msg, Telemetry):
            samples.append(_sample(msg, metrics))
    wanted = [m for m in metrics if m in fleet.ROLLUP_METRICS] if metrics else fleet.ROLLUP_METRICS
    rollups = [
        {"bucket_start": r.bucket_start, "metric": r.metric, "count": r.count, "min": r.min,
         "max": r.max, "avg": r.sum / r.count}
        for r in repo.rollups(conn, node_id, since, until, wanted)
    ]
    return {"node": node_id, "since": since, "until": until, "samples": samples,
            "rollups": rollups}
