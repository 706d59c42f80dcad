"""Orders as stored: numbered per node, their payloads as signed, their states and history; and
the few columns of a VM that an order's outcome changes.

Reads and writes only; :mod:`aggregator.workloads.orders` decides (which state follows which,
when an order goes out again, what its end means for the VM). The JSON columns ``result`` and
``progress`` are decoded here. Filters on the open states are written out
(``state IN ('pending', 'sent', 'accepted')``) so that SQLite can use the partial index
``orders_open`` (migration 003), whose condition they must imply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aggregator.store.tx import Tx


@dataclass(frozen=True, slots=True)
class NewOrder:
    id: str
    node_id: str
    seq: int
    vm_id: str | None
    action: str
    payload: bytes  # the signed envelope, exactly as it is published
    state: str
    created_at: float
    expires_at: float
    move_id: str | None


@dataclass(frozen=True, slots=True)
class Due:
    """An order to publish: its payload goes to its node as it is."""

    order_id: str
    node_id: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OrderFacts:
    state: str
    attempts: int
    vm_id: str | None
    action: str
    node_id: str


@dataclass(frozen=True, slots=True)
class Expiring:
    id: str
    vm_id: str | None
    action: str
    state: str


@dataclass(frozen=True, slots=True)
class OrderSummary:
    id: str
    node_id: str
    seq: int
    vm_id: str | None
    action: str
    state: str
    created_at: float
    updated_at: float
    expires_at: float
    attempts: int
    result: dict[str, Any]
    error: str


@dataclass(frozen=True, slots=True)
class OrderDetail:
    summary: OrderSummary
    progress: dict[str, Any]
    move_id: str | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    ts: float
    state: str
    note: str


@dataclass(frozen=True, slots=True)
class VmPlace:
    node_id: str | None
    actual_state: str


# --- numbering and storing ------------------------------------------------------------------


def take_seq(tx: Tx, node_id: str) -> int:
    """The node's next order number, taken (each number is used once)."""
    (seq,) = tx.execute("SELECT orders_last_seq + 1 FROM nodes WHERE id = ?",
                        (node_id,)).fetchone()
    tx.execute("UPDATE nodes SET orders_last_seq = ? WHERE id = ?", (seq, node_id))
    return int(seq)


def insert_order(tx: Tx, order: NewOrder) -> None:
    """Store a new order, to be published at once."""
    tx.execute(
        "INSERT INTO orders (id, node_id, seq, vm_id, action, payload, state, created_at,"
        " updated_at, expires_at, next_attempt_at, move_id) VALUES (?, ?, ?, ?, ?, ?, ?,"
        " ?, ?, ?, ?, ?)",
        (order.id, order.node_id, order.seq, order.vm_id, order.action, order.payload,
         order.state, order.created_at, order.created_at, order.expires_at, order.created_at,
         order.move_id),
    )


def add_history(tx: Tx, order_id: str, ts: float, state: str, note: str = "") -> None:
    tx.execute("INSERT INTO order_history (order_id, ts, state, note) VALUES (?, ?, ?, ?)",
               (order_id, ts, state, note))


# --- publishing -----------------------------------------------------------------------------


def due(tx: Tx, now: float, limit: int) -> list[Due]:
    """Open orders whose next attempt has come and that have not expired, of online,
    unrevoked nodes; by node and sequence."""
    return [Due(*row) for row in tx.execute(
        "SELECT o.id, o.node_id, o.seq, o.payload FROM orders o JOIN nodes n ON n.id = o.node_id"
        " WHERE o.state IN ('pending', 'sent', 'accepted') AND o.next_attempt_at <= ?"
        " AND o.expires_at > ?"
        " AND n.reported_status = 'online' AND n.revoked_at IS NULL"
        " ORDER BY o.node_id, o.seq LIMIT ?", (now, now, limit),
    )]


def order_facts(tx: Tx, order_id: str) -> OrderFacts | None:
    row = tx.execute("SELECT state, attempts, vm_id, action, node_id FROM orders WHERE id = ?",
                     (order_id,)).fetchone()
    return None if row is None else OrderFacts(*row)


