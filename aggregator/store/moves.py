"""Moves as stored: each move with the order it waits for, drains, the VMs a lost node is to
remove when it returns; and the columns of VMs and nodes that moving reads and writes.

Reads and writes only; the modules of moves in :mod:`aggregator.workloads` decide (which step
follows which, where a VM may go, when a drain has ended). The JSON columns (a move's and a
drain's ``settings``, a move's ``result`` and ``prepared``, an order's ``result`` and
``progress``, a node's ``inventory``) are encoded and decoded here. A move in progress holds
its VM's resources on its destination: triggers of migration 007 keep that on insert and when
``finished_at`` is set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aggregator.store.tx import Tx


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What moving reads of a node. ``inventory`` is its last reported inventory ({} when it
    has none or it is not a JSON object)."""

    id: str
    country: str
    provider: str
    reported_status: str
    last_seen: float | None
    interval_s: float
    revoked_at: float | None
    cordoned: bool
    inventory: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class VmToMove:
    node_id: str | None
    desired_state: str
    actual_state: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    name: str


@dataclass(frozen=True, slots=True)
class NewMove:
    id: str
    vm_id: str
    source: str
    mode: str
    state: str
    created_at: float
    dest: str = ""  # "" when no destination could be found
    settings: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    drain_id: str | None = None
    actor: str = ""
    vcpus: int = 0  # held on the destination while the move runs
    memory_mib: int = 0
    disk_gib: int = 0
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class EndedStep:
    """An unfinished move whose current order has ended, with that order's end. Its JSON is
    decoded when read, so that a row we cannot decode fails alone, inside the work on it."""

    move_id: str
    vm_id: str
    source: str
    dest: str
    mode: str
    state: str
    settings_json: str
    error: str  # what the move has recorded so far
    order_action: str
    order_state: str
    order_result_json: str
    order_error: str

    @property
    def settings(self) -> dict[str, Any]:
        """The move's settings as stored (:class:`MoveSettings`' fields)."""
        return _object(self.settings_json)

    @property
    def order_result(self) -> dict[str, Any]:
        return _object(self.order_result_json)


@dataclass(frozen=True, slots=True)
class MoveRow:
    id: str
    vm_id: str
    vm_name: str | None
    source: str
    dest: str
    mode: str
    state: str
    settings: dict[str, Any]
    result: dict[str, Any]
    error: str
    drain_id: str | None
    actor: str
    created_at: float
    updated_at: float
    finished_at: float | None
    step_action: str | None  # None: no current order
    step_state: str | None
    progress: dict[str, Any]  # the current order's progress ({} without one)


@dataclass(frozen=True, slots=True)
class MoveOrder:
    id: str
    node_id: str
    action: str
    state: str
    error: str


@dataclass(frozen=True, slots=True)
class NewDrain:
    id: str
    node_id: str
    state: str
    parallel: int
    mode: str
    settings: Mapping[str, Any]
    actor: str
    created_at: float


@dataclass(frozen=True, slots=True)
class DrainRow:
    """A drain. Its settings are decoded when read, so that a drain whose settings we cannot
    decode fails alone, inside the work on it."""

    id: str
    node_id: str
    state: str
    parallel: int
    mode: str
    settings_json: str
    actor: str
    created_at: float
    updated_at: float
    finished_at: float | None

    @property
    def settings(self) -> dict[str, Any]:
        """The settings its moves start with (:class:`MoveSettings`' fields)."""
        return _object(self.settings_json)


@dataclass(frozen=True, slots=True)
class DrainMove:
    vm_id: str
    state: str
    finished: bool


@dataclass(frozen=True, slots=True)
class VmName:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Restartable:
    vm_id: str
    name: str
    node_id: str  # the lost node
    last_seen: float
    lease_s: float
    state_reason: str


@dataclass(frozen=True, slots=True)
class Eviction:
    vm_id: str
    node_id: str


def _object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text[:80]!r}")
    return value


# --- nodes and VMs --------------------------------------------------------------------------


def node_facts(tx: Tx, node_id: str) -> NodeFacts | None:
    row = tx.execute(
        "SELECT id, country, provider, reported_status, last_seen, interval_s, revoked_at,"
        " cordoned, inventory FROM nodes WHERE id = ?", (node_id,)).fetchone()
    if row is None:
        return None
    (node, country, provider, reported, last_seen, interval_s, revoked_at, cordoned,
     inventory) = row
    try:
        decoded = json.loads(inventory or "{}")
    except ValueError:
        decoded = {}
    return NodeFacts(node, country, provider, reported, last_seen, interval_s, revoked_at,
                     bool(cordoned), decoded if isinstance(decoded, dict) else {})


