"""VMs as stored: a new VM, its states, its request and spec, lookups by id or name, the VMs a
reconcile looks at.

Reads and writes only; :mod:`aggregator.workloads.vms` decides. The request and the VmSpec are
JSON in ``TEXT`` columns: this module encodes and decodes them. Rows listed by the thousand
(:class:`VmRow`) are named tuples, made ~6x faster than frozen dataclasses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from aggregator.store.tx import Tx


@dataclass(frozen=True, slots=True)
class NewVm:
    id: str
    name: str
    node_id: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    request: Mapping[str, Any]  # the API request (column ``spec``)
    spec: Mapping[str, Any]  # the VmSpec ordered (column ``vm_spec``)
    anti_affinity: str | None
    on_node_loss: str
    desired_state: str
    actual_state: str
    created_at: float


@dataclass(frozen=True, slots=True)
class VmState:
    node_id: str | None  # None: placed nowhere (its create failed)
    desired_state: str


@dataclass(frozen=True, slots=True)
class OrderState:
    id: str
    state: str


@dataclass(frozen=True, slots=True)
class VmSpecs:
    request: dict[str, Any]  # the API request it was created with
    spec: dict[str, Any] | None  # the VmSpec ordered; None for a VM created before it was kept


class VmRow(NamedTuple):
    """A VM with the liveness columns of its node (all None if it is on no node, or its node
    has gone)."""

    id: str
    name: str
    node_id: str | None
    vcpus: int
    memory_mib: int
    disk_gib: int
    request: dict[str, Any]
    desired_state: str
    actual_state: str
    state_reason: str
    created_at: float
    updated_at: float
    node_reported_status: str | None
    node_last_seen: float | None
    node_interval_s: float | None
    node_revoked_at: float | None


class IdleVm(NamedTuple):
    id: str
    node_id: str
    node_reported_status: str
    node_last_seen: float | None
    node_interval_s: float


def name_in_use(tx: Tx, name: str) -> bool:
    """Whether a VM that is not deleted has this name."""
    return tx.execute("SELECT 1 FROM vms WHERE name = ? AND deleted_at IS NULL",
                      (name,)).fetchone() is not None


def insert_vm(tx: Tx, vm: NewVm) -> None:
    tx.execute(
        "INSERT INTO vms (id, name, node_id, vcpus, memory_mib, disk_gib, spec, anti_affinity,"
        " desired_state, actual_state, created_at, updated_at, vm_spec, on_node_loss) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (vm.id, vm.name, vm.node_id, vm.vcpus, vm.memory_mib, vm.disk_gib,
         json.dumps(vm.request), vm.anti_affinity, vm.desired_state, vm.actual_state,
         vm.created_at, vm.created_at, json.dumps(vm.spec), vm.on_node_loss),
    )


def vm_state(tx: Tx, vm_id: str) -> VmState | None:
    """Where a VM that is not deleted is placed and what is desired of it."""
    row = tx.execute("SELECT node_id, desired_state FROM vms WHERE id = ? AND deleted_at IS"
                     " NULL", (vm_id,)).fetchone()
    return None if row is None else VmState(row[0], row[1])


def last_order(tx: Tx, vm_id: str, action: str) -> OrderState | None:
    """The VM's latest order of ``action`` (by the node's sequence)."""
    row = tx.execute("SELECT id, state FROM orders WHERE vm_id = ? AND action = ? ORDER BY seq"
                     " DESC LIMIT 1", (vm_id, action)).fetchone()
    return None if row is None else OrderState(row[0], row[1])


def mark_deleted(tx: Tx, vm_id: str, now: float) -> None:
    """Desired and actual state ``deleted``, deleted at ``now`` (its place is freed)."""
    tx.execute("UPDATE vms SET desired_state = 'deleted', deleted_at = ?,"
               " actual_state = 'deleted', updated_at = ? WHERE id = ?", (now, now, vm_id))


def set_desired_state(tx: Tx, vm_id: str, state: str, now: float) -> None:
    tx.execute("UPDATE vms SET desired_state = ?, updated_at = ? WHERE id = ?",
               (state, now, vm_id))


_COLUMNS = ("v.id, v.name, v.node_id, v.vcpus, v.memory_mib, v.disk_gib, v.spec,"
            " v.desired_state, v.actual_state, v.state_reason, v.created_at, v.updated_at,"
            " n.reported_status, n.last_seen, n.interval_s, n.revoked_at")
_FROM = "vms v LEFT JOIN nodes n ON n.id = v.node_id"


def _vm_row(row: Sequence[Any]) -> VmRow:
    (vm_id, name, node, vcpus, memory, disk, spec, desired, actual, reason, created,
     updated, reported, last_seen, interval_s, revoked_at) = row
    return VmRow(vm_id, name, node, vcpus, memory, disk, json.loads(spec), desired, actual,
                 reason, created, updated, reported, last_seen, interval_s, revoked_at)


def find_vm(tx: Tx, ref: str) -> VmRow | None:
    """The VM that is not deleted with id or name ``ref`` (the newest, should both match)."""
    row = tx.execute(f"SELECT {_COLUMNS} FROM {_FROM} WHERE (v.id = ? OR v.name = ?)"
                     " AND v.deleted_at IS NULL ORDER BY v.created_at DESC LIMIT 1",
                     (ref, ref)).fetchone()
    return None if row is None else _vm_row(row)


def live_vms(tx: Tx, node_id: str | None = None) -> list[VmRow]:
    """The VMs that are not deleted (only those placed on ``node_id``, if given), by name."""
    sql = f"SELECT {_COLUMNS} FROM {_FROM} WHERE v.deleted_at IS NULL"
    args: list[Any] = []
    if node_id is not None:
        sql += " AND v.node_id = ?"
        args.append(node_id)
    return [_vm_row(r) for r in tx.execute(sql + " ORDER BY v.name", args)]


def idle_vms(tx: Tx, *, actual_states: Sequence[str], open_order_states: Sequence[str],
             no_start_since: float) -> list[IdleVm]:
    """VMs that are not deleted, desired ``running``, in one of ``actual_states``, on an
    unrevoked node, with no order in ``open_order_states``, no ``start`` order created after
    ``no_start_since`` and no unfinished move; with their node's liveness columns."""
    actual = ", ".join("?" * len(actual_states))
    open_ = ", ".join("?" * len(open_order_states))
    return [IdleVm(*row) for row in tx.execute(
        "SELECT v.id, v.node_id, n.reported_status, n.last_seen, n.interval_s FROM vms v"
        " JOIN nodes n ON n.id = v.node_id WHERE v.deleted_at IS NULL AND v.desired_state ="
        f" 'running' AND v.actual_state IN ({actual}) AND"
        " n.revoked_at IS NULL AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.vm_id = v.id"
        f" AND (o.state IN ({open_}) OR (o.action = 'start' AND"
        " o.created_at > ?))) AND NOT EXISTS (SELECT 1 FROM moves m WHERE m.vm_id = v.id AND"
        " m.finished_at IS NULL)",
        (*actual_states, *open_order_states, no_start_since)).fetchall()]


def vm_specs(tx: Tx, vm_id: str) -> VmSpecs | None:
    """The request and the VmSpec a VM was created with (None: no such VM)."""
    row = tx.execute("SELECT spec, vm_spec FROM vms WHERE id = ?", (vm_id,)).fetchone()
    if row is None:
        return None
    request, spec = row
    return VmSpecs(json.loads(request), None if spec is None else json.loads(spec))


def live_vm_id(tx: Tx, ref: str) -> str | None:
    """The id of a VM that is not deleted, by its id or its name."""
    row = tx.execute("SELECT id FROM vms WHERE (id = ? OR name = ?) AND deleted_at IS NULL",
                     (ref, ref)).fetchone()
    return None if row is None else str(row[0])


def newest_vm_id(tx: Tx, ref: str) -> str | None:
    """The id of the newest VM with id or name ``ref``, deleted or not (a residency record
    outlives its VM)."""
    row = tx.execute("SELECT id FROM vms WHERE id = ? OR name = ? ORDER BY created_at DESC"
                     " LIMIT 1", (ref, ref)).fetchone()
    return None if row is None else str(row[0])
