"""Where a VM that moves may go: the node named, if it may and can take the VM, or else the best
node that can; with the reasons when none can.

Placement (:mod:`aggregator.workloads.placement`) decides whether a node may take the VM and
ranks the nodes; this module adds what a move needs besides: a node that runs QEMU/KVM guests
for a live move, and a node of the VM's own architecture (its images are built for one).
"""

from __future__ import annotations

from typing import Final

from aggregator.errors import Refused
from aggregator.fleet import telemetry as fleet
from aggregator.store import moves as repo
from aggregator.store.tx import Tx
from aggregator.workloads import vms
from aggregator.workloads.moves_settings import Context
from aggregator.workloads.placement import Demand, NodeView, load_nodes, place, shortlist

_LIVE_TYPES: Final = ("kvm", "qemu")


def domain_type(node: repo.NodeFacts) -> str:
    """The kind of guests the node runs (libvirt's domain type), "" if it does not say."""
    return str(node.inventory.get("domain_type", ""))


def arch(node: repo.NodeFacts) -> str:
    return str(node.inventory.get("arch", ""))


def is_online(node: repo.NodeFacts, now: float, live: vms.Liveness) -> bool:
    return node.revoked_at is None and fleet.node_status(
        node.reported_status, node.last_seen, node.interval_s, now, live.heartbeat_factor,
        live.min_timeout_s) == "online"


def live_capable(node: repo.NodeFacts) -> bool:
    return domain_type(node) in _LIVE_TYPES


def other_arch(source: repo.NodeFacts, dest: repo.NodeFacts) -> str:
    """Why ``dest`` cannot run the VM's guest when it runs other guests than ``source`` (its
    images are built for one architecture); "" when it can, or a node does not say."""
    theirs, ours = arch(dest), arch(source)
    if theirs and ours and theirs != ours:
        return f"it runs {theirs} guests, the VM is an {ours} guest"
    return ""


def choose(conn: Tx, ctx: Context, vm_id: str, source: repo.NodeFacts, to: str,
           live_move: bool, now: float) -> str:
    """The destination: ``to`` if it may and can take the VM, else the best node that can;
    Refused (409) with the reasons otherwise."""
    demand = vms.request_of(conn, vm_id).demand()
    if to:
        return _named(conn, ctx, demand, source, to, live_move, now)
    candidates = shortlist(conn, demand, now=now, profiles=ctx.profiles,
                           heartbeat_factor=ctx.live.heartbeat_factor,
                           min_timeout_s=ctx.live.min_timeout_s, limit=64)
    candidates = [c for c in candidates if c.id != source.id]
    decision = place(demand, candidates)
    wrong_arch = False
    for node_id, _score in decision.candidates:
        dest = repo.node_facts(conn, node_id)
        if dest is None or (live_move and not live_capable(dest)):
            continue
        if other_arch(source, dest):
            wrong_arch = True
            continue
        return node_id
    everyone = place(demand, [v for v in _every_node(conn, ctx, demand, now)
                              if v.id != source.id])
    why = "; ".join(f"{node}: {', '.join(reasons)}" for node, reasons in everyone.rejected[:8])
    raise Refused("no_placement", "no other node can take the VM"
                  + (" live (it needs a QEMU/KVM node)" if live_move else "")
                  + (f" (it needs an {arch(source)} node)" if wrong_arch else "")
                  + (f" ({why})" if why else ""), 409, detail=everyone.to_json())


def _named(conn: Tx, ctx: Context, demand: Demand, source: repo.NodeFacts, to: str,
           live_move: bool, now: float) -> str:
    dest = repo.node_facts(conn, to)
    if dest is None:
        raise Refused("not_found", f"no node {to!r}", 404)
    if to == source.id:
        raise Refused("same_node", f"the VM is on {to} already", 409)
    decision = place(demand, [v for v in _every_node(conn, ctx, demand, now) if v.id == to])
    reasons = list(dict(decision.rejected).get(to, ()))
    if live_move and not live_capable(dest):
        reasons.append(f"it runs {domain_type(dest) or 'no'} guests: no live migration")
    if other := other_arch(source, dest):
        reasons.append(other)
    if reasons:
        raise Refused("destination_refused", f"{to} cannot take the VM: "
                      + "; ".join(reasons), 409, detail={"node": to, "reasons": reasons})
    return to


def _every_node(conn: Tx, ctx: Context, demand: Demand, now: float) -> list[NodeView]:
    return load_nodes(conn, demand, now=now, profiles=ctx.profiles,
                      heartbeat_factor=ctx.live.heartbeat_factor,
                      min_timeout_s=ctx.live.min_timeout_s, push_down=False)