def node_alt_names(tx: Tx, node_id: str) -> tuple[str, ...]:
    """The subjectAltNames of the node's certificate (none for a node not known)."""
    row = tx.execute("SELECT alt_names FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return tuple(str(row[0]).split()) if row is not None else ()


def cordon(tx: Tx, node_id: str) -> None:
    tx.execute("UPDATE nodes SET cordoned = 1 WHERE id = ?", (node_id,))


def movable_vm(tx: Tx, vm_id: str) -> VmToMove | None:
    """The VM, unless it does not exist or is deleted."""
    row = tx.execute("SELECT node_id, desired_state, actual_state, vcpus, memory_mib,"
                     " disk_gib, name FROM vms WHERE id = ? AND deleted_at IS NULL",
                     (vm_id,)).fetchone()
    return None if row is None else VmToMove(*row)


def vm_desired_state(tx: Tx, vm_id: str) -> str:
    (desired,) = tx.execute("SELECT desired_state FROM vms WHERE id = ?", (vm_id,)).fetchone()
    return str(desired)


def vms_on(tx: Tx, node_id: str) -> list[VmName]:
    """The VMs placed on the node that are not deleted, by name."""
    return [VmName(*row) for row in tx.execute(
        "SELECT id, name FROM vms WHERE node_id = ? AND deleted_at IS NULL ORDER BY name",
        (node_id,))]


def place_vm(tx: Tx, vm_id: str, node_id: str, actual_state: str, now: float,
             reason: str | None = None) -> None:
    """The VM's node and actual state (and its state's reason, when given)."""
    if reason is None:
        tx.execute("UPDATE vms SET node_id = ?, actual_state = ?, updated_at = ? WHERE id = ?",
                   (node_id, actual_state, now, vm_id))
    else:
        tx.execute("UPDATE vms SET node_id = ?, actual_state = ?, state_reason = ?,"
                   " updated_at = ? WHERE id = ?", (node_id, actual_state, reason, now, vm_id))


def note_vm(tx: Tx, vm_id: str, reason: str) -> None:
    """The reason of the VM's state, leaving its ``updated_at`` as it is."""
    tx.execute("UPDATE vms SET state_reason = ? WHERE id = ?", (reason, vm_id))


# --- moves ----------------------------------------------------------------------------------


def open_move(tx: Tx, vm_id: str) -> str | None:
    """The VM's unfinished move, if any."""
    row = tx.execute("SELECT id FROM moves WHERE vm_id = ? AND finished_at IS NULL",
                     (vm_id,)).fetchone()
    return None if row is None else str(row[0])


def insert_move(tx: Tx, move: NewMove) -> None:
    tx.execute(
        "INSERT INTO moves (id, vm_id, source, dest, mode, state, settings, error, drain_id,"
        " actor, vcpus, memory_mib, disk_gib, created_at, updated_at, finished_at) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (move.id, move.vm_id, move.source, move.dest, move.mode, move.state,
         json.dumps(move.settings), move.error, move.drain_id, move.actor, move.vcpus,
         move.memory_mib, move.disk_gib, move.created_at, move.created_at, move.finished_at))


def set_step(tx: Tx, move_id: str, state: str, order_id: str | None, now: float) -> None:
    """The move's state and the order it waits for now."""
    tx.execute("UPDATE moves SET state = ?, step_order = ?, updated_at = ? WHERE id = ?",
               (state, order_id, now, move_id))


def finish_move(tx: Tx, move_id: str, state: str, error: str, now: float) -> None:
    """The move's end (its hold on the destination goes)."""
    tx.execute("UPDATE moves SET state = ?, error = ?, finished_at = ?, updated_at = ?"
               " WHERE id = ?", (state, error, now, now, move_id))


def set_move_error(tx: Tx, move_id: str, error: str) -> None:
    tx.execute("UPDATE moves SET error = ? WHERE id = ?", (error, move_id))


def set_move_result(tx: Tx, move_id: str, result: Mapping[str, Any]) -> None:
    tx.execute("UPDATE moves SET result = ? WHERE id = ?", (json.dumps(result), move_id))


def set_prepared(tx: Tx, move_id: str, prepared: Mapping[str, Any]) -> None:
    """What the destination said it prepared."""
    tx.execute("UPDATE moves SET prepared = ? WHERE id = ?", (json.dumps(prepared), move_id))


