"""The destination's side of a move: ``receive`` (check the VM may and can come here, and
prepare its files), ``adopt`` (take it over once it arrived), ``release`` (drop what was
prepared for a move that failed, unless the VM did arrive)."""

from __future__ import annotations

from agent.orders.context import Context, Job, Outcome
from agent.orders.errors import Refused
from agent.orders.journal import Desired
from agent.orders.provision import check_limits, define, prepare, remove_files, spec_from_plain
from contract.orders import AdoptParams, ReceiveParams, ReleaseParams
from contract.wire import to_plain


async def receive(ctx: Context, job: Job[ReceiveParams]) -> Outcome:
    """Check the VM may and can come here, and prepare its files (images fetched, an empty
    disk on the same base). It is ``incoming`` until adopted: never started from here."""
    spec = job.spec()
    want = await ctx.journal.desired_of(spec.uuid)
    if want is not None and want.state != "incoming":
        raise Refused("the VM is on this node already")
    if want is None and await ctx.hv.state(spec.uuid) is not None:
        raise Refused("a guest with the VM's id is defined on this node already")
    migration = ctx.settings.migration
    if job.params.mode == "live" and not migration.address:
        raise Refused("this node takes no live migrations: its [libvirt]"
                      " migration_address is not set")
    await check_limits(ctx, spec)
    files = await prepare(ctx, spec)
    offers = await ctx.hv.host_offers(files.domain_type)  # the source checks the guest on it
    result = {"address": migration.address, "domain_type": files.domain_type,
              **offers.as_result(), **{k: str(v) for k, v in files.paths().items()}}
    return Outcome(result, Desired(spec.uuid, to_plain(spec), "incoming"))


async def adopt(ctx: Context, job: Job[AdoptParams]) -> Outcome:
    """The destination takes the VM over: it is this node's from now on. After a cold move
    it is defined here (if its disk did not bring the definition) and booted."""
    uuid, hv = job.uuid(), ctx.hv
    want = await ctx.journal.desired_of(uuid)
    if want is None:
        raise Refused("this node did not prepare to receive the VM")
    state = await hv.state(uuid)
    if job.params.mode == "live":
        if state is None:
            raise Refused("the VM has not arrived on this node")
        if await hv.job_stats(uuid) is not None:
            raise Refused("the VM is still arriving: ask again")
        if state in ("shut off", "crashed"):  # e.g. this host restarted since it came
            await hv.start(uuid)
        return Outcome({"state": await hv.state(uuid) or "gone"}, Desired(uuid, {}, "running"))
    if state not in (None, "shut off", "crashed"):
        await hv.destroy(uuid)  # arrived paused with its disk: it boots afresh
    if state is None and want.spec:
        await define(ctx, spec_from_plain(want.spec))
    if job.params.start:
        await hv.start(uuid)
    return Outcome({"state": await hv.state(uuid) or "gone"},
                   Desired(uuid, {}, "running" if job.params.start else "stopped"))


async def release(ctx: Context, job: Job[ReleaseParams]) -> Outcome:
    """A move or restart here failed (or its outcome is unknown): drop what was prepared,
    unless the VM did arrive; then say so, and keep it. Once this answered "not here",
    the VM is never made here from an earlier order: those are replays now, and what the
    journal still wanted of it is forgotten (a restart would define it again)."""
    uuid = job.uuid()
    state = await ctx.hv.state(uuid)
    if state is not None:
        if await ctx.hv.job_stats(uuid) is not None:
            raise Refused("a migration of the VM is still arriving: ask again")
        return Outcome({"present": True, "state": state})
    want = await ctx.journal.desired_of(uuid)
    if want is not None:
        await ctx.journal.forget(uuid)
    if want is None or want.state == "incoming":  # prepared (or half, by a refused one)
        remove_files(ctx.settings.storage, uuid)
    return Outcome({"present": False})
