"""The source's side of a move: the ``migrate`` handler. The destination the order names is
checked against the VM's own residency policy (as this node recorded it) and against what the
guest needs of a host, then the VM goes there peer to peer: live, or cold (stopped here, its
disk copied, defined and started there). It runs beside the orders after it (runner.py)."""

from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Final

from agent.host import images
from agent.host.compat import HostOffers, guest_needs, misfits
from agent.host.domainxml import retarget
from agent.host.hypervisor import MigrationProgress, MigrationResult
from agent.orders.context import Context, Job, Outcome
from agent.orders.errors import Refused
from agent.orders.provision import remove_files
from contract.orders import MigrateParams

# A migration is aborted this long before its order expires (so the aggregator never acts on
# an expired migrate while it still runs), and not begun with less than MIGRATION_MIN_S left.
ORDER_END_MARGIN_S: Final = 30.0
MIGRATION_MIN_S: Final = 10.0
DEFAULT_MIGRATION_TIMEOUT_S: Final = 600.0


async def migrate(ctx: Context, job: Job[MigrateParams]) -> Outcome:
    uuid = job.uuid()
    result = await _leave(ctx, job, uuid)
    remove_files(ctx.settings.storage, uuid)
    return Outcome(result, forget=uuid)


async def _leave(ctx: Context, job: Job[MigrateParams], uuid: str) -> dict[str, Any]:
    """Migrate, with the VM marked ``leaving`` meanwhile: an agent killed in the middle
    never starts it again here by itself (it may be running at the destination). A
    failed move puts the mark back only if the VM is still here."""
    want = await ctx.journal.desired_of(uuid)
    before = want.state if want is not None else ""
    if before in ("running", "stopped"):
        await ctx.journal.set_state(uuid, before, "leaving")
    try:
        return await _move(ctx, job, uuid)
    except BaseException:
        if before in ("running", "stopped") and ctx.hv.alive() \
                and await ctx.hv.state(uuid) is not None:
            await ctx.journal.set_state(uuid, "leaving", before)
        raise


async def _move(ctx: Context, job: Job[MigrateParams], uuid: str) -> dict[str, Any]:
    p, hv = job.params, ctx.hv
    await _check_destination(ctx, p, uuid)
    state = await hv.state(uuid)
    if state is None:
        raise Refused("the VM is not on this node")
    xml = await hv.domain_xml(uuid)
    here = files_of(xml)
    theirs = {"disk": p.disk, "kernel": p.kernel, "initrd": p.initrd, "serial": p.serial}
    mapping = {path: theirs.get(role) or "" for role, path in here.items()}
    missing = [role for role, new in mapping.items() if not new]
    if missing:
        raise Refused(f"the destination gave no path for the VM's {', '.join(missing)}")
    disk = here.get("disk")
    backing = has_backing(xml)
    if backing is None:  # the XML does not say (a guest not running): the file does
        backing = disk is not None and await images.backing_file(Path(disk)) is not None
    offers = HostOffers.from_params({"dest_arch": p.dest_arch, "dest_machines": p.dest_machines,
                                     "dest_cpu_models": p.dest_cpu_models})
    if offers is not None and (p.mode == "live" or disk is not None):  # libvirt moves it
        why = misfits(guest_needs(xml), offers)
        if why:
            raise Refused(f"the guest cannot run on {p.dest} as it runs here: "
                          + "; ".join(why))
    limits = limits_of(p)
    left = job.order.expires_at - time.time() - ORDER_END_MARGIN_S
    if left < MIGRATION_MIN_S:
        raise Refused(f"only {max(left, 0):.0f} s of the order's life is left: too little"
                      " to migrate")
    limits["timeout_s"] = min(limits["timeout_s"], left)  # aborted before it expires

    def report(figures: MigrationProgress) -> None:
        ctx.progress(job.order_id, figures)

    how = {"copy_storage": disk is not None, "incremental": backing, **limits,
           "tls": ctx.settings.migration.transport == "tls", "progress": report}
    started = time.monotonic()
    if p.mode == "live":
        moved: MigrationResult | None = await _live(ctx, p, uuid, state, xml, mapping, how)
    else:
        moved = await _cold(ctx, p, uuid, state, mapping, how)
    return _result(p, moved, started)


async def _check_destination(ctx: Context, p: MigrateParams, uuid: str) -> None:
    """Refuse a destination that is this node, or that the VM's residency policy excludes."""
    if p.dest == ctx.settings.node:
        raise Refused("the destination is this node")
    want = await ctx.journal.desired_of(uuid)
    spec = want.spec if want is not None else {}
    for key, what, there in (("countries", "country", p.dest_country),
                             ("providers", "provider", p.dest_provider)):
        allowed = list(spec.get(key) or ())
        if allowed and there not in allowed:
            raise Refused(f"the destination {p.dest} has {what} {there or 'unknown'}; the"
                          f" VM allows only {', '.join(allowed)}")


