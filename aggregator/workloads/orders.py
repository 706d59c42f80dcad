"""Orders to nodes: issued, signed and stored before they are published; tracked to an end.

States: ``pending`` (stored, not yet published) → ``sent`` → ``accepted`` (the node journaled
it) → ``succeeded`` | ``failed``; or ``expired`` when it could not finish by its expiry.
An unfinished order is published again, in sequence, when its node comes back online and
with backoff while it stays unanswered; the node answers a duplicate with its recorded
result, so nothing runs twice. An accepted order is asked about again the same way (every
:data:`ACCEPTED_RECHECK_S` at first): its final report may have been lost (a broker that
crashed after acknowledging it), and the node answers with the outcome it recorded, or
nothing while it still runs. Each node's orders are numbered; the node refuses a number
it has already seen.

The functions take a sqlite3 connection (or the store's sqlite-utils Database) and run on the
store's writer thread, inside its transaction.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any, Final

from aggregator.store.tx import Tx
from aggregator.trust.pki import OrderSigner
from aggregator.workloads import residency
from contract.wire import (
    Order,
    Report,
    Scalar,
    VmSpec,
    decode,
    encode,
    order_envelope,
    signed_bytes,
)

OPEN: Final = ("pending", "sent", "accepted")
# Orders whose outcome the VM's own row follows; the rest belong to moves
# (aggregator.workloads.moves).
VM_ACTIONS: Final = ("create", "start", "stop", "reboot", "delete")
FINAL: Final = ("succeeded", "failed", "expired")
RETRY_MIN_S, RETRY_MAX_S = 2.0, 60.0
ACCEPTED_RECHECK_S: Final = 20.0


@dataclass(frozen=True, slots=True)
class Due:
    order_id: str
    node_id: str
    seq: int
    payload: bytes


def _history(conn: Tx, order_id: str, now: float, state: str,
             note: str = "") -> None:
    conn.execute("INSERT INTO order_history (order_id, ts, state, note) VALUES (?, ?, ?, ?)",
                 (order_id, now, state, note))


def issue(conn: Tx, signer: OrderSigner, node_id: str, vm_id: str | None,
          action: str, now: float, ttl_s: float, *, vm: VmSpec | None = None,
          params: dict[str, Scalar] | None = None, move_id: str | None = None) -> str:
    """Number, sign and store an order; it is published by the dispatcher."""
    (seq,) = conn.execute("SELECT orders_last_seq + 1 FROM nodes WHERE id = ?",
                          (node_id,)).fetchone()
    conn.execute("UPDATE nodes SET orders_last_seq = ? WHERE id = ?", (seq, node_id))
    order_id = "ord-" + uuid.uuid4().hex[:20]
    order = Order(node=node_id, seq=seq, order_id=order_id, issued_at=now,
                  expires_at=now + ttl_s, action=action, params=params or {}, vm=vm)
    signature = signer.sign(signed_bytes(order_envelope(order)))
    payload = encode(Order(node=node_id, seq=seq, order_id=order_id, issued_at=now,
                           expires_at=now + ttl_s, action=action, params=params or {},
                           signature=signature, vm=vm))
    conn.execute(
        "INSERT INTO orders (id, node_id, seq, vm_id, action, payload, state, created_at,"
        " updated_at, expires_at, next_attempt_at, move_id) VALUES (?, ?, ?, ?, ?, ?, 'pending',"
        " ?, ?, ?, ?, ?)",
        (order_id, node_id, seq, vm_id, action, payload, now, now, now + ttl_s, now, move_id),
    )
    _history(conn, order_id, now, "pending")
    return order_id


def due(conn: Tx, now: float, limit: int = 500) -> list[Due]:
    """Orders to publish now: unfinished, not expired, their node online; in sequence."""
    return [Due(*row) for row in conn.execute(
        "SELECT o.id, o.node_id, o.seq, o.payload FROM orders o JOIN nodes n ON n.id = o.node_id"
        " WHERE o.state IN ('pending', 'sent', 'accepted') AND o.next_attempt_at <= ?"
        " AND o.expires_at > ?"
        " AND n.reported_status = 'online' AND n.revoked_at IS NULL"
        " ORDER BY o.node_id, o.seq LIMIT ?", (now, now, limit),
    )]


def mark_sent(conn: Tx, order_ids: list[str], now: float) -> None:
    for order_id in order_ids:
        row = conn.execute("SELECT state, attempts FROM orders WHERE id = ?",
                           (order_id,)).fetchone()
        if row is None:
            continue
        attempts = row[1] + 1  # every publish counts (/metrics: published, retried)
        conn.execute("UPDATE orders SET attempts = ?, sent_at = coalesce(sent_at, ?)"
                     " WHERE id = ?", (attempts, now, order_id))
        if row[0] not in OPEN:  # answered before it was marked: its report came after `now`
            conn.execute("UPDATE orders SET latency_s = max(updated_at - ?, 0) WHERE id = ?"
                         " AND state IN ('succeeded', 'failed') AND latency_s IS NULL",
                         (now, order_id))
            continue
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (attempts - 1)) * (0.5 + random.random() / 2)
        if row[0] == "accepted":  # asked how it ended; it stays accepted until it says
            conn.execute("UPDATE orders SET attempts = ?, next_attempt_at = ? WHERE id = ?",
                         (attempts, now + max(delay, ACCEPTED_RECHECK_S), order_id))
            _history(conn, order_id, now, "accepted", f"asked again (attempt {attempts})")
            continue
        conn.execute("UPDATE orders SET state = 'sent', attempts = ?, updated_at = ?,"
                     " next_attempt_at = ? WHERE id = ?", (attempts, now, now + delay, order_id))
        _history(conn, order_id, now, "sent", f"attempt {attempts}")


def node_online(conn: Tx, node_id: str, now: float) -> None:
    """The node (re)connected: its unfinished orders go out again at once, in sequence (an
    accepted one too: its report may have been lost with the connection)."""
    conn.execute("UPDATE orders SET next_attempt_at = ? WHERE node_id = ? AND state IN"
                 " ('pending', 'sent', 'accepted')", (now, node_id))


def expire(conn: Tx, now: float) -> int:
    """End the open orders past their expiry; the VM's state says why."""
    rows = conn.execute(
        "SELECT id, vm_id, action, state FROM orders WHERE state IN ('pending', 'sent',"
        " 'accepted') AND expires_at <= ?", (now,),
    ).fetchall()
    for order_id, vm_id, action, state in rows:
        note = f"not finished by its expiry (last state: {state})"
        conn.execute("UPDATE orders SET state = 'expired', updated_at = ?, error = ? WHERE id = ?",
                     (now, note, order_id))
        _history(conn, order_id, now, "expired", note)
        if vm_id and action in VM_ACTIONS:
            _vm_order_ended(conn, vm_id, action, "expired", {}, f"{action} order {note}", now)
    return len(rows)


