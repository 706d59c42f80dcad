"""Rows put where a repository reads them, for the repositories' tests: the schema's own
SQL, nothing of the domain; JSON columns given as plain data."""

from __future__ import annotations

import json
from typing import Any

from aggregator.store.tx import Tx


def add_node(tx: Tx, node_id: str, **columns: Any) -> None:
    """A node row; JSON columns given as plain data."""
    values: dict[str, Any] = {"id": node_id, **columns}
    for key in ("inventory", "facts"):
        if key in values and values[key] is not None:
            values[key] = json.dumps(values[key])
    tx.execute(f"INSERT INTO nodes ({', '.join(values)}) VALUES"
               f" ({', '.join('?' * len(values))})", list(values.values()))


def add_vm(tx: Tx, vm_id: str, node_id: str | None, **columns: Any) -> None:
    values: dict[str, Any] = {
        "id": vm_id, "name": vm_id, "node_id": node_id, "vcpus": 1, "memory_mib": 512,
        "disk_gib": 1, "spec": json.dumps({"name": vm_id}), "desired_state": "running",
        "created_at": 0.0, "updated_at": 0.0, **columns}
    tx.execute(f"INSERT INTO vms ({', '.join(values)}) VALUES"
               f" ({', '.join('?' * len(values))})", list(values.values()))


def add_order(tx: Tx, order_id: str, node_id: str, seq: int, vm_id: str | None, action: str,
              state: str, **columns: Any) -> None:
    values: dict[str, Any] = {
        "id": order_id, "node_id": node_id, "seq": seq, "vm_id": vm_id, "action": action,
        "payload": b"", "state": state, "created_at": 0.0, "updated_at": 0.0,
        "expires_at": 0.0, "next_attempt_at": 0.0, **columns}
    tx.execute(f"INSERT INTO orders ({', '.join(values)}) VALUES"
               f" ({', '.join('?' * len(values))})", list(values.values()))


def add_move(tx: Tx, move_id: str, vm_id: str, source: str, dest: str,
             finished_at: float | None = None, state: str = "migrating",
             held: tuple[int, int, int] = (0, 0, 0)) -> None:
    """A move; ``held``: the vCPUs, MiB and GiB it holds on ``dest`` while open."""
    tx.execute("INSERT INTO moves (id, vm_id, source, dest, mode, state, vcpus, memory_mib,"
               " disk_gib, created_at, updated_at, finished_at) VALUES"
               " (?, ?, ?, ?, 'live', ?, ?, ?, ?, 0, 0, ?)",
               (move_id, vm_id, source, dest, state, *held, finished_at))
