"""The local hypervisor through libvirt: inventory, guest figures, lifecycle events, and
guests defined, started, stopped, moved and removed.

The only module of the agent that imports libvirt. ``libvirtError`` becomes
:class:`HypervisorError` with libvirt's code and message. Blocking calls run in a worker
thread; lifecycle events arrive on the asyncio loop (libvirtaio) and are queued. What needs
no libvirt lives beside it: reading the capabilities (``capabilities.py``), guests' states,
events and figures (``guests.py``), shutdown with a deadline (``lifecycle.py``), a
migration's figures and supervision (``migration.py``), the errors (``errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirtaio

from agent.host import lifecycle, migration
from agent.host.capabilities import (
    arch_from_capabilities,
    cpu_features_from_capabilities,
    domain_type_from_capabilities,
    domain_types_from_capabilities,
    version_string,
)
from agent.host.compat import HostOffers, host_offers
from agent.host.errors import HypervisorError, MigrationTimeoutError
from agent.host.guests import DomainEvent, domain_event, guest_sample, state_name
from agent.host.migration import MigrationProgress, MigrationResult
from contract.wire import GuestSample, Inventory

__all__ = [  # what the rest of the agent takes from here
    "DomainEvent",
    "HostResources",
    "Hypervisor",
    "HypervisorError",
    "MigrationProgress",
    "MigrationResult",
    "MigrationTimeoutError",
    "register_event_loop",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HostResources:
    """What libvirt says the host has, for the hardware check (``agent/host/hostcheck.py``)."""

    cpus: int
    memory_mib: int
    cpu_features: tuple[str, ...]  # the host CPU's features in the capabilities, as named there
    interfaces: tuple[str, ...] | None  # active host interfaces; None: no interface driver
    volumes_bytes: tuple[int, ...] | None  # capacities of active pools' volumes; None: no driver
    libvirt_version: str
    hypervisor: str


def register_event_loop() -> None:
    """Hook libvirt's events into the running asyncio loop. libvirt takes one event loop
    implementation per process, for good: a second loop cannot receive events."""
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        libvirtaio.virEventRegisterAsyncIOImpl()
    elif impl.loop is not asyncio.get_running_loop():
        raise HypervisorError("libvirt events are already bound to another asyncio loop")


class Hypervisor:
    """One libvirt connection. Use :meth:`open` inside the running loop."""

    def __init__(self, uri: str, conn: Any) -> None:
        self.uri = uri
        self._conn = conn
        self._callback_id: int | None = None

    @classmethod
    async def open(cls, uri: str, *, events: bool = True) -> Hypervisor:
        """Connect to ``uri``; with ``events``, lifecycle events can be watched."""
        libvirt.registerErrorHandler(lambda *_: None, None)
        if events:
            register_event_loop()
        return cls(uri, await asyncio.to_thread(_translated, lambda: libvirt.open(uri)))

    def close(self) -> None:
        if self._callback_id is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(self._callback_id)
            self._callback_id = None
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()

    def alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    async def _blocking(self, call: Callable[[], T]) -> T:
        """``call()`` in the worker thread, libvirt's errors as ours."""
        return await asyncio.to_thread(_translated, call)

    async def _on_domain(self, vm_uuid: str, call: Callable[[Any], T]) -> T:
        """``call(domain)`` in the worker thread, libvirt's errors as ours."""
        return await self._blocking(lambda: call(self._conn.lookupByUUIDString(vm_uuid)))

    async def inventory(self, agent_version: str, profile: str) -> Inventory:
        return await self._blocking(lambda: _inventory(self._conn, agent_version, profile))

    async def host_resources(self) -> HostResources:
        """CPUs, memory, CPU features, host interfaces and storage volumes, as libvirt has them."""
        return await self._blocking(lambda: _host_resources(self._conn))

    async def guest_samples(self) -> tuple[GuestSample, ...]:
        return await self._blocking(lambda: tuple(
            guest_sample(dom.UUIDString(), dom.name(), stats)
            for dom, stats in self._conn.getAllDomainStats(0, 0)))

    async def change_state(self, vm_uuid: str, action: str) -> None:
        """``start``, ``suspend``, ``resume``, ``shutdown`` or ``destroy`` one guest."""
        if action not in lifecycle.ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        await self._on_domain(vm_uuid, lambda dom: getattr(dom, lifecycle.ACTIONS[action])())

    # --- guests: define, start, stop, remove -------------------------------------------------
    # Each call looks the guest up by uuid in the worker thread; a missing guest is
    # HypervisorError(code=VIR_ERR_NO_DOMAIN) except where the docstring says otherwise.

    async def capabilities_domain_type(self) -> str:
        """The domain type this host runs guests with: ``kvm``, ``qemu`` (software emulation
        only) or ``test`` (libvirt's test driver), from its capabilities."""
        return await self._blocking(
            lambda: domain_type_from_capabilities(self._conn.getCapabilities()))

    async def capabilities_domain_types(self) -> tuple[str, ...]:
        """Every domain type the host offers for its own architecture, best first. A host may
        offer ``kvm`` that cannot run guests (a nested machine's /dev/kvm): ``qemu`` (software
        emulation) is offered wherever QEMU is, and is the choice that always runs."""
        return await self._blocking(
            lambda: domain_types_from_capabilities(self._conn.getCapabilities()))

    async def host_offers(self, domain_type: str) -> HostOffers:
        """What this host offers guests of ``domain_type``: architecture, machine types and
        usable CPU models (from the domain capabilities, where the driver has them)."""
        return await self._blocking(lambda: _host_offers(self._conn, domain_type))

    async def define(self, xml: str) -> str:
        """Define (or redefine) a persistent guest from domain XML; return its uuid. libvirt
        validates the XML against its schema first."""
        return await self._blocking(lambda: str(self._conn.defineXMLFlags(
            xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE).UUIDString()))

    async def undefine(self, vm_uuid: str) -> bool:
        """Remove a guest, stopping it first (hard) if it runs; False if there was none.
        Its managed save image and snapshot metadata go with it; its disk files stay."""
        return await asyncio.to_thread(_undefine, self._conn, vm_uuid)

    async def start(self, vm_uuid: str, *, paused: bool = False) -> None:
        """Start a defined guest (libvirt refuses one that already runs); ``paused``: with
        its CPUs stopped before the first instruction."""
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        await self._on_domain(vm_uuid, lambda dom: dom.createWithFlags(flags))

    async def destroy(self, vm_uuid: str) -> None:
        """Stop a running guest hard (one that is not running is fine)."""
        await self._on_domain(vm_uuid, _destroy)

    async def shutdown(self, vm_uuid: str, timeout_s: float) -> bool:
        """Ask the guest to power off (ACPI power button, or the guest agent if it has one),
        wait up to ``timeout_s``, then stop it hard. True if it powered off by itself (or was
        not running), False if it had to be destroyed: a guest without ACPI handling (like
        the tiny test guest, a busybox shell as init) ignores the button and is destroyed
        after the timeout."""
        return await lifecycle.shut_down(_Domain(self, vm_uuid), timeout_s)

    async def reboot(self, vm_uuid: str) -> None:
        """Ask the guest to reboot (ACPI, or its guest agent). With QEMU this is a power-off
        request that libvirt turns into a restart once the guest powers off: a guest without
        ACPI handling ignores it, and this call still succeeds."""
        await self._on_domain(vm_uuid, lambda dom: dom.reboot(0))

    async def state(self, vm_uuid: str) -> str | None:
        """The guest's state as lifecycle events name it (``running``, ``shut off``, ...);
        None if there is no such guest."""
        return await asyncio.to_thread(_state, self._conn, vm_uuid)

    async def domain_xml(self, vm_uuid: str) -> str:
        """The guest's current domain XML, as libvirt completed it."""
        return await self._on_domain(vm_uuid, lambda dom: str(dom.XMLDesc(0)))

    async def guest_names(self) -> dict[str, str]:
        """Every guest on the host, running or not: uuid to name."""
        return await self._blocking(lambda: {
            str(d.UUIDString()): str(d.name()) for d in self._conn.listAllDomains(0)})

    # --- live migration ----------------------------------------------------------------------

    async def migratable_xml(self, vm_uuid: str) -> str:
        """The guest's XML as a destination can take it (``VIR_DOMAIN_XML_MIGRATABLE``, with
        secrets): start a destination XML for :meth:`migrate` from it and change the paths."""
        return await self._on_domain(vm_uuid, lambda dom: str(dom.XMLDesc(
            libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)))

    async def job_stats(self, vm_uuid: str) -> MigrationProgress | None:
        """The figures of the guest's running job (a migration: bytes done and left, memory
        iteration), or None when no job runs (or the driver runs none: the test driver)."""
        return await asyncio.to_thread(_job_stats, self._conn, vm_uuid)

    async def migrate(
        self,
        vm_uuid: str,
        dest_uri: str,
        *,
        live: bool = True,
        copy_storage: bool = False,
        incremental: bool = False,
        dest_xml: str | None = None,
        data_uri: str | None = None,
        max_downtime_ms: int | None = None,
        bandwidth_mib_s: int | None = None,
        auto_converge: bool = False,
        postcopy: bool = False,
        tls: bool = False,
        timeout_s: float | None = None,
        progress: Callable[[MigrationProgress], None] | None = None,
    ) -> MigrationResult:
        """Move a running guest to the libvirtd at ``dest_uri``, peer to peer (this host's
        libvirtd connects there itself), defining it there and removing it here.

        ``live``: the guest runs while its memory is copied (else it is paused for the copy).
        ``copy_storage``: copy its disks too (non-shared storage); ``incremental``: only their
        top layer (the destination has the same backing images). Each target must exist at
        the destination, or be creatable in the storage pool that holds its path.
        ``dest_xml``: the guest's XML for the destination, with the destination's own paths
        (start from :meth:`migratable_xml`); it is the persistent definition there too.
        ``data_uri``: where QEMU sends the data (``tcp://host``), if not where the
        destination says. ``max_downtime_ms``, ``bandwidth_mib_s``, ``auto_converge``:
        QEMU's limits for the copy. ``postcopy``: switch to post-copy once the first pass
        over memory is done (the guest then runs at the destination while the rest of its
        memory follows; a network failure then loses the guest); never without it.
        ``tls``: QEMU sends the data over TLS too (``VIR_MIGRATE_TLS``; its certificates
        in libvirt's ``/etc/pki/qemu``). ``progress`` is called on the loop with the job's
        figures every
        :data:`~agent.host.migration.MIGRATION_POLL_S` while it runs.

        Past ``timeout_s`` the job is aborted and :class:`MigrationTimeoutError` raised: the
        guest keeps running here (unless the job was already finishing; then it completes
        and the result is returned). Cancelling the call aborts the job the same way.

        On success the guest is removed here after its completed job's figures (downtime,
        memory, iterations) are read; disks are counted from the last figures while it ran.
        """
        # The source's definition is kept until its completed job's figures are read.
        flags = _migration_flags(live=live, copy_storage=copy_storage, incremental=incremental,
                                 auto_converge=auto_converge, postcopy=postcopy, tls=tls)
        params = _migration_params(dest_xml=dest_xml, data_uri=data_uri,
                                   bandwidth_mib_s=bandwidth_mib_s)
        call = asyncio.to_thread(_migrate_to, self.uri, vm_uuid, dest_uri, params, flags,
                                 max_downtime_ms)
        watched = await migration.watch(call, _Domain(self, vm_uuid), timeout_s=timeout_s,
                                        postcopy=postcopy, progress=progress)
        stats = await asyncio.to_thread(_completed_then_undefine, self._conn, vm_uuid)
        return migration.migration_result(watched.duration_ms, stats, watched.last)

    def watch_lifecycle(self, deliver: Callable[[DomainEvent], None]) -> None:
        """Call ``deliver`` on the loop for every domain lifecycle event from now on."""

        def on_event(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            state: int | None
            try:
                state = dom.state()[0]
            except libvirt.libvirtError:
                state = None  # the domain is already gone (undefined)
            deliver(domain_event(dom.UUIDString(), dom.name(), event, detail, state,
                                 time.time()))

        self._callback_id = _translated(lambda: self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None))