def supersede(conn: Tx, order_id: str, now: float, why: str) -> None:
    """End an open order unpublished: what it asked for no longer holds (it is not sent
    again; a node that still runs it reports in vain)."""
    note = f"superseded: {why}"
    conn.execute("UPDATE orders SET state = 'expired', updated_at = ?, error = ? WHERE id = ?"
                 " AND state IN ('pending', 'sent', 'accepted')", (now, note, order_id))
    _history(conn, order_id, now, "expired", note)


def apply_report(conn: Tx, report: Report, now: float) -> None:
    """A node's account of one of its orders; stale or foreign reports change nothing."""
    row = conn.execute("SELECT state, vm_id, action, node_id FROM orders WHERE id = ?",
                       (report.order_id,)).fetchone()
    if row is None or row[3] != report.node:
        return
    state, vm_id, action, _ = row
    if report.state == "progress":  # figures while it runs: kept, the state stays
        if state in ("sent", "accepted"):
            conn.execute("UPDATE orders SET progress = ?, updated_at = ? WHERE id = ?",
                         (json.dumps(report.result), now, report.order_id))
        return
    new = report.state if report.state in ("accepted", "succeeded", "failed") else "failed"
    late = state == "expired" and new == "succeeded"  # it ran after all: what is, counts
    if (state in FINAL and not late) or (new == "accepted" and state == "accepted"):
        return
    conn.execute("UPDATE orders SET state = ?, updated_at = ?, result = ?, error = ? WHERE id = ?",
                 (new, now, json.dumps(report.result), report.error, report.order_id))
    if new in FINAL:  # from its first publish to this report
        conn.execute("UPDATE orders SET latency_s = max(? - sent_at, 0) WHERE id = ?"
                     " AND latency_s IS NULL", (now, report.order_id))
    if new == "accepted":
        conn.execute("UPDATE orders SET next_attempt_at = ? WHERE id = ?",
                     (now + ACCEPTED_RECHECK_S, report.order_id))
    _history(conn, report.order_id, now, new,
             "reported after the order had expired" if late else report.error)
    if new != "accepted" and vm_id and action in VM_ACTIONS:
        _vm_order_ended(conn, vm_id, action, new, dict(report.result), report.error, now,
                        node=report.node)


