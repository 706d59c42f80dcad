"""What placement reads and writes: the nodes in a scope with their committed figures, the nodes
holding an anti-affinity group, the create's shortlist, the profiles' host reservations.

Reads and writes only; :mod:`aggregator.workloads.placement` decides (which profiles a policy's
labels allow, a node's status and capacity, the ranking). Rows are named tuples (and a node's
usage a plain tuple) rather than frozen dataclasses: a fleet-wide decision reads one per node,
and 10,000 named tuples are made in ~2 ms where frozen dataclasses take ~12 ms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aggregator.store.tx import Tx


@dataclass(frozen=True, slots=True)
class Scope:
    """The nodes a read keeps: in one of ``countries``, ``providers`` and ``sites`` (empty:
    any), of one of ``profiles`` (``None``: any; empty: none)."""

    countries: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    profiles: tuple[str, ...] | None = None


EVERY_NODE = Scope()


class Reservation(NamedTuple):
    """What a hardware profile keeps of a host for itself."""

    profile: str
    cpus: int
    memory_mib: int


class NodeRow(NamedTuple):
    """A node as stored. ``inventory`` and ``facts`` are the stored JSON texts: placement
    memoises their parse by text (they change only when a node reconnects)."""

    id: str
    site: str
    country: str
    provider: str
    profile: str
    reported_status: str
    last_seen: float | None
    interval_s: float
    revoked_at: float | None
    cordoned: int
    inventory: str | None
    facts: str | None


# What the VMs placed on a node and the moves into it commit, as the triggers keep it:
# (vCPUs, memory MiB, disk GiB). A plain tuple: a fleet-wide read makes one per node.
Usage = tuple[int, int, int]


class RoomyNode(NamedTuple):
    """A node of the create's shortlist: allocatable figures (the host's minus its profile's
    reservations) and committed ones."""

    id: str
    site: str
    country: str
    provider: str
    profile: str
    cpus: int
    memory_mib: int
    disk_gib: int
    used_vcpus: int
    used_memory_mib: int
    used_disk_gib: int


def _where(scope: Scope) -> tuple[str, list[object]]:
    """``scope`` as a WHERE clause over ``nodes`` and its parameters ("" for every node)."""
    terms: list[str] = []
    params: list[object] = []
    for column, values in (("country", scope.countries), ("provider", scope.providers),
                           ("site", scope.sites)):
        if values:
            terms.append(f"nodes.{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
    if scope.profiles is not None:
        if scope.profiles:
            terms.append(f"nodes.profile IN ({', '.join('?' * len(scope.profiles))})")
            params.extend(scope.profiles)
        else:  # no profile at all: not `IN ()`, which only SQLite accepts
            terms.append("1 = 0")
    return (" WHERE " + " AND ".join(terms) if terms else ""), params


def usage(tx: Tx, scope: Scope) -> dict[str, Usage]:
    """Node id -> committed (vCPUs, memory MiB, disk GiB), for the nodes in ``scope`` that
    have a row of them."""
    where, params = _where(scope)
    return {node: (v, m, d) for node, v, m, d in tx.execute(
        "SELECT u.node_id, u.vcpus, u.memory_mib, u.disk_gib FROM nodes"
        f" JOIN node_usage u ON u.node_id = nodes.id{where}", params)}


def nodes(tx: Tx, scope: Scope) -> list[NodeRow]:
    """Every node in ``scope``, in no particular order."""
    where, params = _where(scope)
    return list(map(NodeRow._make, tx.execute(
        "SELECT id, site, country, provider, profile, reported_status, last_seen,"
        f" interval_s, revoked_at, cordoned, inventory, facts FROM nodes{where}", params)))


def group_nodes(tx: Tx, group: str) -> frozenset[str]:
    """The nodes that hold a live VM of anti-affinity ``group``, or are receiving one (an
    open move)."""
    return frozenset(node for (node,) in tx.execute(
        "SELECT node_id FROM vms WHERE anti_affinity = ? AND deleted_at IS NULL AND node_id IS"
        " NOT NULL UNION SELECT m.dest FROM moves m JOIN vms v ON v.id = m.vm_id WHERE"
        " v.anti_affinity = ? AND m.finished_at IS NULL AND m.dest != ''", (group, group)))


def save_reservations(tx: Tx, reservations: Iterable[Reservation]) -> None:
    """Write the reservations where the headroom triggers read them, touching only those that
    changed (each change recomputes the headroom of that profile's nodes)."""
    for r in reservations:
        tx.execute(
            "INSERT INTO profile_reservations (profile, cpus, memory_mib) VALUES (?, ?, ?)"
            " ON CONFLICT (profile) DO UPDATE SET cpus = excluded.cpus, memory_mib ="
            " excluded.memory_mib WHERE cpus != excluded.cpus OR memory_mib !="
            " excluded.memory_mib", (r.profile, r.cpus, r.memory_mib))


def _shortlist_sql(scope: str, reserved: int) -> str:
    """The shortlist's query for a scope clause (`` AND ...`` or "") and the number of
    reservations. Fleet-wide it walks the headroom index (the planner would rather sort every
    node); in a scope it leaves the choice to the planner (the location index is the smaller
    walk)."""
    values = ", ".join("(?, ?, ?)" for _ in range(reserved)) or "(NULL, 0, 0)"
    # Allocatable figures: the host's minus its profile's reservations.
    mem = "max(n.cap_memory_mib - coalesce(r.memory_mib, 0), 0)"
    cpus = "max(n.cap_cpus - coalesce(r.cpus, 0), 0)"
    cpu_limit = f"CAST({cpus} * ? AS INTEGER)"
    used_m, used_c, used_d = ("coalesce(u.memory_mib, 0)", "coalesce(u.vcpus, 0)",
                              "coalesce(u.disk_gib, 0)")
    return f"""
        WITH r(profile, cpus, memory_mib) AS (VALUES {values})
        SELECT n.id, n.site, n.country, n.provider, n.profile, {cpus}, {mem}, n.cap_disk_gib,
               {used_c}, {used_m}, {used_d}
        FROM nodes n {"" if scope else "INDEXED BY nodes_headroom"}
             LEFT JOIN node_usage u ON u.node_id = n.id
             LEFT JOIN r ON r.profile = n.profile
        WHERE n.revoked_at IS NULL AND n.cordoned = 0 AND n.reported_status = 'online'
          AND n.last_seen IS NOT NULL AND ? - n.last_seen <= max(n.interval_s * ?, ?)
          AND {mem} - {used_m} >= ? AND {mem} > 0
          AND {cpu_limit} - {used_c} >= ? AND {cpu_limit} > 0
          AND (n.cap_disk_gib = 0 OR n.cap_disk_gib - {used_d} >= ?)
          {scope.replace("nodes.", "n.")}
        ORDER BY n.headroom DESC, n.id LIMIT ?"""


def roomiest(
    tx: Tx, scope: Scope, reservations: Sequence[Reservation], *, vcpus: int, memory_mib: int,
    disk_gib: int, cpu_overcommit: float, now: float, heartbeat_factor: float,
    min_timeout_s: float, limit: int,
) -> list[RoomyNode]:
    """Up to ``limit`` nodes in ``scope``, by the headroom the triggers keep (migration 005),
    highest first, then by id: unrevoked, uncordoned, online and heard from within
    ``max(interval_s * heartbeat_factor, min_timeout_s)`` of ``now``, with room for
    ``vcpus`` (``cpu_overcommit`` x the allocatable CPUs), ``memory_mib`` and ``disk_gib``
    (not checked where the node's disk is unknown, 0)."""
    where, params = _where(scope)
    sql = _shortlist_sql(where.replace(" WHERE ", " AND ", 1), len(reservations))
    args: list[object] = [x for row in reservations for x in row]
    args += [now, heartbeat_factor, min_timeout_s,  # online
             memory_mib, cpu_overcommit, vcpus, cpu_overcommit, disk_gib]  # room
    args += [*params, limit]
    return list(map(RoomyNode._make, tx.execute(sql, args)))
