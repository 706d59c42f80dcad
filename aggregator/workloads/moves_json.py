"""Moves as the API shows them: one move with its orders (:func:`get`), the newest moves
(:func:`list_moves`), and the JSON of one move (:func:`move_json`), which drains use too."""

from __future__ import annotations

from typing import Any

from aggregator.store import moves as repo
from aggregator.store.tx import Tx


def move_json(m: repo.MoveRow) -> dict[str, Any]:
    """A move; ``progress`` is its migrate's (while it migrates; else {})."""
    return {"id": m.id, "vm": m.vm_id, "vm_name": m.vm_name, "source": m.source,
            "dest": m.dest, "mode": m.mode, "state": m.state, "settings": m.settings,
            "result": m.result, "error": m.error, "drain": m.drain_id, "actor": m.actor,
            "created_at": m.created_at, "updated_at": m.updated_at,
            "finished_at": m.finished_at,
            "step": ({"action": m.step_action, "state": m.step_state} if m.step_action
                     else None),
            "progress": m.progress if m.state == "migrating" else {}}


def get(conn: Tx, move_id: str) -> dict[str, Any] | None:
    found = repo.move(conn, move_id)
    if found is None:
        return None
    out = move_json(found)
    out["orders"] = [{"id": o.id, "node": o.node_id, "action": o.action, "state": o.state,
                      "error": o.error} for o in repo.move_orders(conn, move_id)]
    return out


def list_moves(conn: Tx, vm_id: str, state: str, limit: int
               ) -> list[dict[str, Any]]:
    """The newest ``limit`` moves, of ``vm_id`` if given, in ``state`` if given (``open``:
    every state a move has before it ends)."""
    open_only = state == "open"
    return [move_json(m) for m in repo.find_moves(conn, vm_id, "" if open_only else state,
                                                  open_only, limit)]