def _vm_order_ended(conn: Tx, vm_id: str, action: str, outcome: str,
                    result: dict[str, Any], error: str, now: float, node: str = "") -> None:
    vm = conn.execute("SELECT node_id, actual_state FROM vms WHERE id = ?", (vm_id,)).fetchone()
    if vm is None:
        return
    node_id, actual = vm
    if outcome == "succeeded" and action == "create" and node_id is None and node:
        # A create that expired here but ran on the node: the VM is there, and counts there.
        conn.execute("UPDATE vms SET node_id = ? WHERE id = ?", (node, vm_id))
        node_id = node
    if outcome == "succeeded":
        state = str(result.get("state", actual))
        conn.execute("UPDATE vms SET actual_state = ?, state_reason = '', updated_at = ?"
                     " WHERE id = ?", (state, now, vm_id))
        if action == "create" and node_id and not residency.staying(conn, vm_id, node_id):
            residency.append(conn, vm_id, "arrived", node_id, now)
        elif action == "delete":
            conn.execute("UPDATE vms SET deleted_at = ?, actual_state = 'deleted' WHERE id = ?",
                         (now, vm_id))
            if node_id:
                residency.append(conn, vm_id, "left", node_id, now)
        return
    reason = f"{action} {outcome}: {error}" if error else f"{action} {outcome}"
    if action == "create":  # it never got there: its place is free again
        conn.execute("UPDATE vms SET actual_state = 'failed', state_reason = ?, node_id = NULL,"
                     " updated_at = ? WHERE id = ?", (reason, now, vm_id))
    else:
        conn.execute("UPDATE vms SET state_reason = ?, updated_at = ? WHERE id = ?",
                     (reason, now, vm_id))


def apply_lifecycle(conn: Tx, node_id: str, vm_uuid: str, state: str,
                    now: float) -> None:
    """libvirt said what a VM is now: its actual state, never guessed."""
    conn.execute("UPDATE vms SET actual_state = ?, updated_at = ? WHERE id = ? AND node_id = ?"
                 " AND deleted_at IS NULL", (state, now, vm_uuid, node_id))


def order_json(conn: Tx, order_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT id, node_id, seq, vm_id, action, state, created_at, updated_at, expires_at,"
        " attempts, result, error FROM orders WHERE id = ?", (order_id,),
    ).fetchone()
    if row is None:
        return None
    out = _row(row)
    progress, move_id, payload = conn.execute(
        "SELECT progress, move_id, payload FROM orders WHERE id = ?", (order_id,)).fetchone()
    out["progress"] = json.loads(progress)
    out["move"] = move_id
    order = decode(bytes(payload))  # as signed and sent
    out["params"] = dict(order.params) if isinstance(order, Order) else {}
    out["history"] = [
        {"ts": ts, "state": st, "note": note} for ts, st, note in conn.execute(
            "SELECT ts, state, note FROM order_history WHERE order_id = ? ORDER BY ts, rowid",
            (order_id,),
        )
    ]
    return out


def list_orders(conn: Tx, node: str, vm: str, state: str,
                limit: int) -> list[dict[str, Any]]:
    sql = ("SELECT id, node_id, seq, vm_id, action, state, created_at, updated_at, expires_at,"
           " attempts, result, error FROM orders WHERE 1")
    args: list[Any] = []
    for column, value in (("node_id", node), ("vm_id", vm), ("state", state)):
        if value:
            sql += f" AND {column} = ?"
            args.append(value)
    sql += " ORDER BY created_at DESC, seq DESC LIMIT ?"
    args.append(limit)
    return [_row(r) for r in conn.execute(sql, args)]


def _row(row: tuple[Any, ...]) -> dict[str, Any]:
    (order_id, node_id, seq, vm_id, action, state, created, updated, expires, attempts,
     result, error) = row
    return {"id": order_id, "node": node_id, "seq": seq, "vm": vm_id, "action": action,
            "state": state, "created_at": created, "updated_at": updated,
            "expires_at": expires, "attempts": attempts, "result": json.loads(result),
            "error": error}
