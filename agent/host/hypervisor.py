"""The local hypervisor through libvirt: inventory, guest figures, lifecycle events, and
guests defined, started, stopped and removed.

The only module of the agent that imports libvirt. ``libvirtError`` becomes
:class:`HypervisorError` with libvirt's code and message. Blocking calls run in a worker
thread; lifecycle events arrive on the asyncio loop (libvirtaio) and are queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import libvirt
import libvirtaio

from agent.host.compat import HostOffers, host_offers
from contract.wire import GuestBlockSample, GuestNicSample, GuestSample, Inventory

STATE_NAMES: Final = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shut off",
    6: "crashed",
    7: "pmsuspended",
}
EVENT_NAMES: Final = {
    0: "defined",
    1: "undefined",
    2: "started",
    3: "suspended",
    4: "resumed",
    5: "stopped",
    6: "shutdown",
    7: "pmsuspended",
    8: "crashed",
}
# Detail codes per event, as virsh names them (libvirt's virDomainEvent*DetailType).
DETAIL_NAMES: Final[dict[int, tuple[str, ...]]] = {
    0: ("added", "updated", "renamed", "from snapshot"),
    1: ("removed", "renamed"),
    2: ("booted", "migrated", "restored", "from snapshot", "wakeup"),
    3: ("paused", "migrated", "I/O error", "watchdog", "restored", "from snapshot",
        "API error", "post-copy", "post-copy failed"),
    4: ("unpaused", "migrated", "from snapshot", "post-copy", "post-copy failed"),
    5: ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot"),
    6: ("finished", "guest", "host"),
    7: ("memory", "disk"),
    8: ("panicked", "crashloaded"),
}
SHUTDOWN_POLL_S: Final = 0.1  # how often shutdown() looks whether the guest is off

T = TypeVar("T")


class HypervisorError(Exception):
    """libvirt refused or failed; ``code`` is libvirt's error code (0 when unknown)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class DomainEvent:
    vm_uuid: str
    vm_name: str
    event: str
    detail: str
    state: str
    ts: float


def _wrap(exc: libvirt.libvirtError) -> HypervisorError:
    return HypervisorError(exc.get_error_message() or str(exc), exc.get_error_code() or 0)


def _destroy(dom: Any) -> None:
    """Stop a guest hard; one that stopped meanwhile is fine."""
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
            raise


def register_event_loop() -> None:
    """Hook libvirt's events into the running asyncio loop. libvirt takes one event loop
    implementation per process, for good: a second loop cannot receive events."""
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        libvirtaio.virEventRegisterAsyncIOImpl()
    elif impl.loop is not asyncio.get_running_loop():
        raise HypervisorError("libvirt events are already bound to another asyncio loop")


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


MIGRATION_POLL_S: Final = 0.25  # how often migrate() reads the job's progress and the clock
MIGRATION_ABORT_WAIT_S: Final = 30.0  # how long an aborted migration may take to wind down


