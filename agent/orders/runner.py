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
import math
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.signing

from agent.host import images
from agent.host.compat import HostOffers, guest_needs, misfits
from agent.host.domainxml import DomainSpecError, domain_xml, retarget
from agent.host.hypervisor import Hypervisor, HypervisorError, MigrationProgress, MigrationResult
from agent.identity import libvirttls
from agent.orders.journal import Desired, Journal
from contract.profiles import Reservations
from contract.wire import (
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
class Migration:
    """How this node takes part in live migration (``[libvirt]`` in agent.toml)."""

    address: str = ""  # where other nodes' libvirtd reach this one's; "": none comes in
    transport: str = "tls"  # or "tcp" (a closed lab network only)

    def uri(self, peer: str) -> str:
        """The libvirt URI this node's libvirtd uses to reach ``peer``'s (peer to peer); over
        TLS it reads its client certificate from libvirt's default paths (the daemon writes
        them there: ``[libvirt] tls_dir``)."""
        try:
            return libvirttls.migration_uri(peer, transport=self.transport)
        except libvirttls.LibvirtTlsError as exc:
            raise Refused(f"the destination's migration address: {exc}") from None


PROGRESS_EVERY_S: Final = 1.0  # a running migration reports its figures this often
# A migration is aborted this long before its order expires (so the aggregator never acts on
# an expired migrate while it still runs), and not begun with less than MIGRATION_MIN_S left.
ORDER_END_MARGIN_S: Final = 30.0
MIGRATION_MIN_S: Final = 10.0


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
                 report: Callable[[Callable[[int], bytes]], Awaitable[None]],
                 migration: Migration | None = None, lease_s: float = 0.0) -> None:
        self._node = node
        self._migration = migration or Migration()
        self._lease_s = lease_s
        # The last contact with the aggregator as the journal had it when the agent started
        # (before this run touched it): set by the daemon.
        self.contact_at_start: float | None = None
        self._start_judged = False  # whether a recovery has judged the time before the start
        self._key = key
        self._journal = journal
        self._hv = hypervisor
        self._limits = limits
        self._storage = storage
        self._tls = tls
        self._report = report
        self._queue: asyncio.Queue[tuple[Order, bytes]] = asyncio.Queue(maxsize=1000)
        self._progress_at: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Migrations run beside the orders after them (one may take minutes), by VM uuid; an
        # order about the same VM waits for it. Their order ids: recovery leaves them alone.
        self._moving: dict[str, asyncio.Task[None]] = {}
        self._running: set[str] = set()
        # A migration beside ended in trouble run() must see: libvirt gone, or an error.
        self._trouble_beside = asyncio.Event()
        self._failed_beside: BaseException | None = None  # ends run(), as if it failed there
        self._stop = asyncio.Event()
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
        self._stop = stop
        try:
            await self._run(stop)
        finally:
            # Stopping: migrations beside are let finish, as an order in the queue's turn is
            # (one cancelled at its very end would leave its VM defined here and there).
            moving = set(self._moving.values())
            if moving:
                log.info("waiting for %d migration(s) to finish", len(moving))
                await asyncio.wait(moving)

    async def _run(self, stop: asyncio.Event) -> None:
        recovered = await self._try_recover()
        while not stop.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            trouble = asyncio.ensure_future(self._trouble_beside.wait())
            # Until a recovery has run (libvirt was away), look again every few seconds.
            await asyncio.wait({getter, stopper, trouble}, return_when=asyncio.FIRST_COMPLETED,
                               timeout=None if recovered else 2.0)
            stopper.cancel()
            trouble.cancel()
            if self._failed_beside is not None:  # as if it had failed in the queue's turn
                raise self._failed_beside
            if self._trouble_beside.is_set():
                self._trouble_beside.clear()
                recovered = False
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
        await self._execute_in_turn(order)

    async def _execute_in_turn(self, order: Order) -> None:
        """Run an accepted order. A migration runs beside the orders after it: a drain moves
        several VMs of this node at once, and the node still takes other orders while they
        go. An order about a VM that is migrating waits for the migration (the queue with
        it: the aggregator sends none while a move runs); stopping ends that wait, and the
        order, journaled as accepted, is finished by the next start."""
        uuid = _vm_of(order)
        if not await self._after_migration_of(uuid):
            return
        if order.action != "migrate" or not uuid:
            await self._execute(order)
            return
        task = asyncio.create_task(self._execute_beside(order), name=f"migrate {uuid}")
        self._moving[uuid] = task
        self._running.add(order.order_id)

        def ended(done: asyncio.Task[None]) -> None:
            self._running.discard(order.order_id)
            if self._moving.get(uuid) is done:
                del self._moving[uuid]

        task.add_done_callback(ended)

    async def _after_migration_of(self, uuid: str) -> bool:
        """Wait for the VM's migration beside, if one runs; False if stopping came first."""
        ahead = self._moving.get(uuid)
        if ahead is None:
            return True
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({ahead, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        return ahead.done()

    async def _execute_beside(self, order: Order) -> None:
        try:
            await self._execute(order)
        except HypervisorError as exc:  # libvirt went away: the order stays accepted
            log.error("order %s interrupted: %s; finished once libvirt is back",
                      order.order_id, exc)
            self._trouble_beside.set()
        except Exception as exc:  # handed to run(), which ends with it
            self._failed_beside = exc
            self._trouble_beside.set()

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
        back up (after a host reboot, with or without an uplink). A node that was cut off
        past its lease before this start starts nothing: its VMs may run elsewhere by now."""
        hv = self._hv()
        last = self.contact_at_start
        fenced = bool(self._lease_s and last is not None and not self._start_judged
                      and time.time() - last > self._lease_s)
        if fenced:
            paused, failed = await self.fence()
            log.warning("no contact with the aggregator for %.0f s before this start (lease"
                        " %.0f s): nothing is started, %d guest(s) paused until it says"
                        " otherwise%s", time.time() - (last or 0), self._lease_s, paused,
                        f" ({failed} could not be)" if failed else "")
        for entry in await self._journal.unfinished():
            try:
                order = decode(entry.envelope)
            except ProtocolError:
                continue
            if not isinstance(order, Order) or order.order_id in self._running:
                continue  # (a migration still going on beside)
            if not await self._after_migration_of(_vm_of(order)):
                return  # stopping
            now = await self._journal.get(order.order_id)  # it may have ended meanwhile
            if now is None or now.state != "accepted" or order.order_id in self._running:
                continue
            if order.expires_at < time.time() or (fenced and order.action in ("start",
                                                                               "create")):
                why = "expired" if order.expires_at < time.time() else "cut off past the lease"
                error = f"not finished: the agent stopped while it ran, and it is {why} now"
                log.warning("order %s (%s): %s", order.order_id, order.action, error)
                if order.action == "create" and hv is not None:
                    await self._undo_create(hv, _vm_of(order))
                await self._journal.finish(order.order_id, "failed", {}, error, time.time())
                await self._send(order.order_id, "failed", {}, error)
                continue
            log.info("finishing order %s (%s) after a restart", order.order_id, order.action)
            await self._execute(order)
        # The cut-off before this start is judged once: a later recovery (libvirt was away
        # for a moment) is no outage of the uplink's.
        self._start_judged = True
        if hv is None or fenced:
            return
        for want in await self._journal.desired():
            if want.state not in ("running", "stopped"):  # incoming: not ours yet; fenced:
                continue  # it may run elsewhere now, only an order brings it back
            try:
                state = await hv.state(want.vm_uuid)
                if state is None and want.spec:  # the host lost it (e.g. a fresh host)
                    await self._define(hv, VmSpecFrom(want.spec))
                    state = await hv.state(want.vm_uuid)
                if want.state == "running" and state in ("shut off", "crashed"):
                    log.info("starting %s: it should run", want.vm_uuid)
                    await hv.start(want.vm_uuid)
            except (HypervisorError, DomainSpecError, images.ImageError) as exc:
                log.error("cannot restore %s: %s", want.vm_uuid, exc)

    # --- running ---------------------------------------------------------------------------

    async def _execute(self, order: Order) -> None:
        hv = self._hv()
        if hv is None:
            raise HypervisorError("libvirt is not connected")
        uuid = _vm_of(order)
        desired: Desired | None = None
        forget = ""
        try:
            if order.action in ("create", "receive"):
                if order.vm is None:
                    raise Refused(f"a {order.action} order without a VM spec")
                if order.action == "create":
                    result = await self._create(hv, order.vm)
                    desired = Desired(uuid, to_plain(order.vm), "running")
                else:
                    result = await self._receive(hv, order.vm, str(order.params.get("mode")))
                    desired = Desired(uuid, to_plain(order.vm), "incoming")
            elif not uuid:
                raise Refused("no vm_uuid")
            elif order.action == "start":
                await self._not_before_fence(uuid, order)
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
            elif order.action == "migrate":
                result = await self._leave(hv, uuid, order)
                shutil.rmtree(self._storage.disks_dir / uuid, ignore_errors=True)
                forget = uuid
            elif order.action == "adopt":
                result, state = await self._adopt(hv, uuid, order.params)
                desired = Desired(uuid, {}, state)
            elif order.action == "release":
                result = await self._release(hv, uuid)
            else:  # delete, evict: gone from this node
                existed = await hv.undefine(uuid)
                shutil.rmtree(self._storage.disks_dir / uuid, ignore_errors=True)
                forget = uuid
                result = {"state": "deleted", "existed": existed}
        except (Refused, HypervisorError, DomainSpecError, images.ImageError, OSError,
                ValueError, ET.ParseError) as exc:
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

    async def _undo_create(self, hv: Hypervisor, uuid: str) -> None:
        """A create that will not be finished leaves nothing behind, as one that failed does:
        its report says failed, and the aggregator may make the VM elsewhere. A VM this node
        already had before the order (its journal wants it) stays."""
        if not uuid or await self._journal.desired_of(uuid) is not None:
            return
        try:
            await hv.undefine(uuid)  # stopped first if it runs
        except HypervisorError as exc:
            log.error("cannot remove %s, half made by an unfinished create: %s", uuid, exc)
            return
        shutil.rmtree(self._storage.disks_dir / uuid, ignore_errors=True)

    async def _not_before_fence(self, uuid: str, order: Order) -> None:
        """An order to start a fenced VM counts only if it was issued after the fence: one
        issued before may be stale (the VM may have been started elsewhere since)."""
        want = await self._journal.desired_of(uuid)
        fenced_at = await self._journal.fenced_at()
        if want is not None and want.state == "fenced" and fenced_at is not None \
                and order.issued_at < fenced_at:
            raise Refused("issued before this node, cut off past its lease, paused the VM"
                          " (it may run elsewhere now)")

    # --- moving VMs between nodes ----------------------------------------------------------

    async def _receive(self, hv: Hypervisor, spec: VmSpec, mode: str) -> dict[str, Any]:
        """The destination's side first: check the VM may and can come here, and prepare its
        files (images fetched, an empty disk on the same base). It is ``incoming`` until
        adopted: never started from here."""
        want = await self._journal.desired_of(spec.uuid)
        if want is not None and want.state != "incoming":
            raise Refused("the VM is on this node already")
        if want is None and await hv.state(spec.uuid) is not None:
            raise Refused("a guest with the VM's id is defined on this node already")
        if mode == "live" and not self._migration.address:
            raise Refused("this node takes no live migrations: its [libvirt]"
                          " migration_address is not set")
        await self._check_limits(hv, spec)
        files = await self._prepare(hv, spec)
        offers = await hv.host_offers(files.domain_type)  # the source checks the guest on it
        return {"address": self._migration.address, "domain_type": files.domain_type,
                **offers.as_result(), **{k: str(v) for k, v in files.paths().items()}}

    async def _leave(self, hv: Hypervisor, uuid: str, order: Order) -> dict[str, Any]:
        """Migrate, with the VM marked ``leaving`` meanwhile: an agent killed in the middle
        never starts it again here by itself (it may be running at the destination). A
        failed move puts the mark back only if the VM is still here."""
        want = await self._journal.desired_of(uuid)
        before = want.state if want is not None else ""
        if before in ("running", "stopped"):
            await self._journal.set_state(uuid, before, "leaving")
        try:
            return await self._migrate(hv, order)
        except BaseException:
            if before in ("running", "stopped") and hv.alive() \
                    and await hv.state(uuid) is not None:
                await self._journal.set_state(uuid, "leaving", before)
            raise

    async def _migrate(self, hv: Hypervisor, order: Order) -> dict[str, Any]:
        """The source's side: check the destination the order names against the VM's own
        residency policy (as this node recorded it), then move it there peer to peer."""
        p = order.params
        uuid = str(p.get("vm_uuid", ""))
        dest, mode = str(p.get("dest", "")), str(p.get("mode", "live"))
        if dest == self._node:
            raise Refused("the destination is this node")
        want = await self._journal.desired_of(uuid)
        spec = want.spec if want is not None else {}
        for key, what in (("countries", "country"), ("providers", "provider")):
            allowed, there = list(spec.get(key) or ()), str(p.get(f"dest_{what}", ""))
            if allowed and there not in allowed:
                raise Refused(f"the destination {dest} has {what} {there or 'unknown'}; the"
                              f" VM allows only {', '.join(allowed)}")
        state = await hv.state(uuid)
        if state is None:
            raise Refused("the VM is not on this node")
        xml = await hv.domain_xml(uuid)
        here = _files_of(xml)
        mapping = {path: str(p.get(role, "")) for role, path in here.items()}
        missing = [role for role, new in mapping.items() if not new]
        if missing:
            raise Refused(f"the destination gave no path for the VM's {', '.join(missing)}")
        disk = here.get("disk")
        backing = _has_backing(xml)
        if backing is None:  # the XML does not say (a guest not running): the file does
            backing = disk is not None and await images.backing_file(Path(disk)) is not None

        def report(figures: MigrationProgress) -> None:
            self._progress(order.order_id, figures)

        offers = HostOffers.from_params(p)
        if offers is not None and (mode == "live" or disk is not None):  # libvirt moves it
            why = misfits(guest_needs(xml), offers)
            if why:
                raise Refused(f"the guest cannot run on {dest} as it runs here: "
                              + "; ".join(why))
        limits = _limits(p)
        left = order.expires_at - time.time() - ORDER_END_MARGIN_S
        if left < MIGRATION_MIN_S:
            raise Refused(f"only {max(left, 0):.0f} s of the order's life is left: too little"
                          " to migrate")
        limits["timeout_s"] = min(limits["timeout_s"], left)  # aborted before it expires
        started = time.monotonic()
        moved: MigrationResult | None = None
        if mode == "live":
            if state not in ("running", "paused"):
                raise Refused(f"the VM is {state}: a live migration needs it running")
            ours, theirs = ET.fromstring(xml).get("type"), str(p.get("domain_type", ""))  # noqa: S314
            if theirs != ours:
                raise Refused(f"the destination runs {theirs or 'unknown'} guests, this VM is"
                              f" a {ours} guest")
            moved = await hv.migrate(
                uuid, self._migration.uri(str(p.get("address", ""))), live=True,
                copy_storage=disk is not None, incremental=backing,
                dest_xml=retarget(await hv.migratable_xml(uuid), mapping), **limits,
                tls=self._migration.transport == "tls", progress=report)
        else:  # cold: stopped here, its disk copied, defined and started there
            if state not in ("shut off", "crashed"):
                await hv.shutdown(uuid, self._storage.shutdown_timeout_s)
            if disk is not None:
                # The copy goes the way a migration's does: the guest, started paused (it
                # runs no instruction), moves with its disk; the destination starts it anew.
                await hv.start(uuid, paused=True)
                try:
                    moved = await hv.migrate(
                        uuid, self._migration.uri(str(p.get("address", ""))), live=False,
                        copy_storage=True, incremental=backing,
                        dest_xml=retarget(await hv.migratable_xml(uuid), mapping),
                        **limits, tls=self._migration.transport == "tls",
                        progress=report)
                except BaseException:
                    if hv.alive() and await hv.state(uuid) not in (None, "shut off"):
                        await hv.destroy(uuid)  # back to how it was: stopped, here
                    raise
            else:
                await hv.undefine(uuid)  # nothing to copy: the destination defines it anew
        result: dict[str, Any] = {"mode": mode, "dest": dest}
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

    def _progress(self, order_id: str, figures: MigrationProgress) -> None:
        now = time.monotonic()
        if now - self._progress_at.get(order_id, 0.0) < PROGRESS_EVERY_S:
            return
        self._progress_at[order_id] = now
        plain = {k: v for k, v in to_plain(figures).items() if v is not None}
        task = asyncio.ensure_future(self._send(order_id, "progress", plain, ""))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _adopt(self, hv: Hypervisor, uuid: str, params: dict[str, Any]
                     ) -> tuple[dict[str, Any], str]:
        """The destination takes the VM over: it is this node's from now on. After a cold
        move it is defined here (if its disk did not bring the definition) and booted."""
        want = await self._journal.desired_of(uuid)
        if want is None:
            raise Refused("this node did not prepare to receive the VM")
        state = await hv.state(uuid)
        if str(params.get("mode")) == "live":
            if state is None:
                raise Refused("the VM has not arrived on this node")
            if await hv.job_stats(uuid) is not None:
                raise Refused("the VM is still arriving: ask again")
            if state in ("shut off", "crashed"):  # e.g. this host restarted since it came
                await hv.start(uuid)
            return {"state": await hv.state(uuid) or "gone"}, "running"
        if state not in (None, "shut off", "crashed"):
            await hv.destroy(uuid)  # arrived paused with its disk: it boots afresh
        if state is None and want.spec:
            await self._define(hv, VmSpecFrom(want.spec))
        start = bool(params.get("start"))
        if start:
            await hv.start(uuid)
        return {"state": await hv.state(uuid) or "gone"}, "running" if start else "stopped"

    async def _release(self, hv: Hypervisor, uuid: str) -> dict[str, Any]:
        """A move or restart here failed (or its outcome is unknown): drop what was prepared,
        unless the VM did arrive; then say so, and keep it. Once this answered "not here",
        the VM is never made here from an earlier order: those are replays now, and what the
        journal still wanted of it is forgotten (a restart would define it again)."""
        state = await hv.state(uuid)
        if state is not None:
            if await hv.job_stats(uuid) is not None:
                raise Refused("a migration of the VM is still arriving: ask again")
            return {"present": True, "state": state}
        want = await self._journal.desired_of(uuid)
        if want is not None:
            await self._journal.forget(uuid)
        if want is None or want.state == "incoming":  # prepared (or half, by a refused one)
            shutil.rmtree(self._storage.disks_dir / uuid, ignore_errors=True)
        return {"present": False}

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

    async def _prepare(self, hv: Hypervisor, spec: VmSpec) -> Files:
        """The VM's images fetched and its directory and disk made (kept if there)."""
        st = self._storage
        home = st.disks_dir / spec.uuid
        fetched: dict[str, Path] = {}
        for name, digest in ((spec.image, spec.image_sha256), (spec.kernel, spec.kernel_sha256),
                             (spec.initrd, spec.initrd_sha256)):
            if name:
                fetched[name] = await images.fetch(st.images_url, name, digest, st.images_dir,
                                                   self._tls)
        domain_type = (await hv.inventory("", "")).domain_type
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

    async def _define(self, hv: Hypervisor, spec: VmSpec) -> None:
        files = await self._prepare(hv, spec)
        xml = domain_xml(spec, domain_type=files.domain_type, disk=files.disk,
                         kernel=files.kernel, initrd=files.initrd, serial_log=files.serial)
        await hv.define(xml)

    async def fence(self) -> tuple[int, int]:
        """The node is cut off past its lease: pause every guest it runs by order, and mark
        them fenced, so that nothing but an order issued after this starts them again (the
        aggregator may have started them elsewhere). Returns how many were paused and how
        many could not be (libvirt away): the caller tries again."""
        hv = self._hv()
        paused = failed = 0
        await self._journal.touch_fenced(time.time())
        for want in await self._journal.desired():
            if want.state not in ("running", "incoming"):
                continue
            try:
                if hv is None:
                    raise HypervisorError("libvirt is not connected")
                if await hv.state(want.vm_uuid) == "running":
                    await hv.change_state(want.vm_uuid, "suspend")
                    paused += 1
            except HypervisorError as exc:
                log.error("cannot pause %s: %s", want.vm_uuid, exc)
                failed += 1
                continue
            if want.state == "running":
                await self._journal.set_state(want.vm_uuid, "running", "fenced")
        return paused, failed

    async def _send(self, order_id: str, state: str, result: dict[str, Any],
                    error: str) -> None:
        node = self._node
        plain = {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}

        def make(seq: int) -> bytes:
            return encode(Report(node=node, seq=seq, ts=time.time(), order_id=order_id,
                                 state=state, result=plain, error=error[:2000]))

        await self._report(make)


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


def _files_of(xml: str) -> dict[str, str]:
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


def _vm_of(order: Order) -> str:
    return order.vm.uuid if order.vm is not None else str(order.params.get("vm_uuid", ""))


def _has_backing(xml: str) -> bool | None:
    """Whether the guest's disk is an overlay on a backing file, from its live XML (libvirt
    lists a running guest's backing chain: the agent need not read a disk that libvirt gave
    to QEMU's user); None where the XML does not say (an inactive definition)."""
    disk = ET.fromstring(xml).find("devices/disk[@device='disk']")  # noqa: S314
    chain = disk.find("backingStore") if disk is not None else None
    if chain is None:
        return None
    return chain.find("source") is not None


def _limits(params: dict[str, Any]) -> dict[str, Any]:
    """A migrate order's settings as :meth:`Hypervisor.migrate` takes them."""
    def number(key: str) -> Any:
        value = params.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 1 else None

    downtime, bandwidth = number("max_downtime_ms"), number("bandwidth_mib_s")
    return {"max_downtime_ms": int(downtime) if downtime else None,
            "bandwidth_mib_s": int(bandwidth) if bandwidth else None,
            "auto_converge": params.get("auto_converge") is True,
            "postcopy": params.get("postcopy") is True,
            "timeout_s": float(number("timeout_s") or DEFAULT_MIGRATION_TIMEOUT_S)}


DEFAULT_MIGRATION_TIMEOUT_S: Final = 600.0


def VmSpecFrom(plain: dict[str, Any]) -> VmSpec:
    """A VmSpec back from the journal's JSON (tuples were stored as lists)."""
    fields = dict(plain)
    for name in ("countries", "providers"):
        fields[name] = tuple(fields.get(name, ()))
    return VmSpec(**fields)
