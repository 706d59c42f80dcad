"""A lost node's VMs: those whose policy says ``on_node_loss: restart`` are created again
elsewhere once their node has been silent for its own lease (after which the node has paused
them) plus a grace period; when the lost node returns it is ordered to remove its copy
(``evict``) and never resumes it. How a restart's ``create`` ends is the step table's
(:mod:`aggregator.workloads.moves_steps`, kind ``restart``)."""

from __future__ import annotations

import uuid

from aggregator.errors import Refused
from aggregator.store import moves as repo
from aggregator.store import orders as order_repo
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.workloads import destinations, orders, residency, vms
from aggregator.workloads.moves_settings import (
    EVICT_RETRY_S,
    RESTART_RETRY_S,
    Context,
    on_row_error,
)
from contract.orders import CreateParams, EvictParams


def restart_lost(conn: Tx, ctx: Context, now: float, grace_s: float,
                 watching_since: float | None) -> list[str]:
    """Create elsewhere the VMs that asked for it (``on_node_loss: restart``) whose node has
    been silent past its own lease plus ``grace_s``: by then the node has paused them itself
    (and will not resume them). Silence counts only from ``watching_since``, when this
    aggregator last began to hear the broker (None: it does not now): a node is not lost
    because the aggregator was away. A node that never said it fences (lease 0) is never
    given up on: its VMs could still be running. Returns the VMs restarted."""
    if watching_since is None:
        return []
    done: list[str] = []
    for lost in repo.restartable(conn, now, watching_since, grace_s, now - RESTART_RETRY_S):
        with conn.savepoint(on_error=on_row_error(f"restarting {lost.vm_id}")):
            if _restart(conn, ctx, now, lost):
                done.append(lost.vm_id)
    return done


def _restart(conn: Tx, ctx: Context, now: float, lost: repo.Restartable) -> bool:
    vm_id, gone = lost.vm_id, lost.node_id
    node = repo.node_facts(conn, gone)
    if node is None or destinations.is_online(node, now, ctx.live):
        return False
    try:
        dest = destinations.choose(conn, ctx, vm_id, node, "", False, now)
    except Refused as exc:
        note = f"its node {gone} is lost; no node can take it: {exc}"
        if lost.state_reason != note:
            repo.note_vm(conn, vm_id, note)
        return False
    spec = vms.spec_of(conn, vm_id)
    # What was still to go to the lost node for this VM never goes: it is elsewhere now.
    for order_id in order_repo.open_order_ids(conn, vm_id, gone):
        orders.supersede(conn, order_id, now, f"the VM was restarted on {dest}")
    move_id = "mv-" + uuid.uuid4().hex[:16]
    repo.insert_move(conn, repo.NewMove(move_id, vm_id, gone, "restart", "migrating", now,
                                        dest=dest, actor="aggregator"))
    repo.place_vm(conn, vm_id, dest, "pending", now,
                  reason=f"restarted on {dest}: {gone} silent for {now - lost.last_seen:.0f} s"
                  f" (lease {lost.lease_s:g} s)")
    order_id = orders.issue(conn, ctx.signer, dest, vm_id, CreateParams(), now, ctx.ttl_s,
                            vm=spec, move_id=move_id)
    repo.set_step(conn, move_id, "migrating", order_id, now)
    audit(conn, now, "aggregator", "vm.restart", vm_id, name=lost.name, lost=gone, dest=dest,
          silent_s=round(now - lost.last_seen), move=move_id)
    return True


def evict(conn: Tx, ctx: Context, now: float) -> int:
    """A lost node that is back removes the VMs restarted elsewhere meanwhile (it paused them
    and never resumes them). Its residency stay ends when its copy is gone."""
    for gone in repo.evictions_done(conn):
        repo.mark_evicted(conn, gone.vm_id, gone.node_id, now)
        residency.append(conn, gone.vm_id, "left", gone.node_id, now)
    issued = 0
    for due in repo.evictions_due(conn, now - EVICT_RETRY_S):
        order_id = orders.issue(conn, ctx.signer, due.node_id, due.vm_id,
                                EvictParams(vm_uuid=due.vm_id), now, ctx.ttl_s)
        repo.set_eviction_order(conn, due.vm_id, due.node_id, order_id)
        audit(conn, now, "aggregator", "vm.evict", due.vm_id, node=due.node_id,
              order=order_id)
        issued += 1
    return issued