def count_attempt(tx: Tx, order_id: str, attempts: int, now: float) -> None:
    """The order was published (again): ``attempts`` in all, the first at ``sent_at``."""
    tx.execute("UPDATE orders SET attempts = ?, sent_at = coalesce(sent_at, ?)"
               " WHERE id = ?", (attempts, now, order_id))


def set_latency_since(tx: Tx, order_id: str, sent_at: float) -> None:
    """An order that ended before it was marked published: its latency from ``sent_at`` to
    its last update, if it succeeded or failed and has none yet."""
    tx.execute("UPDATE orders SET latency_s = max(updated_at - ?, 0) WHERE id = ?"
               " AND state IN ('succeeded', 'failed') AND latency_s IS NULL",
               (sent_at, order_id))


def set_recheck(tx: Tx, order_id: str, attempts: int, next_attempt_at: float) -> None:
    """The order is asked about again at ``next_attempt_at``; its state stays."""
    tx.execute("UPDATE orders SET attempts = ?, next_attempt_at = ? WHERE id = ?",
               (attempts, next_attempt_at, order_id))


def set_published(tx: Tx, order_id: str, state: str, attempts: int, now: float,
                  next_attempt_at: float) -> None:
    tx.execute("UPDATE orders SET state = ?, attempts = ?, updated_at = ?,"
               " next_attempt_at = ? WHERE id = ?",
               (state, attempts, now, next_attempt_at, order_id))


def set_next_attempt(tx: Tx, order_id: str, next_attempt_at: float) -> None:
    tx.execute("UPDATE orders SET next_attempt_at = ? WHERE id = ?",
               (next_attempt_at, order_id))


def retry_node_now(tx: Tx, node_id: str, now: float) -> None:
    """The node's open orders are due at ``now``."""
    tx.execute("UPDATE orders SET next_attempt_at = ? WHERE node_id = ? AND state IN"
               " ('pending', 'sent', 'accepted')", (now, node_id))


# --- ending ---------------------------------------------------------------------------------


def expiring(tx: Tx, now: float) -> list[Expiring]:
    """Open orders whose expiry has come."""
    return [Expiring(*row) for row in tx.execute(
        "SELECT id, vm_id, action, state FROM orders WHERE state IN ('pending', 'sent',"
        " 'accepted') AND expires_at <= ?", (now,),
    ).fetchall()]


def end_open(tx: Tx, order_id: str, state: str, now: float, error: str) -> None:
    """Give an order that is still open its final ``state`` with ``error``."""
    tx.execute("UPDATE orders SET state = ?, updated_at = ?, error = ? WHERE id = ?"
               " AND state IN ('pending', 'sent', 'accepted')", (state, now, error, order_id))


def set_progress(tx: Tx, order_id: str, progress: Mapping[str, Any], now: float) -> None:
    tx.execute("UPDATE orders SET progress = ?, updated_at = ? WHERE id = ?",
               (json.dumps(progress), now, order_id))


def set_reported(tx: Tx, order_id: str, state: str, now: float, result: Mapping[str, Any],
                 error: str) -> None:
    tx.execute("UPDATE orders SET state = ?, updated_at = ?, result = ?, error = ? WHERE id = ?",
               (state, now, json.dumps(result), error, order_id))


def set_latency(tx: Tx, order_id: str, now: float) -> None:
    """The order's latency from its first publish to ``now``, if it has none yet."""
    tx.execute("UPDATE orders SET latency_s = max(? - sent_at, 0) WHERE id = ?"
               " AND latency_s IS NULL", (now, order_id))


def open_order_ids(tx: Tx, vm_id: str, node_id: str) -> list[str]:
    """The VM's open orders to ``node_id``."""
    return [str(order_id) for (order_id,) in tx.execute(
        "SELECT id FROM orders WHERE vm_id = ? AND node_id = ? AND state IN ('pending',"
        " 'sent', 'accepted')", (vm_id, node_id)).fetchall()]


def has_open_order(tx: Tx, vm_id: str, actions: Sequence[str]) -> bool:
    """Whether the VM has an open order of one of ``actions``."""
    marks = ", ".join("?" * len(actions))
    return tx.execute("SELECT 1 FROM orders WHERE vm_id = ? AND state IN ('pending', 'sent',"
                      f" 'accepted') AND action IN ({marks})",
                      (vm_id, *actions)).fetchone() is not None


