"""Executing signed orders: verify, journal, acknowledge, run, report.

An order is run only if the aggregator's Ed25519 key signed exactly the envelope received,
it is for this node, it has not expired and its number is above every number accepted
before (a replay is refused). It is journaled before the node says ``accepted``; a duplicate
of an order already run is answered with the recorded result and never run twice; an order
the agent was killed in the middle of is finished at the next start (each action is
idempotent: a VM that exists is not defined again, one that is gone is not an error to
delete). The node refuses what breaks its own limits or the VM's residency policy, whatever
the aggregator asked. Reports go through the events spool, so they survive uplink loss.

PyNaCl (libsodium) verifies signatures: a fraction of cryptography's memory in the daemon.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing

from agent import images
from agent.domainxml import DomainSpecError, domain_xml
from agent.hypervisor import Hypervisor, HypervisorError
from agent.journal import Desired, Journal
from agent.profiles import Reservations
from agent.wire import (
    ORDER_ACTIONS,
    Order,
    ProtocolError,
    Report,
    VmSpec,
    decode,
    encode,
    raw_envelope,
    signed_bytes,
    to_plain,
)

log = logging.getLogger("virt8ra.agent.orders")

# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw key's 32 bytes follow.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


class OrderKeyError(Exception):
    """The order-signing key file is missing or not an Ed25519 public key."""


class Refused(Exception):
    """The node will not run this order; the message says why."""


def load_verify_key(path: Path) -> nacl.signing.VerifyKey:
    """The aggregator's order-signing key from its PEM file (written at enrollment)."""
    try:
        lines = path.read_text().strip().splitlines()
    except OSError as exc:
        raise OrderKeyError(f"{path}: {exc.strerror}; enroll again to get it") from None
    if len(lines) < 3 or lines[0] != "-----BEGIN PUBLIC KEY-----" \
            or lines[-1] != "-----END PUBLIC KEY-----":
        raise OrderKeyError(f"{path}: not a PEM public key")
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except ValueError:
        raise OrderKeyError(f"{path}: not a PEM public key") from None
    if len(der) != 44 or not der.startswith(_ED25519_SPKI):
        raise OrderKeyError(f"{path}: not an Ed25519 public key")
    return nacl.signing.VerifyKey(der[len(_ED25519_SPKI):])


@dataclass(frozen=True)
class NodeLimits:
    """What the node offers guests and where it is, for its own checks."""

    country: str
    provider: str
    reserved: Reservations
    cpu_overcommit: float = 4.0


@dataclass(frozen=True)
class Storage:
    images_dir: Path
    disks_dir: Path
    images_url: str
    shutdown_timeout_s: float
    domain_type: str = "auto"  # or kvm, qemu: overrides what the capabilities offer


