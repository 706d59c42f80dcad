"""Drains: a node cordoned and its VMs moved off, a few at a time, until none is left (``done``)
or every VM left has a failed move (``incomplete``)."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

from aggregator.errors import Refused
from aggregator.store import moves as repo
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.workloads.moves_json import move_json
from aggregator.workloads.moves_settings import (
    DRAIN_PARALLEL_MAX,
    Context,
    MoveSettings,
    on_row_error,
)
from aggregator.workloads.moves_start import start

_LATER = ("busy", "moving", "source_offline")  # a VM refused for these has its turn later


def drain(conn: Tx, ctx: Context, node_id: str, settings: MoveSettings,
          parallel: int, now: float, actor: str) -> dict[str, Any]:
    """Cordon the node and move every VM off it, ``parallel`` at a time (by :func:`drive`)."""
    if not 1 <= parallel <= DRAIN_PARALLEL_MAX:
        raise Refused("invalid_request", f"parallel must be from 1 to {DRAIN_PARALLEL_MAX}")
    if repo.node_facts(conn, node_id) is None:
        raise Refused("not_found", f"no node {node_id!r}", 404)
    if repo.running_drain(conn, node_id) is not None:
        return drain_json(conn, node_id) or {}
    drain_id = "dr-" + uuid.uuid4().hex[:16]
    repo.cordon(conn, node_id)
    repo.insert_drain(conn, repo.NewDrain(drain_id, node_id, "running", parallel,
                                          settings.mode, asdict(settings), actor, now))
    audit(conn, now, actor, "node.drain", node_id, drain=drain_id, parallel=parallel,
          mode=settings.mode)
    drive(conn, ctx, now)
    return drain_json(conn, node_id) or {}


def drive(conn: Tx, ctx: Context, now: float) -> int:
    """Start the next moves of every running drain; end the drains with nothing left to try.
    Returns how many moves were started."""
    started = 0
    for row in repo.running_drains(conn):
        with conn.savepoint(on_error=on_row_error(f"drain {row.id}")):
            started += _drive_one(conn, ctx, now, row)
    return started


def _drive_one(conn: Tx, ctx: Context, now: float, row: repo.DrainRow) -> int:
    settings = MoveSettings(**row.settings)
    moves = repo.drain_moves(conn, row.id)
    moving = {m.vm_id for m in moves if not m.finished}
    failed = {m.vm_id for m in moves if m.state == "failed"}
    waiting = [vm.id for vm in repo.vms_on(conn, row.node_id)
               if vm.id not in moving and vm.id not in failed]
    started = 0
    for vm_id in waiting[:max(row.parallel - len(moving), 0)]:
        try:
            start(conn, ctx, vm_id, "", settings, now, row.actor, row.id)
            started += 1
        except Refused as exc:  # recorded as a failed move: the drain reports it
            if exc.code in _LATER:
                continue  # its turn comes later (its own order ends, its node is back)
            repo.insert_move(conn, repo.NewMove(
                "mv-" + uuid.uuid4().hex[:16], vm_id, row.node_id, settings.mode, "failed",
                now, settings=asdict(settings), error=str(exc), drain_id=row.id,
                actor=row.actor, finished_at=now))
    moves = repo.drain_moves(conn, row.id)
    if any(not m.finished for m in moves):
        return started
    left = [vm.id for vm in repo.vms_on(conn, row.node_id)]
    if not left:  # empty, and every VM taken over where it went
        state = "done"
    elif set(left) <= {m.vm_id for m in moves if m.state == "failed"}:
        state = "incomplete"
    else:
        return started
    repo.finish_drain(conn, row.id, state, now)
    audit(conn, now, row.actor, "node.drain." + state, row.node_id, drain=row.id,
          left=len(left))
    return started


def drain_json(conn: Tx, node_id: str) -> dict[str, Any] | None:
    """The node's latest drain with each VM's account: moved, moving, failed (and why), or
    waiting for its turn."""
    found = repo.latest_drain(conn, node_id)
    if found is None:
        return None
    vms_out: dict[str, dict[str, Any]] = {}
    for move in repo.moves_of_drain(conn, found.id):
        m = move_json(move)
        vms_out[m["vm"]] = {"vm": m["vm"], "name": m["vm_name"], "move": m["id"],
                            "dest": m["dest"], "mode": m["mode"],
                            "state": {"succeeded": "moved", "failed": "failed"}.get(
                                m["state"], "moving"),
                            "error": m["error"], "progress": m["progress"]}
    here = repo.vms_on(conn, node_id)
    for vm in here:
        vms_out.setdefault(vm.id, {"vm": vm.id, "name": vm.name, "move": None, "dest": "",
                                   "mode": "", "state": "waiting", "error": "",
                                   "progress": {}})
    listed = sorted(vms_out.values(), key=lambda v: (v["name"] or "", v["vm"]))
    return {"id": found.id, "node": node_id, "state": found.state,
            "parallel": found.parallel, "mode": found.mode, "actor": found.actor,
            "created_at": found.created_at, "updated_at": found.updated_at,
            "finished_at": found.finished_at, "vms_left": len(here), "vms": listed,
            "failed": [v for v in listed if v["state"] == "failed"]}