class _Domain:
    """One guest of a :class:`Hypervisor`, as ``lifecycle.shut_down`` (a
    :class:`~agent.host.lifecycle.Guest`) and ``migration.watch`` (a
    :class:`~agent.host.migration.MigrationJob`) drive it."""

    def __init__(self, hv: Hypervisor, vm_uuid: str) -> None:
        self._hv = hv
        self._vm_uuid = vm_uuid

    async def state(self) -> str | None:
        return await self._hv.state(self._vm_uuid)

    async def request_shutdown(self) -> None:
        await self._hv._on_domain(self._vm_uuid, lambda dom: dom.shutdown())

    async def destroy(self) -> None:
        await self._hv.destroy(self._vm_uuid)

    async def stats(self) -> MigrationProgress | None:
        return await self._hv.job_stats(self._vm_uuid)

    async def abort(self) -> None:
        await self._hv._on_domain(self._vm_uuid, lambda dom: dom.abortJob())

    async def start_postcopy(self) -> None:
        await self._hv._on_domain(self._vm_uuid, lambda dom: dom.migrateStartPostCopy(0))


# --- blocking calls: run in the worker thread --------------------------------------------------


def _wrap(exc: libvirt.libvirtError) -> HypervisorError:
    return HypervisorError(exc.get_error_message() or str(exc), exc.get_error_code() or 0)