# --- reading --------------------------------------------------------------------------------

_SUMMARY = ("id, node_id, seq, vm_id, action, state, created_at, updated_at, expires_at,"
            " attempts, result, error")


def _summary(row: Sequence[Any]) -> OrderSummary:
    (order_id, node_id, seq, vm_id, action, state, created, updated, expires, attempts,
     result, error) = row
    return OrderSummary(order_id, node_id, seq, vm_id, action, state, created, updated,
                        expires, attempts, json.loads(result), error)


def order_detail(tx: Tx, order_id: str) -> OrderDetail | None:
    row = tx.execute(f"SELECT {_SUMMARY}, progress, move_id, payload FROM orders WHERE id = ?",
                     (order_id,)).fetchone()
    if row is None:
        return None
    progress, move_id, payload = row[12:]
    return OrderDetail(_summary(row[:12]), json.loads(progress), move_id, bytes(payload))


def history(tx: Tx, order_id: str) -> list[HistoryEntry]:
    return [HistoryEntry(*row) for row in tx.execute(
        "SELECT ts, state, note FROM order_history WHERE order_id = ? ORDER BY ts, rowid",
        (order_id,))]


def find_orders(tx: Tx, node_id: str, vm_id: str, state: str, limit: int) -> list[OrderSummary]:
    """The newest ``limit`` orders, of ``node_id``, ``vm_id`` and in ``state`` where given
    ("": any)."""
    sql = f"SELECT {_SUMMARY} FROM orders WHERE 1"
    args: list[Any] = []
    for column, value in (("node_id", node_id), ("vm_id", vm_id), ("state", state)):
        if value:
            sql += f" AND {column} = ?"
            args.append(value)
    sql += " ORDER BY created_at DESC, seq DESC LIMIT ?"
    args.append(limit)
    return [_summary(r) for r in tx.execute(sql, args)]


# --- the VM an order is about ---------------------------------------------------------------


def vm_place(tx: Tx, vm_id: str) -> VmPlace | None:
    """Where the VM is placed and what it is (deleted or not)."""
    row = tx.execute("SELECT node_id, actual_state FROM vms WHERE id = ?", (vm_id,)).fetchone()
    return None if row is None else VmPlace(row[0], row[1])


def set_vm_node(tx: Tx, vm_id: str, node_id: str) -> None:
    tx.execute("UPDATE vms SET node_id = ? WHERE id = ?", (node_id, vm_id))


def set_vm_actual(tx: Tx, vm_id: str, actual_state: str, now: float) -> None:
    """The VM's actual state, with no reason (it is what was asked for)."""
    tx.execute("UPDATE vms SET actual_state = ?, state_reason = '', updated_at = ?"
               " WHERE id = ?", (actual_state, now, vm_id))


def set_vm_deleted(tx: Tx, vm_id: str, now: float) -> None:
    tx.execute("UPDATE vms SET deleted_at = ?, actual_state = 'deleted' WHERE id = ?",
               (now, vm_id))


def set_vm_failed(tx: Tx, vm_id: str, reason: str, now: float) -> None:
    """The VM's creation failed: placed nowhere (its room is free again)."""
    tx.execute("UPDATE vms SET actual_state = 'failed', state_reason = ?, node_id = NULL,"
               " updated_at = ? WHERE id = ?", (reason, now, vm_id))


def set_vm_reason(tx: Tx, vm_id: str, reason: str, now: float) -> None:
    tx.execute("UPDATE vms SET state_reason = ?, updated_at = ? WHERE id = ?",
               (reason, now, vm_id))


def set_vm_actual_on(tx: Tx, node_id: str, vm_id: str, actual_state: str, now: float) -> None:
    """The actual state of a VM that is not deleted, if it is placed on ``node_id``."""
    tx.execute("UPDATE vms SET actual_state = ?, updated_at = ? WHERE id = ? AND node_id = ?"
               " AND deleted_at IS NULL", (actual_state, now, vm_id, node_id))
