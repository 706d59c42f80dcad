"""Orders to nodes: issued, signed and stored before they are published; tracked to an end.

States: ``pending`` (stored, not yet published) → ``sent`` → ``accepted`` (the node journaled
it) → ``succeeded`` | ``failed``; or ``expired`` when it could not finish by its expiry. The
table of transitions is :mod:`aggregator.workloads.order_states`; every change of state here
goes through it. An unfinished order is published again, in sequence, when its node comes back
online and with backoff while it stays unanswered; the node answers a duplicate with its
recorded result, so nothing runs twice. An accepted order is asked about again the same way
(every :data:`ACCEPTED_RECHECK_S` at first): its final report may have been lost (a broker
that crashed after acknowledging it), and the node answers with the outcome it recorded, or
nothing while it still runs. Each node's orders are numbered; the node refuses a number it has
already seen.

The functions take a :class:`~aggregator.store.tx.Tx` and run on the store's threads (writes
on its writer thread, inside its transaction); they read and write through the repository
:mod:`aggregator.store.orders` and write no SQL of their own.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import Any, Final

from aggregator.store import orders as repo
from aggregator.store.tx import Tx
from aggregator.trust.pki import OrderSigner
from aggregator.workloads import order_states as states
from aggregator.workloads import residency
from contract.orders import OrderParams
from contract.wire import (
    Order,
    Report,
    VmSpec,
    decode,
    encode,
    order_envelope,
    signed_bytes,
)
from plumbing.backoff import Backoff

OPEN: Final = states.OPEN
FINAL: Final = states.FINAL
# Orders whose outcome the VM's own row follows; the rest belong to moves
# (aggregator.workloads.moves).
VM_ACTIONS: Final = ("create", "start", "stop", "reboot", "delete")
RETRY_MIN_S, RETRY_MAX_S = 2.0, 60.0
_RETRY: Final = Backoff(RETRY_MIN_S, RETRY_MAX_S)
ACCEPTED_RECHECK_S: Final = 20.0

Due = repo.Due  # what :func:`due` lists: order_id, node_id, seq, payload


def issue(conn: Tx, signer: OrderSigner, node_id: str, vm_id: str | None,
          what: OrderParams, now: float, ttl_s: float, *, vm: VmSpec | None = None,
          move_id: str | None = None) -> str:
    """Number, sign and store an order to do ``what`` (its action's typed parameters,
    :mod:`contract.orders`, the node's own reading of them); the dispatcher publishes it."""
    action, params = what.ACTION, what.to_params()
    seq = repo.take_seq(conn, node_id)
    order_id = "ord-" + uuid.uuid4().hex[:20]
    order = Order(node=node_id, seq=seq, order_id=order_id, issued_at=now,
                  expires_at=now + ttl_s, action=action, params=params, vm=vm)
    signature = signer.sign(signed_bytes(order_envelope(order)))
    payload = encode(Order(node=node_id, seq=seq, order_id=order_id, issued_at=now,
                           expires_at=now + ttl_s, action=action, params=params,
                           signature=signature, vm=vm))
    repo.insert_order(conn, repo.NewOrder(order_id, node_id, seq, vm_id, action, payload,
                                          states.INITIAL, now, now + ttl_s, move_id))
    repo.add_history(conn, order_id, now, states.INITIAL)
    return order_id


def due(conn: Tx, now: float, limit: int = 500) -> list[repo.Due]:
    """Orders to publish now: unfinished, not expired, their node online; in sequence."""
    return repo.due(conn, now, limit)


def retry_delay(attempts: int, jitter: float) -> float:
    """How long an order published ``attempts`` times waits for an answer before it goes out
    again: doubling from :data:`RETRY_MIN_S` up to :data:`RETRY_MAX_S`, times 0.5 to 1 by
    ``jitter`` (0 to 1)."""
    return _RETRY.delay(attempts - 1, 0.5 + jitter / 2)


def mark_sent(conn: Tx, order_ids: list[str], now: float) -> None:
    for order_id in order_ids:
        facts = repo.order_facts(conn, order_id)
        if facts is None:
            continue
        attempts = facts.attempts + 1  # every publish counts (/metrics: published, retried)
        repo.count_attempt(conn, order_id, attempts, now)
        if facts.state not in OPEN:  # answered before it was marked: its report came after
            repo.set_latency_since(conn, order_id, now)
            continue
        delay = retry_delay(attempts, random.random())
        if facts.state == "accepted":  # asked how it ended; it stays accepted until it says
            repo.set_recheck(conn, order_id, attempts, now + max(delay, ACCEPTED_RECHECK_S))
            repo.add_history(conn, order_id, now, "accepted", f"asked again (attempt {attempts})")
            continue
        new = states.transition(facts.state, "sent")
        repo.set_published(conn, order_id, new, attempts, now, now + delay)
        repo.add_history(conn, order_id, now, new, f"attempt {attempts}")


def node_online(conn: Tx, node_id: str, now: float) -> None:
    """The node (re)connected: its unfinished orders go out again at once, in sequence (an
    accepted one too: its report may have been lost with the connection)."""
    repo.retry_node_now(conn, node_id, now)


def expire(conn: Tx, now: float) -> int:
    """End the open orders past their expiry; the VM's state says why."""
    rows = repo.expiring(conn, now)
    for row in rows:
        note = f"not finished by its expiry (last state: {row.state})"
        new = states.transition(row.state, "expired")
        repo.end_open(conn, row.id, new, now, note)
        repo.add_history(conn, row.id, now, new, note)
        if row.vm_id and row.action in VM_ACTIONS:
            _vm_order_ended(conn, row.vm_id, row.action, new, {},
                            f"{row.action} order {note}", now)
    return len(rows)


def supersede(conn: Tx, order_id: str, now: float, why: str) -> None:
    """End an open order unpublished: what it asked for no longer holds (it is not sent
    again; a node that still runs it reports in vain). An order that has ended stays as it
    ended."""
    facts = repo.order_facts(conn, order_id)
    if facts is None or facts.state not in OPEN:
        return
    note = f"superseded: {why}"
    new = states.transition(facts.state, "expired")
    repo.end_open(conn, order_id, new, now, note)
    repo.add_history(conn, order_id, now, new, note)


def apply_report(conn: Tx, report: Report, now: float) -> None:
    """A node's account of one of its orders; stale or foreign reports change nothing."""
    facts = repo.order_facts(conn, report.order_id)
    if facts is None or facts.node_id != report.node:
        return
    if report.state == "progress":  # figures while it runs: kept, the state stays
        if facts.state in ("sent", "accepted"):
            repo.set_progress(conn, report.order_id, report.result, now)
        return
    new = states.after_report(facts.state, report.state)
    if new is None:
        return
    late = facts.state == "expired"  # and now succeeded: it ran after all
    repo.set_reported(conn, report.order_id, new, now, report.result, report.error)
    if new in FINAL:  # from its first publish to this report
        repo.set_latency(conn, report.order_id, now)
    if new == "accepted":
        repo.set_next_attempt(conn, report.order_id, now + ACCEPTED_RECHECK_S)
    repo.add_history(conn, report.order_id, now, new,
                     "reported after the order had expired" if late else report.error)
    if new != "accepted" and facts.vm_id and facts.action in VM_ACTIONS:
        _vm_order_ended(conn, facts.vm_id, facts.action, new, dict(report.result),
                        report.error, now, node=report.node)


def _vm_order_ended(conn: Tx, vm_id: str, action: str, outcome: str,
                    result: Mapping[str, Any], error: str, now: float, node: str = "") -> None:
    vm = repo.vm_place(conn, vm_id)
    if vm is None:
        return
    node_id = vm.node_id
    if outcome == "succeeded" and action == "create" and node_id is None and node:
        # A create that expired here but ran on the node: the VM is there, and counts there.
        repo.set_vm_node(conn, vm_id, node)
        node_id = node
    if outcome == "succeeded":
        repo.set_vm_actual(conn, vm_id, str(result.get("state", vm.actual_state)), now)
        if action == "create" and node_id and not residency.staying(conn, vm_id, node_id):
            residency.append(conn, vm_id, "arrived", node_id, now)
        elif action == "delete":
            repo.set_vm_deleted(conn, vm_id, now)
            if node_id:
                residency.append(conn, vm_id, "left", node_id, now)
        return
    reason = f"{action} {outcome}: {error}" if error else f"{action} {outcome}"
    if action == "create":  # it never got there: its place is free again
        repo.set_vm_failed(conn, vm_id, reason, now)
    else:
        repo.set_vm_reason(conn, vm_id, reason, now)


def apply_lifecycle(conn: Tx, node_id: str, vm_uuid: str, state: str,
                    now: float) -> None:
    """libvirt said what a VM is now: its actual state, never guessed."""
    repo.set_vm_actual_on(conn, node_id, vm_uuid, state, now)


def order_json(conn: Tx, order_id: str) -> dict[str, Any] | None:
    found = repo.order_detail(conn, order_id)
    if found is None:
        return None
    out = _summary_json(found.summary)
    out["progress"] = found.progress
    out["move"] = found.move_id
    order = decode(found.payload)  # as signed and sent
    out["params"] = dict(order.params) if isinstance(order, Order) else {}
    out["history"] = [{"ts": h.ts, "state": h.state, "note": h.note}
                      for h in repo.history(conn, order_id)]
    return out


def list_orders(conn: Tx, node: str, vm: str, state: str,
                limit: int) -> list[dict[str, Any]]:
    return [_summary_json(o) for o in repo.find_orders(conn, node, vm, state, limit)]


def _summary_json(o: repo.OrderSummary) -> dict[str, Any]:
    return {"id": o.id, "node": o.node_id, "seq": o.seq, "vm": o.vm_id, "action": o.action,
            "state": o.state, "created_at": o.created_at, "updated_at": o.updated_at,
            "expires_at": o.expires_at, "attempts": o.attempts, "result": o.result,
            "error": o.error}
