"""Keeping the host at what the journal wants: the plans of ``fencing.py`` and
``recovery.py`` carried out against libvirt and the journal. Each plan's actions run in order;
after one of a VM fails, that VM's others are skipped (and the error logged)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agent.host import images
from agent.host.domainxml import DomainSpecError
from agent.host.hypervisor import Hypervisor, HypervisorError
from agent.orders.context import Context
from agent.orders.fencing import FenceAction, MarkFenced, NotReached, PauseVm, RecordFence
from agent.orders.journal import Journal
from agent.orders.provision import define, spec_from_plain
from agent.orders.recovery import DefineVm, RestoreAction, StartVm

log = logging.getLogger("virt8ra.agent.orders")


async def observe(hv: Hypervisor | None, vm_uuids: Iterable[str],
                  doing: str) -> dict[str, str | None]:
    """libvirt's state of each VM (None: not defined here); one that cannot be read is left
    out, with the error logged as what could not be done (``doing``)."""
    observed: dict[str, str | None] = {}
    for uuid in vm_uuids:
        try:
            if hv is None:
                raise HypervisorError("libvirt is not connected")
            observed[uuid] = await hv.state(uuid)
        except HypervisorError as exc:
            log.error("cannot %s %s: %s", doing, uuid, exc)
    return observed


async def fence(hv: Hypervisor | None, journal: Journal,
                actions: list[FenceAction]) -> tuple[int, int]:
    """Carry out a fence: how many guests were paused, and how many could not be."""
    paused = failed = 0
    skipped: set[str] = set()
    for action in actions:
        if isinstance(action, RecordFence):
            await journal.touch_fenced(action.at)
        elif action.vm_uuid in skipped:
            continue
        elif isinstance(action, NotReached):
            failed += 1
        elif isinstance(action, PauseVm):
            try:
                if hv is None:
                    raise HypervisorError("libvirt is not connected")
                await hv.change_state(action.vm_uuid, "suspend")
            except HypervisorError as exc:
                log.error("cannot pause %s: %s", action.vm_uuid, exc)
                failed += 1
                skipped.add(action.vm_uuid)
                continue
            paused += 1
        elif isinstance(action, MarkFenced):
            await journal.set_state(action.vm_uuid, "running", "fenced")
    return paused, failed


async def restore(ctx: Context, actions: list[RestoreAction]) -> None:
    """Carry out a restore of the desired state."""
    skipped: set[str] = set()
    for action in actions:
        if action.vm_uuid in skipped:
            continue
        try:
            if isinstance(action, DefineVm):
                await define(ctx, spec_from_plain(action.spec))
            elif isinstance(action, StartVm):
                log.info("starting %s: it should run", action.vm_uuid)
                await ctx.hv.start(action.vm_uuid)
        except (HypervisorError, DomainSpecError, images.ImageError) as exc:
            log.error("cannot restore %s: %s", action.vm_uuid, exc)
            skipped.add(action.vm_uuid)