class MigrationTimeoutError(HypervisorError):
    """A migration ran past its ``timeout_s`` and was aborted; the guest still runs at the
    source. ``code`` is libvirt's for the failed call (usually VIR_ERR_OPERATION_ABORTED)."""

    def __init__(self, message: str, code: int, timeout_s: float) -> None:
        super().__init__(message, code)
        self.timeout_s = timeout_s


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """A running migration's figures, copied from libvirt's job stats; None where libvirt
    gave none (early in the job, or a figure that does not apply)."""

    elapsed_ms: int | None
    data_total_bytes: int | None
    data_processed_bytes: int | None
    data_remaining_bytes: int | None
    memory_total_bytes: int | None
    memory_processed_bytes: int | None
    memory_remaining_bytes: int | None
    memory_iteration: int | None  # passes over the guest's memory so far
    memory_dirty_rate_pages_s: int | None
    disk_total_bytes: int | None
    disk_processed_bytes: int | None
    disk_remaining_bytes: int | None
    expected_downtime_ms: int | None


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """A finished migration. ``duration_ms`` is the wall time of the migration call here;
    the rest comes from the completed job's stats on the destination (None when they could
    not be read there)."""

    duration_ms: int
    downtime_ms: int | None  # guest paused at the source until it resumed at the destination
    transferred_bytes: int | None  # memory, disks and device state
    memory_bytes: int | None
    disk_bytes: int | None  # None: no disk was copied
    memory_iterations: int | None
    job_elapsed_ms: int | None  # libvirt's own duration of the job


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
        try:
            conn = await asyncio.to_thread(libvirt.open, uri)
        except libvirt.libvirtError as exc:
            raise _wrap(exc) from None
        return cls(uri, conn)

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

    async def inventory(self, agent_version: str, profile: str) -> Inventory:
        return await asyncio.to_thread(self._inventory, agent_version, profile)

    def _inventory(self, agent_version: str, profile: str) -> Inventory:
        try:
            model, memory_mib, cpus, mhz, _nodes, sockets, cores, threads = self._conn.getInfo()
            caps = self._conn.getCapabilities()
            version = self._conn.getLibVersion()
            hostname = self._conn.getHostname()
            hypervisor = self._conn.getType()
        except libvirt.libvirtError as exc:
            raise _wrap(exc) from None
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
            libvirt_version=f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}",
            hypervisor=str(hypervisor),
            profile=profile,
            arch=arch_from_capabilities(caps),
        )

    async def host_resources(self) -> HostResources:
        """CPUs, memory, CPU features, host interfaces and storage volumes, as libvirt has them."""
        return await asyncio.to_thread(self._host_resources)

    def _host_resources(self) -> HostResources:
        try:
            _model, memory_mib, cpus, *_ = self._conn.getInfo()
            caps = self._conn.getCapabilities()
            version = self._conn.getLibVersion()
            hypervisor = self._conn.getType()
        except libvirt.libvirtError as exc:
            raise _wrap(exc) from None
        interfaces: tuple[str, ...] | None
        try:  # a host without the interface driver (netcf/udev) has no interface list
            interfaces = tuple(sorted(i.name() for i in self._conn.listAllInterfaces(
                libvirt.VIR_CONNECT_LIST_INTERFACES_ACTIVE) if i.name() != "lo"))
        except libvirt.libvirtError:
            interfaces = None
        volumes: tuple[int, ...] | None
        try:
            volumes = tuple(
                int(vol.info()[1])
                for pool in self._conn.listAllStoragePools(
                    libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
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
            libvirt_version=f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}",
            hypervisor=str(hypervisor),
        )

    async def guest_samples(self) -> tuple[GuestSample, ...]:
        return await asyncio.to_thread(self._guest_samples)

    def _guest_samples(self) -> tuple[GuestSample, ...]:
        try:
            records = self._conn.getAllDomainStats(0, 0)
            return tuple(
                guest_sample(dom.UUIDString(), dom.name(), stats) for dom, stats in records
            )
        except libvirt.libvirtError as exc:
            raise _wrap(exc) from None

    async def change_state(self, vm_uuid: str, action: str) -> None:
        """``start``, ``suspend``, ``resume``, ``shutdown`` or ``destroy`` one guest."""
        methods = {"start": "create", "suspend": "suspend", "resume": "resume",
                   "shutdown": "shutdown", "destroy": "destroy"}
        if action not in methods:
            raise ValueError(f"unknown action {action!r}")

        def op() -> None:
            try:
                dom = self._conn.lookupByUUIDString(vm_uuid)
                getattr(dom, methods[action])()
            except libvirt.libvirtError as exc:
                raise _wrap(exc) from None

        await asyncio.to_thread(op)

    # --- guests: define, start, stop, remove -------------------------------------------------
    # Each call looks the guest up by uuid in the worker thread; a missing guest is
    # HypervisorError(code=VIR_ERR_NO_DOMAIN) except where the docstring says otherwise.

    async def capabilities_domain_type(self) -> str:
        """The domain type this host runs guests with: ``kvm``, ``qemu`` (software emulation
        only) or ``test`` (libvirt's test driver), from its capabilities."""

        def op() -> str:
            try:
                return domain_type_from_capabilities(self._conn.getCapabilities())
            except libvirt.libvirtError as exc:
                raise _wrap(exc) from None

        return await asyncio.to_thread(op)

    async def capabilities_domain_types(self) -> tuple[str, ...]:
        """Every domain type the host offers for its own architecture, best first. A host may
        offer ``kvm`` that cannot run guests (a nested machine's /dev/kvm): ``qemu`` (software
        emulation) is offered wherever QEMU is, and is the choice that always runs."""

        def op() -> tuple[str, ...]:
            try:
                return domain_types_from_capabilities(self._conn.getCapabilities())
            except libvirt.libvirtError as exc:
                raise _wrap(exc) from None

        return await asyncio.to_thread(op)

    async def host_offers(self, domain_type: str) -> HostOffers:
        """What this host offers guests of ``domain_type``: architecture, machine types and
        usable CPU models (from the domain capabilities, where the driver has them)."""

        def op() -> HostOffers:
            try:
                caps = self._conn.getCapabilities()
                try:
                    domcaps: str | None = self._conn.getDomainCapabilities(
                        None, arch_from_capabilities(caps) or None, None, domain_type, 0)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
                    domcaps = None  # the test driver
                return host_offers(caps, domcaps, domain_type)
            except libvirt.libvirtError as exc:
                raise _wrap(exc) from None

        return await asyncio.to_thread(op)

    async def define(self, xml: str) -> str:
        """Define (or redefine) a persistent guest from domain XML; return its uuid. libvirt
        validates the XML against its schema first."""

        def op() -> str:
            try:
                dom = self._conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
                return str(dom.UUIDString())
            except libvirt.libvirtError as exc:
                raise _wrap(exc) from None

        return await asyncio.to_thread(op)

    async def undefine(self, vm_uuid: str) -> bool:
        """Remove a guest, stopping it first (hard) if it runs; False if there was none.
        Its managed save image and snapshot metadata go with it; its disk files stay."""

        def op() -> bool:
            try:
                dom = self._conn.lookupByUUIDString(vm_uuid)
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

        return await asyncio.to_thread(op)

    async def start(self, vm_uuid: str, *, paused: bool = False) -> None:
        """Start a defined guest (libvirt refuses one that already runs); ``paused``: with
        its CPUs stopped before the first instruction."""
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        await asyncio.to_thread(self._on_domain, vm_uuid, lambda dom: dom.createWithFlags(flags))

    async def destroy(self, vm_uuid: str) -> None:
        """Stop a running guest hard (one that is not running is fine)."""
        await asyncio.to_thread(self._on_domain, vm_uuid, _destroy)

    async def shutdown(self, vm_uuid: str, timeout_s: float) -> bool:
        """Ask the guest to power off (ACPI power button, or the guest agent if it has one),
        wait up to ``timeout_s``, then stop it hard. True if it powered off by itself (or was
        not running), False if it had to be destroyed: a guest without ACPI handling (like
        the tiny test guest, a busybox shell as init) ignores the button and is destroyed
        after the timeout."""
        if await self.state(vm_uuid) in (None, "shut off"):
            return True
        try:
            await asyncio.to_thread(self._on_domain, vm_uuid, lambda dom: dom.shutdown())
        except HypervisorError:
            if await self.state(vm_uuid) in (None, "shut off"):
                return True  # it stopped between our look and our request
            raise
        try:
            async with asyncio.timeout(timeout_s):
                while True:  # polled: lifecycle events are the daemon's, not ours to take
                    if await self.state(vm_uuid) in (None, "shut off"):
                        return True
                    await asyncio.sleep(SHUTDOWN_POLL_S)
        except TimeoutError:
            pass
        await asyncio.to_thread(self._on_domain, vm_uuid, _destroy)
        return False

    async def reboot(self, vm_uuid: str) -> None:
        """Ask the guest to reboot (ACPI, or its guest agent). With QEMU this is a power-off
        request that libvirt turns into a restart once the guest powers off: a guest without
        ACPI handling ignores it, and this call still succeeds."""
        await asyncio.to_thread(self._on_domain, vm_uuid, lambda dom: dom.reboot(0))

    async def state(self, vm_uuid: str) -> str | None:
        """The guest's state as lifecycle events name it (``running``, ``shut off``, ...);
        None if there is no such guest."""

        def op() -> str | None:
            try:
                dom = self._conn.lookupByUUIDString(vm_uuid)
                return STATE_NAMES.get(dom.state()[0], "unknown")
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise _wrap(exc) from None

        return await asyncio.to_thread(op)

    async def domain_xml(self, vm_uuid: str) -> str:
        """The guest's current domain XML, as libvirt completed it."""
        return await asyncio.to_thread(
            self._on_domain, vm_uuid, lambda dom: str(dom.XMLDesc(0)))

    async def guest_names(self) -> dict[str, str]:
        """Every guest on the host, running or not: uuid to name."""

        def op() -> dict[str, str]:
            try:
                return {str(d.UUIDString()): str(d.name()) for d in self._conn.listAllDomains(0)}
            except libvirt.libvirtError as exc:
                raise _wrap(exc) from None

        return await asyncio.to_thread(op)

    # --- live migration ----------------------------------------------------------------------

    async def migratable_xml(self, vm_uuid: str) -> str:
        """The guest's XML as a destination can take it (``VIR_DOMAIN_XML_MIGRATABLE``, with
        secrets): start a destination XML for :meth:`migrate` from it and change the paths."""
        return await asyncio.to_thread(
            self._on_domain, vm_uuid, lambda dom: str(dom.XMLDesc(
                libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)))

    async def job_stats(self, vm_uuid: str) -> MigrationProgress | None:
        """The figures of the guest's running job (a migration: bytes done and left, memory
        iteration), or None when no job runs (or the driver runs none: the test driver)."""

        def op() -> MigrationProgress | None:
            try:
                stats = self._conn.lookupByUUIDString(vm_uuid).jobStats(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    return None
                raise _wrap(exc) from None
            return migration_progress(stats)

        return await asyncio.to_thread(op)

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
        :data:`MIGRATION_POLL_S` while it runs.

        Past ``timeout_s`` the job is aborted and :class:`MigrationTimeoutError` raised: the
        guest keeps running here (unless the job was already finishing; then it completes
        and the result is returned). Cancelling the call aborts the job the same way.

        On success the guest is removed here after its completed job's figures (downtime,
        memory, iterations) are read; disks are counted from the last figures while it ran.
        """
        # The source's definition is kept until its completed job's figures are read.
        flags = libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
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
        params: dict[str, Any] = {}
        if dest_xml is not None:
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
            params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = dest_xml
        if data_uri is not None:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = data_uri
        if bandwidth_mib_s is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib_s)

        def op() -> None:
            # On a connection of its own: libvirt 9.0's client can leave a call on the same
            # connection (the abort) waiting for good while another thread sits in the
            # migration call; and the host's other calls need not queue behind it either.
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise _wrap(exc) from None
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

        started = time.monotonic()
        call = asyncio.ensure_future(asyncio.to_thread(op))
        aborted = switched = False
        last: MigrationProgress | None = None
        figures: MigrationProgress | None = None
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=MIGRATION_POLL_S)
                if call.done():
                    break
                if (not aborted and timeout_s is not None
                        and time.monotonic() - started > timeout_s):
                    aborted = True
                    await self._abort_job(vm_uuid)
                elif not aborted:
                    with contextlib.suppress(HypervisorError):  # the job may just have ended
                        figures = await self.job_stats(vm_uuid) or last
                    if figures is not None and figures is not last:
                        last = figures
                        if progress is not None:
                            progress(figures)
                        if postcopy and not switched and (figures.memory_iteration or 0) >= 2:
                            switched = True
                            with contextlib.suppress(HypervisorError):
                                await asyncio.to_thread(
                                    self._on_domain, vm_uuid,
                                    lambda dom: dom.migrateStartPostCopy(0))
        except BaseException:  # cancelled (or progress raised): the guest stays here
            if not call.done():
                await asyncio.shield(self._abort_job(vm_uuid))
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(call), MIGRATION_ABORT_WAIT_S)
            raise
        duration_ms = round((time.monotonic() - started) * 1000)
        try:
            call.result()
        except HypervisorError as exc:
            if aborted and timeout_s is not None:
                raise MigrationTimeoutError(
                    f"migration aborted after {timeout_s:g} s: {exc}", exc.code, timeout_s
                ) from None
            raise
        stats = await asyncio.to_thread(self._completed_then_undefine, vm_uuid)
        return migration_result(duration_ms, stats, last)

    def _completed_then_undefine(self, vm_uuid: str) -> dict[str, Any]:
        """The guest moved away: its completed job's figures, then its definition here gone."""
        try:
            dom = self._conn.lookupByUUIDString(vm_uuid)
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

    async def _abort_job(self, vm_uuid: str) -> None:
        """Abort the guest's running job; one that already ended is fine."""
        with contextlib.suppress(HypervisorError):
            await asyncio.to_thread(self._on_domain, vm_uuid, lambda dom: dom.abortJob())

    def _on_domain(self, vm_uuid: str, call: Callable[[Any], T]) -> T:
        """Run ``call(domain)`` (in the worker thread), libvirt's errors as ours."""
        try:
            return call(self._conn.lookupByUUIDString(vm_uuid))
        except libvirt.libvirtError as exc:
            raise _wrap(exc) from None

    def watch_lifecycle(self, deliver: Callable[[DomainEvent], None]) -> None:
        """Call ``deliver`` on the loop for every domain lifecycle event from now on."""

        def on_event(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            details = DETAIL_NAMES.get(event, ())
            try:
                state = STATE_NAMES.get(dom.state()[0], "unknown")
            except libvirt.libvirtError:
                state = "unknown"  # the domain is already gone (undefined)
            deliver(
                DomainEvent(
                    vm_uuid=dom.UUIDString(),
                    vm_name=dom.name(),
                    event=EVENT_NAMES.get(event, str(event)),
                    detail=details[detail] if 0 <= detail < len(details) else str(detail),
                    state=state,
                    ts=time.time(),
                )
            )

        try:
            self._callback_id = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None
            )
        except libvirt.libvirtError as exc:
            raise _wrap(exc) from None