def _translated(call: Callable[[], T]) -> T:
    """``call()``, libvirt's errors as ours."""
    try:
        return call()
    except libvirt.libvirtError as exc:
        raise _wrap(exc) from None


def _destroy(dom: Any) -> None:
    """Stop a guest hard; one that stopped meanwhile is fine."""
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
            raise


def _inventory(conn: Any, agent_version: str, profile: str) -> Inventory:
    model, memory_mib, cpus, mhz, _nodes, sockets, cores, threads = conn.getInfo()
    caps = conn.getCapabilities()
    version = conn.getLibVersion()
    hostname = conn.getHostname()
    hypervisor = conn.getType()
    return Inventory(
        hostname=hostname,
        agent_version=agent_version,
        domain_type=domain_type_from_capabilities(caps),
        cpu_model=str(model),
        cpus=int(cpus),
        cpu_mhz=int(mhz),
        sockets=int(sockets),
        cores_per_socket=int(cores),
        threads_per_core=int(threads),
        memory_bytes=int(memory_mib) * 1024 * 1024,
        libvirt_version=version_string(version),
        hypervisor=str(hypervisor),
        profile=profile,
        arch=arch_from_capabilities(caps),
    )


def _host_resources(conn: Any) -> HostResources:
    _model, memory_mib, cpus, *_ = conn.getInfo()
    caps = conn.getCapabilities()
    version = conn.getLibVersion()
    hypervisor = conn.getType()
    interfaces: tuple[str, ...] | None
    try:  # a host without the interface driver (netcf/udev) has no interface list
        interfaces = tuple(sorted(i.name() for i in conn.listAllInterfaces(
            libvirt.VIR_CONNECT_LIST_INTERFACES_ACTIVE) if i.name() != "lo"))
    except libvirt.libvirtError:
        interfaces = None
    volumes: tuple[int, ...] | None
    try:
        volumes = tuple(
            int(vol.info()[1])
            for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            for vol in pool.listAllVolumes(0)
        )
    except libvirt.libvirtError:
        volumes = None
    return HostResources(
        cpus=int(cpus),
        memory_mib=int(memory_mib),
        cpu_features=cpu_features_from_capabilities(caps),
        interfaces=interfaces,
        volumes_bytes=volumes,
        libvirt_version=version_string(version),
        hypervisor=str(hypervisor),
    )