async def _live(ctx: Context, p: MigrateParams, uuid: str, state: str, xml: str,
                mapping: dict[str, str], how: dict[str, Any]) -> MigrationResult:
    if state not in ("running", "paused"):
        raise Refused(f"the VM is {state}: a live migration needs it running")
    ours, theirs = ET.fromstring(xml).get("type"), p.domain_type or ""  # noqa: S314
    if theirs != ours:
        raise Refused(f"the destination runs {theirs or 'unknown'} guests, this VM is"
                      f" a {ours} guest")
    hv = ctx.hv
    return await hv.migrate(
        uuid, ctx.settings.migration.uri(p.address or ""), live=True,
        dest_xml=retarget(await hv.migratable_xml(uuid), mapping), **how)


async def _cold(ctx: Context, p: MigrateParams, uuid: str, state: str,
                mapping: dict[str, str], how: dict[str, Any]) -> MigrationResult | None:
    """Stopped here, its disk copied, defined and started there; without a disk, the
    destination defines it anew (None: nothing was copied)."""
    hv = ctx.hv
    if state not in ("shut off", "crashed"):
        await hv.shutdown(uuid, ctx.settings.storage.shutdown_timeout_s)
    if not how["copy_storage"]:
        await hv.undefine(uuid)  # nothing to copy: the destination defines it anew
        return None
    # The copy goes the way a migration's does: the guest, started paused (it runs no
    # instruction), moves with its disk; the destination starts it anew.
    await hv.start(uuid, paused=True)
    try:
        return await hv.migrate(
            uuid, ctx.settings.migration.uri(p.address or ""), live=False,
            dest_xml=retarget(await hv.migratable_xml(uuid), mapping), **how)
    except BaseException:
        if hv.alive() and await hv.state(uuid) not in (None, "shut off"):
            await hv.destroy(uuid)  # back to how it was: stopped, here
        raise


def _result(p: MigrateParams, moved: MigrationResult | None, started: float) -> dict[str, Any]:
    result: dict[str, Any] = {"mode": p.mode, "dest": p.dest}
    if moved is not None:
        result.update({k: v for k, v in (
            ("downtime_ms", moved.downtime_ms), ("duration_ms", moved.duration_ms),
            ("transferred_bytes", moved.transferred_bytes),
            ("memory_bytes", moved.memory_bytes), ("disk_bytes", moved.disk_bytes),
            ("memory_iterations", moved.memory_iterations)) if v is not None})
    else:
        result["duration_ms"] = round((time.monotonic() - started) * 1000)
        result["transferred_bytes"] = 0
    return result


def files_of(xml: str) -> dict[str, str]:
    """The files a running guest uses, by role (disk, kernel, initrd, serial), from its XML."""
    root = ET.fromstring(xml)  # noqa: S314 - from our own libvirtd
    found: dict[str, str] = {}
    for role, where, attr in (("kernel", "os/kernel", ""), ("initrd", "os/initrd", ""),
                              ("disk", "devices/disk[@device='disk']/source", "file"),
                              ("serial", "devices/serial[@type='file']/source", "path")):
        el = root.find(where)
        value = (el.get(attr) if attr else el.text) if el is not None else None
        if value:
            found[role] = value.strip()
    return found


def has_backing(xml: str) -> bool | None:
    """Whether the guest's disk is an overlay on a backing file, from its live XML (libvirt
    lists a running guest's backing chain: the agent need not read a disk that libvirt gave
    to QEMU's user); None where the XML does not say (an inactive definition)."""
    disk = ET.fromstring(xml).find("devices/disk[@device='disk']")  # noqa: S314
    chain = disk.find("backingStore") if disk is not None else None
    if chain is None:
        return None
    return chain.find("source") is not None


def limits_of(p: MigrateParams) -> dict[str, Any]:
    """A migrate order's limits as :meth:`Hypervisor.migrate` takes them."""
    return migration_limits(p.max_downtime_ms, p.bandwidth_mib_s, p.auto_converge,
                            p.postcopy, p.timeout_s)


def migration_limits(max_downtime_ms: object, bandwidth_mib_s: object, auto_converge: object,
                     postcopy: object, timeout_s: object) -> dict[str, Any]:
    """QEMU's limits for the copy: what is not a positive number (or not exactly True) is
    left to QEMU (the timeout: DEFAULT_MIGRATION_TIMEOUT_S)."""
    def number(value: object) -> float | None:
        return value if isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 1 else None

    downtime, bandwidth = number(max_downtime_ms), number(bandwidth_mib_s)
    return {"max_downtime_ms": int(downtime) if downtime else None,
            "bandwidth_mib_s": int(bandwidth) if bandwidth else None,
            "auto_converge": auto_converge is True,
            "postcopy": postcopy is True,
            "timeout_s": float(number(timeout_s) or DEFAULT_MIGRATION_TIMEOUT_S)}