def domain_type_from_capabilities(caps_xml: str) -> str:
    """``kvm`` when the host offers it for its own architecture, else ``qemu`` (or the first)."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return "unknown"
    host_arch = root.findtext("host/cpu/arch") or platform.machine()
    offered: list[str] = []
    for guest in root.findall("guest"):
        arch = guest.find("arch")
        if arch is None or arch.get("name") != host_arch:
            continue
        offered.extend(d.get("type", "") for d in arch.findall("domain"))
    for preferred in ("kvm", "qemu"):
        if preferred in offered:
            return preferred
    return offered[0] if offered else "unknown"


def arch_from_capabilities(caps_xml: str) -> str:
    """The host's own architecture as libvirt names it (``x86_64``, ``aarch64``), or ""."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return ""
    return (root.findtext("host/cpu/arch") or "").strip()


def domain_types_from_capabilities(caps_xml: str) -> tuple[str, ...]:
    """The domain types offered for the host's own architecture: ``kvm``, then ``qemu``, then
    any other (the test driver's ``test``); empty if the XML says nothing."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return ()
    host_arch = root.findtext("host/cpu/arch") or platform.machine()
    offered = {
        d.get("type", "")
        for arch in root.findall("guest/arch")
        if arch.get("name") == host_arch
        for d in arch.findall("domain")
    }
    offered.discard("")
    rank = {"kvm": 0, "qemu": 1}
    return tuple(sorted(offered, key=lambda t: (rank.get(t, 2), t)))


def cpu_features_from_capabilities(caps_xml: str) -> tuple[str, ...]:
    """The host CPU's features: ``<feature name=...>`` (QEMU/KVM: those beyond the named CPU
    model) and the children of ``<features>`` (the test driver's ``pae``, ``nonpae``)."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return ()
    cpu = root.find("host/cpu")
    if cpu is None:
        return ()
    named = [f.get("name", "") for f in cpu.findall("feature")]
    listed = [f.tag for f in cpu.findall("features/*")]
    return tuple(sorted({f for f in named + listed if f}))


def _int(stats: dict[str, Any], key: str) -> int | None:
    value = stats.get(key)
    return int(value) if isinstance(value, int) else None


def guest_sample(uuid: str, name: str, stats: dict[str, Any]) -> GuestSample:
    """One guest's ``getAllDomainStats`` record as a wire sample (KiB become bytes)."""

    def kib(key: str) -> int | None:
        value = _int(stats, key)
        return None if value is None else value * 1024

    block = tuple(
        GuestBlockSample(
            name=str(stats.get(f"block.{i}.name", f"block{i}")),
            read_bytes=_int(stats, f"block.{i}.rd.bytes") or 0,
            write_bytes=_int(stats, f"block.{i}.wr.bytes") or 0,
            read_ops=_int(stats, f"block.{i}.rd.reqs") or 0,
            write_ops=_int(stats, f"block.{i}.wr.reqs") or 0,
            capacity_bytes=_int(stats, f"block.{i}.capacity"),
            allocation_bytes=_int(stats, f"block.{i}.allocation"),
        )
        for i in range(_int(stats, "block.count") or 0)
    )
    nics = tuple(
        GuestNicSample(
            name=str(stats.get(f"net.{i}.name", f"net{i}")),
            rx_bytes=_int(stats, f"net.{i}.rx.bytes") or 0,
            tx_bytes=_int(stats, f"net.{i}.tx.bytes") or 0,
            rx_packets=_int(stats, f"net.{i}.rx.pkts") or 0,
            tx_packets=_int(stats, f"net.{i}.tx.pkts") or 0,
        )
        for i in range(_int(stats, "net.count") or 0)
    )
    return GuestSample(
        uuid=uuid,
        name=name,
        state=STATE_NAMES.get(_int(stats, "state.state") or 0, "unknown"),
        vcpus=_int(stats, "vcpu.current"),
        cpu_time_ns=_int(stats, "cpu.time"),
        memory_max_bytes=kib("balloon.maximum"),
        balloon_current_bytes=kib("balloon.current"),
        balloon_rss_bytes=kib("balloon.rss"),
        block=block,
        nics=nics,
    )


def migration_progress(stats: dict[str, Any]) -> MigrationProgress | None:
    """A running job's ``jobStats`` as figures; None when no job runs."""
    if _int(stats, "type") in (None, libvirt.VIR_DOMAIN_JOB_NONE):
        return None
    return MigrationProgress(
        elapsed_ms=_int(stats, "time_elapsed"),
        data_total_bytes=_int(stats, "data_total"),
        data_processed_bytes=_int(stats, "data_processed"),
        data_remaining_bytes=_int(stats, "data_remaining"),
        memory_total_bytes=_int(stats, "memory_total"),
        memory_processed_bytes=_int(stats, "memory_processed"),
        memory_remaining_bytes=_int(stats, "memory_remaining"),
        memory_iteration=_int(stats, "memory_iteration"),
        memory_dirty_rate_pages_s=_int(stats, "memory_dirty_rate"),
        disk_total_bytes=_int(stats, "disk_total"),
        disk_processed_bytes=_int(stats, "disk_processed"),
        disk_remaining_bytes=_int(stats, "disk_remaining"),
        expected_downtime_ms=_int(stats, "downtime"),
    )


def migration_result(duration_ms: int, stats: dict[str, Any],
                     last: MigrationProgress | None = None) -> MigrationResult:
    """A migration's result from its wall time, the completed job's stats (may be empty) and
    the last figures while it ran (for the disks, which the completed job does not count: a
    migration that succeeded copied the whole disk total)."""
    memory = _int(stats, "memory_processed")
    disk = _int(stats, "disk_processed") or None
    if disk is None and last is not None:
        disk = last.disk_total_bytes or None
    data = _int(stats, "data_processed")
    if data is not None and disk is not None and not _int(stats, "disk_processed"):
        data += disk
    return MigrationResult(
        duration_ms=duration_ms,
        downtime_ms=_int(stats, "downtime"),
        transferred_bytes=data,
        memory_bytes=memory,
        disk_bytes=disk,
        memory_iterations=_int(stats, "memory_iteration"),
        job_elapsed_ms=_int(stats, "time_elapsed"),
    )
