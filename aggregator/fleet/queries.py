"""Read-side queries over the fleet database; each takes a read connection and returns JSON-able
data. They run on the store's reader threads (``Store.read``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from typing import Any, Final

from aggregator.fleet import telemetry as fleet
from aggregator.fleet.figures import LATENCY_BUCKETS_S, FleetFigures, Latency
from aggregator.store.tx import Row, Tx
from contract.profiles import Profile
from contract.wire import HostSample, Telemetry, decode, to_plain

# The host figures a client may ask for by name.
HOST_METRICS: Final = tuple(
    f.name for f in dataclasses.fields(HostSample) if f.type in ("float", "int")
)
_NODE_COLUMNS = (
    "id, site, country, provider, profile, enrolled_at, reported_status, status_changed_at,"
    " last_seen, interval_s, inventory, malformed_messages, telemetry_last_seq, events_last_seq,"
    " revoked_at, revoked_reason, cordoned"
)


def token_identity(conn: Tx, token_hash: str) -> tuple[int, str, str] | None:
    """``(id, name, role)`` of an unrevoked API token."""
    row = conn.execute(
        "SELECT id, name, role FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL",
        (token_hash,),
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]), str(row[2]))


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


def _node(row: Row, now: float, factor: float, min_timeout: float,
          profiles: dict[str, Profile]) -> dict[str, Any]:
    inventory = json.loads(row["inventory"]) if row["inventory"] else None
    profile = profiles.get(row["profile"])
    revoked = row["revoked_at"] is not None
    return {
        "id": row["id"],
        "status": "revoked" if revoked else fleet.node_status(
            row["reported_status"], row["last_seen"], row["interval_s"], now, factor, min_timeout
        ),
        "site": row["site"],
        "country": row["country"],
        "provider": row["provider"],
        "profile": row["profile"],
        "labels": dict(profile.labels) if profile else {},
        "capacity": _capacity(inventory, profile),
        "last_seen": row["last_seen"],
        "last_seen_at": _iso(row["last_seen"]),
        "enrolled_at": _iso(row["enrolled_at"]),
        "reported_status": row["reported_status"],
        "interval_s": row["interval_s"],
        "cordoned": bool(row["cordoned"]),
        "revoked_at": _iso(row["revoked_at"]),
        "revoked_reason": row["revoked_reason"] if revoked else None,
    }


def list_nodes(conn: Tx, now: float, factor: float, min_timeout: float,
               profiles: dict[str, Profile]) -> list[dict[str, Any]]:
    rows = conn.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id").fetchall()
    return [_node(r, now, factor, min_timeout, profiles) for r in rows]


def status_counts(conn: Tx, now: float, factor: float,
                  min_timeout: float) -> dict[str, int]:
    counts = {"online": 0, "offline": 0, "revoked": 0}
    for reported, last_seen, interval, revoked_at in conn.execute(
        "SELECT reported_status, last_seen, interval_s, revoked_at FROM nodes"
    ):
        status = "revoked" if revoked_at is not None else fleet.node_status(
            reported, last_seen, interval, now, factor, min_timeout)
        counts[status] += 1
    return counts


def fleet_figures(conn: Tx, now: float, factor: float,
                  min_timeout: float) -> FleetFigures:
    """What /metrics reads from the database: nodes, orders and moves by state, publishes
    and the order latency histogram (orders are never deleted: the counters only grow)."""
    orders = dict(conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state").fetchall())
    moves = dict(conn.execute("SELECT state, COUNT(*) FROM moves GROUP BY state").fetchall())
    published, retried = conn.execute(
        "SELECT TOTAL(attempts), TOTAL(max(attempts - 1, 0)) FROM orders").fetchone()
    under = ", ".join(f"TOTAL(latency_s <= {bound!r})" for bound in LATENCY_BUCKETS_S)
    *counts, count, total = conn.execute(
        f"SELECT {under}, COUNT(*), TOTAL(latency_s) FROM orders WHERE latency_s IS NOT NULL"
    ).fetchone()
    return FleetFigures(
        nodes=status_counts(conn, now, factor, min_timeout), orders=orders, moves=moves,
        orders_published=int(published), orders_retried=int(retried),
        latency=Latency(tuple(int(n) for n in counts), int(count), float(total)))


def _latest(conn: Tx, node_id: str) -> Telemetry | None:
    row = conn.execute(
        "SELECT payload FROM telemetry WHERE node_id = ? ORDER BY seq DESC LIMIT 1", (node_id,)
    ).fetchone()
    if row is None:
        return None
    msg = decode(row[0])
    return msg if isinstance(msg, Telemetry) else None


def node_detail(conn: Tx, node_id: str, now: float, factor: float,
                min_timeout: float, profiles: dict[str, Profile]) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)).fetchone()
    if row is None:
        return None
    node = _node(row, now, factor, min_timeout, profiles)
    node["inventory"] = json.loads(row["inventory"]) if row["inventory"] else None
    latest = _latest(conn, node_id)
    node["latest"] = None if latest is None else {
        "seq": latest.seq,
        "ts": latest.ts,
        "host": to_plain(latest.host),
    }
    node["vms"] = [] if latest is None else [to_plain(g) for g in latest.guests]
    if row["revoked_at"] is not None:  # what becomes of them is the operator's decision
        for vm in node["vms"]:
            vm["on_revoked_node"] = True
    node["certificates"] = [
        {"serial": serial, "kind": kind, "issued_at": _iso(issued), "not_after": _iso(until),
         "revoked_at": _iso(revoked)}
        for serial, kind, issued, until, revoked in conn.execute(
            "SELECT serial, kind, issued_at, not_after, revoked_at FROM certificates"
            " WHERE node_id = ? ORDER BY issued_at DESC LIMIT 10", (node_id,)
        )
    ]
    node["sequence"] = {
        "telemetry_last_seq": row["telemetry_last_seq"],
        "events_last_seq": row["events_last_seq"],
    }
    node["malformed_messages"] = row["malformed_messages"]
    node["gaps"] = [
        {"channel": c, "first_seq": a, "last_seq": b, "missing": b - a + 1,
         "detected_at": _iso(t), "reason": r}
        for c, a, b, t, r in conn.execute(
            "SELECT channel, first_seq, last_seq, detected_at, reason FROM gaps"
            " WHERE node_id = ? ORDER BY channel, first_seq", (node_id,)
        )
    ]
    node["events"] = [
        {"seq": s, "ts": t, "type": k, "vm_uuid": u, "vm_name": n, "summary": m}
        for s, t, k, u, n, m in conn.execute(
            "SELECT seq, ts, type, vm_uuid, vm_name, summary FROM events WHERE node_id = ?"
            " ORDER BY seq DESC LIMIT 50", (node_id,)
        )
    ]
    return node


def telemetry(conn: Tx, node_id: str, since: float | None, until: float | None,
              metrics: list[str], limit: int) -> dict[str, Any] | None:
    if conn.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is None:
        return None
    until = time.time() if until is None else until
    since = until - 3600 if since is None else since
    rows = conn.execute(
        "SELECT payload FROM (SELECT seq, payload FROM telemetry WHERE node_id = ? AND ts >= ?"
        " AND ts <= ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
        (node_id, since, until, limit),
    ).fetchall()
    samples = []
    for (payload,) in rows:
        msg = decode(payload)
        if not isinstance(msg, Telemetry):
            continue
        if metrics:
            samples.append({
                "seq": msg.seq, "ts": msg.ts,
                "values": {m: getattr(msg.host, m) for m in metrics},
            })
        else:
            samples.append({
                "seq": msg.seq, "ts": msg.ts, "host": to_plain(msg.host),
                "vms": [to_plain(g) for g in msg.guests],
            })
    wanted = [m for m in metrics if m in fleet.ROLLUP_METRICS] if metrics else fleet.ROLLUP_METRICS
    placeholders = ",".join("?" * len(wanted))
    rollups = [
        {"bucket_start": b, "metric": m, "count": n, "min": lo, "max": hi, "avg": s / n}
        for b, m, n, lo, hi, s in conn.execute(
            "SELECT bucket_start, metric, count, min, max, sum FROM telemetry_rollup"
            f" WHERE node_id = ? AND bucket_start >= ? AND bucket_start <= ?"
            f" AND metric IN ({placeholders}) ORDER BY bucket_start, metric",
            (node_id, since, until, *wanted),
        )
    ] if wanted else []
    return {"node": node_id, "since": since, "until": until, "samples": samples,
            "rollups": rollups}