def _host_offers(conn: Any, domain_type: str) -> HostOffers:
    caps = conn.getCapabilities()
    try:
        domcaps: str | None = conn.getDomainCapabilities(
            None, arch_from_capabilities(caps) or None, None, domain_type, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        domcaps = None  # the test driver
    return host_offers(caps, domcaps, domain_type)


def _state(conn: Any, vm_uuid: str) -> str | None:
    try:
        return state_name(conn.lookupByUUIDString(vm_uuid).state()[0])
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise _wrap(exc) from None


def _undefine(conn: Any, vm_uuid: str) -> bool:
    try:
        dom = conn.lookupByUUIDString(vm_uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise _wrap(exc) from None
    try:
        if dom.isActive():
            _destroy(dom)
        if dom.isPersistent():  # a transient guest is gone once destroyed
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True  # someone else removed it meanwhile
        raise _wrap(exc) from None
    return True


def _job_stats(conn: Any, vm_uuid: str) -> MigrationProgress | None:
    try:
        stats = conn.lookupByUUIDString(vm_uuid).jobStats(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return None
        raise _wrap(exc) from None
    return migration.migration_progress(stats)


def _migration_flags(*, live: bool, copy_storage: bool, incremental: bool,
                     auto_converge: bool, postcopy: bool, tls: bool) -> int:
    """libvirt's flags for :meth:`Hypervisor.migrate`'s options."""
    flags: int = libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
    if live:
        flags |= libvirt.VIR_MIGRATE_LIVE
    if copy_storage:
        flags |= (libvirt.VIR_MIGRATE_NON_SHARED_INC if incremental
                  else libvirt.VIR_MIGRATE_NON_SHARED_DISK)
    if auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    return flags


def _migration_params(*, dest_xml: str | None, data_uri: str | None,
                      bandwidth_mib_s: int | None) -> dict[str, Any]:
    """libvirt's typed parameters for :meth:`Hypervisor.migrate`'s options."""
    params: dict[str, Any] = {}
    if dest_xml is not None:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
        params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = dest_xml
    if data_uri is not None:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = data_uri
    if bandwidth_mib_s is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib_s)
    return params


def _migrate_to(uri: str, vm_uuid: str, dest_uri: str, params: dict[str, Any], flags: int,
                max_downtime_ms: int | None) -> None:
    """The migration call, on a connection of its own: libvirt 9.0's client can leave a call
    on the same connection (the abort) waiting for good while another thread sits in the
    migration call; and the host's other calls need not queue behind it either."""
    conn = _translated(lambda: libvirt.open(uri))
    try:
        dom = conn.lookupByUUIDString(vm_uuid)
        if max_downtime_ms is not None:
            dom.migrateSetMaxDowntime(int(max_downtime_ms), 0)
        dom.migrateToURI3(dest_uri, params, flags)
    except libvirt.libvirtError as exc:
        raise _wrap(exc) from None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _completed_then_undefine(conn: Any, vm_uuid: str) -> dict[str, Any]:
    """The guest moved away: its completed job's figures, then its definition here gone."""
    try:
        dom = conn.lookupByUUIDString(vm_uuid)
    except libvirt.libvirtError:
        return {}
    stats: dict[str, Any] = {}
    with contextlib.suppress(libvirt.libvirtError):
        got = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        stats = dict(got) if isinstance(got, dict) else {}
    try:
        if not dom.isActive() and dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise _wrap(exc) from None
    return stats