class OrderRunner:
    def __init__(self, node: str, key: nacl.signing.VerifyKey, journal: Journal,
                 hypervisor: Callable[[], Hypervisor | None], limits: NodeLimits,
                 storage: Storage, tls: Callable[[], Any],
                 report: Callable[[Callable[[int], bytes]], Awaitable[None]]) -> None:
        self._node = node
        self._key = key
        self._journal = journal
        self._hv = hypervisor
        self._limits = limits
        self._storage = storage
        self._tls = tls
        self._report = report
        self._queue: asyncio.Queue[tuple[Order, bytes]] = asyncio.Queue(maxsize=1000)
        self._running: set[str] = set()
        self.executed = 0

    # --- receiving -------------------------------------------------------------------------

    def submit(self, order: Order, payload: bytes) -> None:
        """An order arrived (decoded by the uplink); checked and run in turn."""
        try:
            self._queue.put_nowait((order, payload))
        except asyncio.QueueFull:
            log.error("order queue full: dropped %s (the aggregator sends it again)",
                      order.order_id)

    async def run(self, stop: asyncio.Event) -> None:
        recovered = await self._try_recover()
        while not stop.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            # Until a recovery has run (libvirt was away), look again every few seconds.
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED,
                               timeout=None if recovered else 2.0)
            stopper.cancel()
            if stop.is_set() or not getter.done():
                getter.cancel()
                if stop.is_set():
                    return
                recovered = await self._try_recover()
                continue
            order, payload = getter.result()
            if not recovered:
                recovered = await self._try_recover()
            try:
                await self._handle(order, payload)
            except HypervisorError as exc:  # libvirt went away: the order stays accepted
                log.error("order %s interrupted: %s; finished once libvirt is back",
                          order.order_id, exc)
                recovered = False

    async def _try_recover(self) -> bool:
        """Finish accepted orders and restore the desired state, if libvirt is there."""
        hv = self._hv()
        if hv is None or not hv.alive():
            return False
        try:
            await self._recover()
        except HypervisorError as exc:
            log.error("recovery interrupted: %s; trying again", exc)
            return False
        return True

    async def _handle(self, order: Order, payload: bytes) -> None:
        try:
            self._verify(order, payload)
        except Refused as exc:
            log.warning("refused order %s: %s", order.order_id, exc)
            await self._send(order.order_id, "failed", {}, f"refused: {exc}")
            return
        hv = self._hv()
        if hv is None or not hv.alive():  # not accepted: the aggregator sends it again
            log.warning("order %s not taken: libvirt is not connected", order.order_id)
            return
        done = await self._journal.get(order.order_id)
        if done is not None:  # a duplicate: answer with what happened, never run it again
            if done.state != "accepted":
                await self._send(order.order_id, done.state, done.result, done.error)
            return
        if not await self._journal.accept(order.order_id, order.seq, order.action, payload,
                                          time.time()):
            last = await self._journal.last_seq()
            log.warning("refused order %s: replayed number %d", order.order_id, order.seq)
            await self._send(order.order_id, "failed", {},
                             f"refused: replayed order number {order.seq} (last {last})")
            return
        await self._send(order.order_id, "accepted", {}, "")
        await self._execute(order)

    def _verify(self, order: Order, payload: bytes) -> None:
        try:
            self._key.verify(signed_bytes(raw_envelope(payload)), order.signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError, ProtocolError,
                RecursionError):
            raise Refused("bad signature: not signed by this fleet's aggregator") from None
        if order.node != self._node:
            raise Refused(f"order for node {order.node!r}, this is {self._node!r}")
        if order.expires_at < time.time():
            raise Refused("expired before it arrived")
        if order.action not in ORDER_ACTIONS:
            raise Refused(f"unknown action {order.action!r}")

    async def _recover(self) -> None:
        """Finish what a killed agent left half-done, then bring the VMs that should run
        back up (after a host reboot, with or without an uplink)."""
        for entry in await self._journal.unfinished():
            try:
                order = decode(entry.envelope)
            except ProtocolError:
                continue
            if isinstance(order, Order):
                log.info("finishing order %s (%s) after a restart", order.order_id,
                         order.action)
                await self._execute(order)
        hv = self._hv()
        if hv is None:
            return
        for want in await self._journal.desired():
            try:
                state = await hv.state(want.vm_uuid)
                if state is None and want.spec:  # the host lost it (e.g. a fresh host)
                    await self._define(hv, VmSpecFrom(want.spec))
                    state = await hv.state(want.vm_uuid)
                if want.state == "running" and state not in (None, "running"):
                    log.info("starting %s: it should run", want.vm_uuid)
                    await hv.start(want.vm_uuid)
            except (HypervisorError, DomainSpecError, images.ImageError) as exc:
                log.error("cannot restore %s: %s", want.vm_uuid, exc)

    # --- running ---------------------------------------------------------------------------

    async def _execute(self, order: Order) -> None:
        hv = self._hv()
        if hv is None:
            raise HypervisorError("libvirt is not connected")
        uuid = order.vm.uuid if order.vm is not None else str(order.params.get("vm_uuid", ""))
        desired: Desired | None = None
        forget = ""
        try:
            if order.action == "create":
                if order.vm is None:
                    raise Refused("a create order without a VM spec")
                result = await self._create(hv, order.vm)
                desired = Desired(uuid, to_plain(order.vm), "running")
            elif not uuid:
                raise Refused("no vm_uuid")
            elif order.action == "start":
                state = await hv.state(uuid)
                if state == "paused":  # e.g. paused by the node's own fencing
                    await hv.change_state(uuid, "resume")
                elif state != "running":
                    await hv.start(uuid)
                desired = Desired(uuid, {}, "running")
                result = {"state": await hv.state(uuid) or "gone"}
            elif order.action == "stop":
                if await hv.state(uuid) not in (None, "shut off"):
                    await hv.shutdown(uuid, self._storage.shutdown_timeout_s)
                desired = Desired(uuid, {}, "stopped")
                result = {"state": await hv.state(uuid) or "gone"}
            elif order.action == "reboot":
                await hv.reboot(uuid)
                result = {"state": await hv.state(uuid) or "gone"}
            else:  # delete
                existed = await hv.undefine(uuid)
                shutil.rmtree(self._storage.disks_dir / uuid, ignore_errors=True)
                forget = uuid
                result = {"state": "deleted", "existed": existed}
        except (Refused, HypervisorError, DomainSpecError, images.ImageError, OSError) as exc:
            if isinstance(exc, HypervisorError) and not hv.alive():
                raise  # not the order's fault: finish it once libvirt is back
            error = f"refused: {exc}" if isinstance(exc, Refused) else str(exc)
            log.warning("order %s failed: %s", order.order_id, error)
            await self._journal.finish(order.order_id, "failed", {}, error, time.time())
            await self._send(order.order_id, "failed", {}, error)
            return
        self.executed += 1
        await self._journal.finish(order.order_id, "succeeded", result, "", time.time(),
                                   desired, forget)
        await self._send(order.order_id, "succeeded", result, "")

    async def _create(self, hv: Hypervisor, spec: VmSpec) -> dict[str, Any]:
        state = await hv.state(spec.uuid)
        defined_here = state is None
        if defined_here:  # not created before (or a kill came before the define)
            await self._check_limits(hv, spec)
            await self._define(hv, spec)
            state = await hv.state(spec.uuid)
        if state != "running":
            try:
                await hv.start(spec.uuid)
            except HypervisorError:
                if defined_here and hv.alive():  # a VM that never ran leaves nothing behind
                    await hv.undefine(spec.uuid)
                    shutil.rmtree(self._storage.disks_dir / spec.uuid, ignore_errors=True)
                raise
        return {"state": await hv.state(spec.uuid) or "gone"}

    async def _check_limits(self, hv: Hypervisor, spec: VmSpec) -> None:
        lim = self._limits
        if spec.countries and lim.country not in spec.countries:
            raise Refused(f"this node is in {lim.country or 'an unknown country'}; the VM may"
                          f" live only in {', '.join(spec.countries)}")
        if spec.providers and lim.provider not in spec.providers:
            raise Refused(f"this node's provider is {lim.provider or 'unknown'}; the VM allows"
                          f" only {', '.join(spec.providers)}")
        inv = await hv.inventory("", "")
        memory_mib = inv.memory_bytes // 2**20 - lim.reserved.memory_mib
        cpus = (inv.cpus - lim.reserved.cpus) * lim.cpu_overcommit
        used_mem, used_cpus = 0, 0
        for want in await self._journal.desired():
            if want.vm_uuid != spec.uuid and want.spec:
                used_mem += int(want.spec.get("memory_mib", 0))
                used_cpus += int(want.spec.get("vcpus", 0))
        if used_mem + spec.memory_mib > memory_mib:
            raise Refused(f"not enough memory: {spec.memory_mib} MiB asked, "
                          f"{max(0, memory_mib - used_mem)} MiB of {memory_mib} free after "
                          f"the host's reservation")
        if used_cpus + spec.vcpus > cpus:
            raise Refused(f"not enough CPUs: {spec.vcpus} asked, {cpus - used_cpus:g} free")

    async def _define(self, hv: Hypervisor, spec: VmSpec) -> None:
        st = self._storage
        home = st.disks_dir / spec.uuid
        fetched: dict[str, Path] = {}
        for name, digest in ((spec.image, spec.image_sha256), (spec.kernel, spec.kernel_sha256),
                             (spec.initrd, spec.initrd_sha256)):
            if name:
                fetched[name] = await images.fetch(st.images_url, name, digest, st.images_dir,
                                                   self._tls)
        disk: Path | None = None
        domain_type = (await hv.inventory("", "")).domain_type
        kvm = domain_type in ("kvm", "qemu")
        if kvm and st.domain_type != "auto":
            domain_type = st.domain_type
        if kvm:
            await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
            if spec.image or spec.disk_gib:
                disk = await images.make_disk(
                    home / "disk.qcow2", fetched.get(spec.image), spec.disk_gib)
        xml = domain_xml(
            spec, domain_type=domain_type, disk=disk,
            kernel=fetched.get(spec.kernel) if kvm else None,
            initrd=fetched.get(spec.initrd) if kvm else None,
            serial_log=home / "serial.log" if kvm else None,
        )
        await hv.define(xml)

    async def fence(self) -> int:
        """The node is cut off past its lease: pause every guest it runs by order (the
        aggregator may start them elsewhere). Returns how many were paused."""
        hv = self._hv()
        if hv is None:
            return 0
        paused = 0
        for want in await self._journal.desired():
            try:
                if want.state == "running" and await hv.state(want.vm_uuid) == "running":
                    await hv.change_state(want.vm_uuid, "suspend")
                    paused += 1
            except HypervisorError as exc:
                log.error("cannot pause %s: %s", want.vm_uuid, exc)
        return paused

    async def _send(self, order_id: str, state: str, result: dict[str, Any],
                    error: str) -> None:
        node = self._node
        plain = {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}

        def make(seq: int) -> bytes:
            return encode(Report(node=node, seq=seq, ts=time.time(), order_id=order_id,
                                 state=state, result=plain, error=error[:2000]))

        await self._report(make)


def VmSpecFrom(plain: dict[str, Any]) -> VmSpec:
    """A VmSpec back from the journal's JSON (tuples were stored as lists)."""
    fields = dict(plain)
    for name in ("countries", "providers"):
        fields[name] = tuple(fields.get(name, ()))
    return VmSpec(**fields)
