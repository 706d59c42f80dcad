"""Making a VM on this node: its limits checked against what the journal already holds, its
images fetched and its disk made, its domain defined; and its files removed again."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.host import images
from agent.host.domainxml import domain_xml
from agent.orders.context import Context
from agent.orders.errors import Refused
from agent.orders.settings import Storage
from contract.wire import VmSpec


@dataclass(frozen=True)
class Files:
    """A VM's files on this node (none for the test driver)."""

    domain_type: str
    disk: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    serial: Path | None = None

    def paths(self) -> dict[str, Path]:
        return {k: v for k, v in (("disk", self.disk), ("kernel", self.kernel),
                                  ("initrd", self.initrd), ("serial", self.serial))
                if v is not None}


async def check_limits(ctx: Context, spec: VmSpec) -> None:
    """Refuse a VM whose residency policy excludes this node, or that does not fit beside the
    VMs the journal holds (memory and CPUs after the host's reservation)."""
    lim = ctx.settings.limits
    if spec.countries and lim.country not in spec.countries:
        raise Refused(f"this node is in {lim.country or 'an unknown country'}; the VM may"
                      f" live only in {', '.join(spec.countries)}")
    if spec.providers and lim.provider not in spec.providers:
        raise Refused(f"this node's provider is {lim.provider or 'unknown'}; the VM allows"
                      f" only {', '.join(spec.providers)}")
    inv = await ctx.hv.inventory("", "")
    memory_mib = inv.memory_bytes // 2**20 - lim.reserved.memory_mib
    cpus = (inv.cpus - lim.reserved.cpus) * lim.cpu_overcommit
    used_mem, used_cpus = 0, 0
    for want in await ctx.journal.desired():
        if want.vm_uuid != spec.uuid and want.spec:
            used_mem += int(want.spec.get("memory_mib", 0))
            used_cpus += int(want.spec.get("vcpus", 0))
    if used_mem + spec.memory_mib > memory_mib:
        raise Refused(f"not enough memory: {spec.memory_mib} MiB asked, "
                      f"{max(0, memory_mib - used_mem)} MiB of {memory_mib} free after "
                      f"the host's reservation")
    if used_cpus + spec.vcpus > cpus:
        raise Refused(f"not enough CPUs: {spec.vcpus} asked, {cpus - used_cpus:g} free")


async def prepare(ctx: Context, spec: VmSpec) -> Files:
    """The VM's images fetched and its directory and disk made (kept if there)."""
    st = ctx.settings.storage
    home = st.disks_dir / spec.uuid
    fetched: dict[str, Path] = {}
    for name, digest in ((spec.image, spec.image_sha256), (spec.kernel, spec.kernel_sha256),
                         (spec.initrd, spec.initrd_sha256)):
        if name:
            fetched[name] = await images.fetch(st.images_url, name, digest, st.images_dir,
                                               ctx.tls)
    domain_type = (await ctx.hv.inventory("", "")).domain_type
    kvm = domain_type in ("kvm", "qemu")
    if kvm and st.domain_type != "auto":
        domain_type = st.domain_type
    if not kvm:
        return Files(domain_type)
    disk: Path | None = None
    await asyncio.to_thread(images.passable_dir, home)
    if spec.image or spec.disk_gib:
        disk = await images.make_disk(home / "disk.qcow2", fetched.get(spec.image),
                                      spec.disk_gib)
    return Files(domain_type, disk, fetched.get(spec.kernel), fetched.get(spec.initrd),
                 home / "serial.log")


async def define(ctx: Context, spec: VmSpec) -> None:
    """The VM's files prepared and its domain defined (not started)."""
    files = await prepare(ctx, spec)
    xml = domain_xml(spec, domain_type=files.domain_type, disk=files.disk,
                     kernel=files.kernel, initrd=files.initrd, serial_log=files.serial)
    await ctx.hv.define(xml)


def remove_files(storage: Storage, vm_uuid: str) -> None:
    """The VM's directory (its disk, serial log) gone, if it was there."""
    shutil.rmtree(storage.disks_dir / vm_uuid, ignore_errors=True)


def spec_from_plain(plain: dict[str, Any]) -> VmSpec:
    """A VmSpec back from the journal's JSON (tuples were stored as lists)."""
    fields = dict(plain)
    for name in ("countries", "providers"):
        fields[name] = tuple(fields.get(name, ()))
    return VmSpec(**fields)
