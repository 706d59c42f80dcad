"""Taking moves a step on: for every open move whose current order has ended, the facts
(:class:`~aggregator.workloads.moves_steps.StepFacts`) are read, the step table decides
(:func:`~aggregator.workloads.moves_steps.decide`), and this module carries the decision out
through the store's repository :mod:`aggregator.store.moves`: the next order, where the VM is
recorded, its residency record, the move's state or end."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from aggregator.store import moves as repo
from aggregator.store import orders as order_repo
from aggregator.store.tx import Tx
from aggregator.workloads import moves_steps as steps
from aggregator.workloads import orders, residency
from aggregator.workloads.moves_settings import MIGRATE_TTL_MARGIN_S, Context, on_row_error
from aggregator.workloads.moves_steps import Do, Next
from contract.orders import AdoptParams, ReleaseParams

# What carrying out a step does besides the move's own state: returns the move's next order,
# if it issued one.
_Effect = Callable[[Tx, Context, repo.EndedStep, Next, float], str | None]


def advance(conn: Tx, ctx: Context, now: float) -> int:
    """Take every open move whose current order has ended one step on. Returns how many.

    An outcome nobody reported is never taken for an answer: a migrate that failed or
    expired is followed by asking the destination (``release``) whether the VM arrived, and
    that question is asked again until it is answered."""
    rows = repo.ended_steps(conn)
    for row in rows:
        with conn.savepoint(on_error=on_row_error(f"move {row.move_id}")):
            _advance_one(conn, ctx, row, now)
    return len(rows)


def _read_facts(conn: Tx, row: repo.EndedStep) -> steps.StepFacts:
    """What :func:`~aggregator.workloads.moves_steps.decide` needs of the move (the
    destination's certificate names and the asks so far, only where it looks at them)."""
    certified = (repo.node_alt_names(conn, row.dest)
                 if steps.checks_certificate(row.state, row.order_state) else ())
    asks = (repo.count_move_orders(conn, row.move_id, steps.ASKED_AGAIN[row.state])
            if steps.counts_asks(row.state, row.order_state) else 0)
    return steps.StepFacts(row.mode, row.state, row.source, row.dest, row.error,
                           row.order_state, row.order_error, row.order_result, certified,
                           asks)


def _advance_one(conn: Tx, ctx: Context, row: repo.EndedStep, now: float) -> None:
    step = steps.decide(_read_facts(conn, row))
    state = steps.transition(row.state, step.state)
    order_id = _EFFECTS[step.do](conn, ctx, row, step, now)
    if state in steps.ENDED:
        _finish(conn, row.move_id, row.vm_id, state, step.reason, now)
        return
    if step.reason:
        repo.set_move_error(conn, row.move_id, step.reason)
    repo.set_step(conn, row.move_id, state, order_id, now)


def _finish(conn: Tx, move_id: str, vm_id: str, state: str, error: str, now: float) -> None:
    """End the move; the VM's state says why when it failed."""
    repo.finish_move(conn, move_id, state, error, now)
    order_repo.set_vm_reason(conn, vm_id, error if state == "failed" else "", now)


# --- the effects, by what the step table says to do -----------------------------------------


def _migrate(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> str:
    node = repo.node_facts(conn, row.dest)
    params = steps.migrate_params(row.vm_id, row.dest, row.mode,
                                  node.country if node else "", node.provider if node else "",
                                  row.order_result, row.settings)
    ttl = steps.migrate_ttl_s(ctx.ttl_s, row.settings, MIGRATE_TTL_MARGIN_S)
    order_id = orders.issue(conn, ctx.signer, row.source, row.vm_id, params, now, ttl,
                            move_id=row.move_id)
    repo.set_prepared(conn, row.move_id, row.order_result)
    return order_id


def _release(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> str:
    return orders.issue(conn, ctx.signer, row.dest, row.vm_id,
                        ReleaseParams(vm_uuid=row.vm_id), now, ctx.ttl_s, move_id=row.move_id)


def _adopt(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> str:
    desired = repo.vm_desired_state(conn, row.vm_id)
    what = AdoptParams(vm_uuid=row.vm_id, mode=row.mode, start=desired == "running")
    return orders.issue(conn, ctx.signer, row.dest, row.vm_id, what, now, ctx.ttl_s,
                        move_id=row.move_id)


def _arrive(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> str:
    """The VM has left the source: it is the destination's now, which takes it over."""
    repo.place_vm(conn, row.vm_id, row.dest, step.vm_state, now)
    residency.append(conn, row.vm_id, "left", row.source, now)
    residency.append(conn, row.vm_id, "arrived", row.dest, now)
    repo.set_move_result(conn, row.move_id, step.result)
    return _adopt(conn, ctx, row, step, now)


def _adopted(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> None:
    order_repo.set_vm_actual(conn, row.vm_id, step.vm_state, now)


def _nothing(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> None:
    return None


def _restarted(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> None:
    """It runs at the destination: the lost node's copy goes when that node returns."""
    repo.add_eviction(conn, row.vm_id, row.source, now)


def _made(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> None:
    """The destination made it from the expired create after all: it counts there."""
    repo.place_vm(conn, row.vm_id, row.dest, step.vm_state, now)
    if not residency.staying(conn, row.vm_id, row.dest):
        residency.append(conn, row.vm_id, "arrived", row.dest, now)
    _restarted(conn, ctx, row, step, now)


def _back(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> None:
    """Nothing was made at the destination: the VM is still (paused) on the lost node, and
    is restarted from there again after ``RESTART_RETRY_S``."""
    repo.place_vm(conn, row.vm_id, row.source, step.vm_state, now)


def _abandon(conn: Tx, ctx: Context, row: repo.EndedStep, step: Next, now: float) -> None:
    """The destination drops what it prepared; the move fails."""
    _release(conn, ctx, row, step, now)


_EFFECTS: Final[Mapping[Do, _Effect]] = {
    Do.MIGRATE: _migrate, Do.ABANDON: _abandon, Do.ARRIVE: _arrive, Do.ASK: _release,
    Do.ADOPT: _adopt, Do.ADOPTED: _adopted, Do.FAIL: _nothing, Do.RESTARTED: _restarted,
    Do.MADE: _made, Do.BACK: _back,
}