def ended_steps(tx: Tx) -> list[EndedStep]:
    """The unfinished moves whose current order has succeeded, failed or expired."""
    return [EndedStep(*row) for row in tx.execute(
        "SELECT m.id, m.vm_id, m.source, m.dest, m.mode, m.state, m.settings, m.error,"
        " o.action, o.state, o.result, o.error FROM moves m JOIN orders o ON o.id ="
        " m.step_order WHERE m.finished_at IS NULL AND o.state IN ('succeeded', 'failed',"
        " 'expired')"
    ).fetchall()]


def count_move_orders(tx: Tx, move_id: str, action: str) -> int:
    """How many orders of ``action`` the move has issued."""
    (n,) = tx.execute("SELECT count(*) FROM orders WHERE move_id = ? AND action = ?",
                      (move_id, action)).fetchone()
    return int(n)


_MOVE_COLUMNS = ("m.id, m.vm_id, v.name, m.source, m.dest, m.mode, m.state, m.settings,"
                 " m.result, m.error, m.drain_id, m.actor, m.created_at, m.updated_at,"
                 " m.finished_at, o.action, o.state, o.progress")
_MOVE_FROM = ("moves m LEFT JOIN vms v ON v.id = m.vm_id"
              " LEFT JOIN orders o ON o.id = m.step_order")


def _move(row: Sequence[Any]) -> MoveRow:
    (move_id, vm_id, name, source, dest, mode, state, settings, result, error, drain_id, actor,
     created, updated, finished, step_action, step_state, progress) = row
    return MoveRow(move_id, vm_id, name, source, dest, mode, state, json.loads(settings),
                   json.loads(result), error, drain_id, actor, created, updated, finished,
                   step_action, step_state, json.loads(progress) if progress else {})


def move(tx: Tx, move_id: str) -> MoveRow | None:
    row = tx.execute(f"SELECT {_MOVE_COLUMNS} FROM {_MOVE_FROM} WHERE m.id = ?",
                     (move_id,)).fetchone()
    return None if row is None else _move(row)


def move_orders(tx: Tx, move_id: str) -> list[MoveOrder]:
    """Every order the move issued, in the order issued."""
    return [MoveOrder(*row) for row in tx.execute(
        "SELECT id, node_id, action, state, error FROM orders WHERE move_id = ?"
        " ORDER BY created_at, rowid", (move_id,))]


def find_moves(tx: Tx, vm_id: str, state: str, open_only: bool, limit: int) -> list[MoveRow]:
    """The newest ``limit`` moves: of ``vm_id``, in ``state`` where given (""), unfinished
    only with ``open_only``."""
    sql, args = f"SELECT {_MOVE_COLUMNS} FROM {_MOVE_FROM} WHERE 1", []
    if vm_id:
        sql += " AND m.vm_id = ?"
        args.append(vm_id)
    if open_only:
        sql += " AND m.finished_at IS NULL"
    if state:
        sql += " AND m.state = ?"
        args.append(state)
    sql += " ORDER BY m.created_at DESC LIMIT ?"
    return [_move(r) for r in tx.execute(sql, [*args, limit])]


# --- drains ---------------------------------------------------------------------------------

_DRAIN_COLUMNS = ("id, node_id, state, parallel, mode, settings, actor, created_at, updated_at,"
                  " finished_at")


def running_drain(tx: Tx, node_id: str) -> str | None:
    """The node's unfinished drain, if any."""
    row = tx.execute("SELECT id FROM drains WHERE node_id = ? AND finished_at IS NULL",
                     (node_id,)).fetchone()
    return None if row is None else str(row[0])


def insert_drain(tx: Tx, drain: NewDrain) -> None:
    tx.execute(
        "INSERT INTO drains (id, node_id, state, parallel, mode, settings, actor, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (drain.id, drain.node_id, drain.state, drain.parallel, drain.mode,
         json.dumps(drain.settings), drain.actor, drain.created_at, drain.created_at))


def running_drains(tx: Tx) -> list[DrainRow]:
    return [DrainRow(*row) for row in tx.execute(
        f"SELECT {_DRAIN_COLUMNS} FROM drains WHERE finished_at IS NULL").fetchall()]


def latest_drain(tx: Tx, node_id: str) -> DrainRow | None:
    row = tx.execute(f"SELECT {_DRAIN_COLUMNS} FROM drains WHERE node_id = ?"
                     " ORDER BY created_at DESC LIMIT 1", (node_id,)).fetchone()
    return None if row is None else DrainRow(*row)


