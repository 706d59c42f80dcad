"""The handlers of a VM's life on this node: create, start, stop, reboot, delete (and evict,
which deletes). Each is idempotent: a VM that exists is not defined again, one that is gone
is not an error to delete; an order finished after a restart does what is left."""

from __future__ import annotations

import logging

from agent.host.hypervisor import HypervisorError
from agent.orders.context import Context, Job, Outcome
from agent.orders.errors import Refused
from agent.orders.journal import Desired
from agent.orders.provision import check_limits, define, remove_files
from contract.orders import (
    CreateParams,
    DeleteParams,
    EvictParams,
    RebootParams,
    StartParams,
    StopParams,
)
from contract.wire import to_plain

log = logging.getLogger("virt8ra.agent.orders")


async def create(ctx: Context, job: Job[CreateParams]) -> Outcome:
    spec = job.spec()
    hv = ctx.hv
    state = await hv.state(spec.uuid)
    defined_here = state is None
    if defined_here:  # not created before (or a kill came before the define)
        await check_limits(ctx, spec)
        await define(ctx, spec)
        state = await hv.state(spec.uuid)
    if state != "running":
        try:
            await hv.start(spec.uuid)
        except HypervisorError:
            if defined_here and hv.alive():  # a VM that never ran leaves nothing behind
                await hv.undefine(spec.uuid)
                remove_files(ctx.settings.storage, spec.uuid)
            raise
    return Outcome({"state": await hv.state(spec.uuid) or "gone"},
                   Desired(spec.uuid, to_plain(spec), "running"))


async def undo_create(ctx: Context, vm_uuid: str) -> None:
    """A create that will not be finished leaves nothing behind, as one that failed does:
    its report says failed, and the aggregator may make the VM elsewhere. A VM this node
    already had before the order (its journal wants it) stays."""
    if not vm_uuid or await ctx.journal.desired_of(vm_uuid) is not None:
        return
    try:
        await ctx.hv.undefine(vm_uuid)  # stopped first if it runs
    except HypervisorError as exc:
        log.error("cannot remove %s, half made by an unfinished create: %s", vm_uuid, exc)
        return
    remove_files(ctx.settings.storage, vm_uuid)


async def start(ctx: Context, job: Job[StartParams]) -> Outcome:
    uuid = job.uuid()
    await _not_before_fence(ctx, job)
    state = await ctx.hv.state(uuid)
    if state == "paused":  # e.g. paused by the node's own fencing
        await ctx.hv.change_state(uuid, "resume")
    elif state != "running":
        await ctx.hv.start(uuid)
    return Outcome({"state": await ctx.hv.state(uuid) or "gone"}, Desired(uuid, {}, "running"))


async def _not_before_fence(ctx: Context, job: Job[StartParams]) -> None:
    """An order to start a fenced VM counts only if it was issued after the fence: one
    issued before may be stale (the VM may have been started elsewhere since)."""
    want = await ctx.journal.desired_of(job.vm_uuid)
    fenced_at = await ctx.journal.fenced_at()
    if want is not None and want.state == "fenced" and fenced_at is not None \
            and job.order.issued_at < fenced_at:
        raise Refused("issued before this node, cut off past its lease, paused the VM"
                      " (it may run elsewhere now)")


async def stop(ctx: Context, job: Job[StopParams]) -> Outcome:
    uuid = job.uuid()
    if await ctx.hv.state(uuid) not in (None, "shut off"):
        await ctx.hv.shutdown(uuid, ctx.settings.storage.shutdown_timeout_s)
    return Outcome({"state": await ctx.hv.state(uuid) or "gone"}, Desired(uuid, {}, "stopped"))


async def reboot(ctx: Context, job: Job[RebootParams]) -> Outcome:
    uuid = job.uuid()
    await ctx.hv.reboot(uuid)
    return Outcome({"state": await ctx.hv.state(uuid) or "gone"})


async def delete(ctx: Context, job: Job[DeleteParams] | Job[EvictParams]) -> Outcome:
    """Gone from this node: its domain, its files, what the journal wanted of it."""
    uuid = job.uuid()
    existed = await ctx.hv.undefine(uuid)
    remove_files(ctx.settings.storage, uuid)
    return Outcome({"state": "deleted", "existed": existed}, forget=uuid)