def finish_drain(tx: Tx, drain_id: str, state: str, now: float) -> None:
    tx.execute("UPDATE drains SET state = ?, finished_at = ?, updated_at = ? WHERE id = ?",
               (state, now, now, drain_id))


def drain_moves(tx: Tx, drain_id: str) -> list[DrainMove]:
    """Each move of the drain: its VM, its state, whether it has finished."""
    return [DrainMove(vm_id, state, finished_at is not None)
            for vm_id, state, finished_at in tx.execute(
        "SELECT vm_id, state, finished_at FROM moves WHERE drain_id = ?",
        (drain_id,))]


def moves_of_drain(tx: Tx, drain_id: str) -> list[MoveRow]:
    """The drain's moves, oldest first."""
    return [_move(r) for r in tx.execute(
        f"SELECT {_MOVE_COLUMNS} FROM {_MOVE_FROM} WHERE m.drain_id = ? ORDER BY m.created_at",
        (drain_id,))]


# --- node loss ------------------------------------------------------------------------------


def restartable(tx: Tx, now: float, watching_since: float, grace_s: float,
                restarted_before: float) -> list[Restartable]:
    """The VMs desired running with ``on_node_loss = 'restart'`` whose node said it fences
    (``lease_s`` > 0) and has been silent for longer than its lease plus ``grace_s``, counted
    from ``watching_since`` at the earliest; with no unfinished move, no restart that finished
    after ``restarted_before``, and no open create order to that node."""
    return [Restartable(*row) for row in tx.execute(
        "SELECT v.id, v.name, v.node_id, n.last_seen, n.lease_s, v.state_reason FROM vms v"
        " JOIN nodes n ON n.id = v.node_id WHERE v.deleted_at IS NULL AND v.desired_state ="
        " 'running' AND v.on_node_loss = 'restart' AND n.lease_s > 0 AND n.last_seen IS NOT"
        " NULL AND ? - max(n.last_seen, ?) > n.lease_s + ? AND NOT EXISTS (SELECT 1 FROM"
        " moves m WHERE m.vm_id = v.id AND (m.finished_at IS NULL OR (m.mode = 'restart' AND"
        " m.finished_at > ?))) AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.vm_id = v.id"
        " AND o.node_id = v.node_id AND o.action = 'create' AND o.state IN ('pending',"
        " 'sent', 'accepted'))",
        (now, watching_since, grace_s, restarted_before)).fetchall()]


def add_eviction(tx: Tx, vm_id: str, node_id: str, now: float) -> None:
    """The node's copy of the VM is to be removed when the node returns (again, if it was
    removed before)."""
    tx.execute("INSERT INTO evictions (vm_id, node_id, created_at) VALUES (?, ?, ?) ON"
               " CONFLICT (vm_id, node_id) DO UPDATE SET done_at = NULL, order_id = NULL",
               (vm_id, node_id, now))


def evictions_done(tx: Tx) -> list[Eviction]:
    """Evictions not yet marked done whose order has succeeded."""
    return [Eviction(*row) for row in tx.execute(
        "SELECT e.vm_id, e.node_id FROM evictions e JOIN orders o ON o.id = e.order_id"
        " WHERE e.done_at IS NULL AND o.state = 'succeeded'").fetchall()]


def mark_evicted(tx: Tx, vm_id: str, node_id: str, now: float) -> None:
    tx.execute("UPDATE evictions SET done_at = ? WHERE vm_id = ? AND node_id = ?",
               (now, vm_id, node_id))


def evictions_due(tx: Tx, ended_before: float) -> list[Eviction]:
    """Evictions not done, of online unrevoked nodes, with no order yet or one that failed
    or expired and was last updated before ``ended_before``."""
    return [Eviction(*row) for row in tx.execute(
        "SELECT e.vm_id, e.node_id FROM evictions e JOIN nodes n ON n.id = e.node_id"
        " LEFT JOIN orders o ON o.id = e.order_id WHERE e.done_at IS NULL AND"
        " n.reported_status = 'online' AND n.revoked_at IS NULL AND (o.id IS NULL OR"
        " (o.state IN ('failed', 'expired') AND o.updated_at < ?))",
        (ended_before,)).fetchall()]


def set_eviction_order(tx: Tx, vm_id: str, node_id: str, order_id: str) -> None:
    tx.execute("UPDATE evictions SET order_id = ? WHERE vm_id = ? AND node_id = ?",
               (order_id, vm_id, node_id))
