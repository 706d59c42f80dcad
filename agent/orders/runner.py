"""Executing signed orders, in turn: verify, journal, acknowledge, run, report.

An order is run only if it passes ``signatures.py`` (signed by the aggregator's key, for this
node, not expired), its action and parameters are known (``handlers.py``,
``contract/orders.py``) and its number is above every number accepted before (a replay is
refused). It is journaled before the node says ``accepted``; a duplicate of an order already
run is answered with the recorded result and never run twice; an order the agent was killed in
the middle of is finished at the next start (each handler is idempotent), as ``recovery.py``
decides. The node refuses what breaks its own limits or the VM's residency policy, whatever the
aggregator asked. Reports go through the events spool (``reports.py``), so they survive uplink
loss.

Orders run one after the other, except a migration: it runs beside the orders after it, and an
order about the same VM waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any, Final

from agent.host import images
from agent.host.domainxml import DomainSpecError
from agent.host.hypervisor import Hypervisor, HypervisorError
from agent.orders import fencing, lifecycle, recovery, upkeep
from agent.orders.context import Context, Job
from agent.orders.errors import OrderKeyError, Refused
from agent.orders.handlers import handler_of, job_of
from agent.orders.journal import Journal
from agent.orders.reports import Reports
from agent.orders.settings import Migration, NodeLimits, Settings, Storage
from agent.orders.signatures import VerifyKey, check_order, load_verify_key
from contract.wire import Order, ProtocolError, decode

__all__ = [
    "Migration",
    "NodeLimits",
    "OrderKeyError",
    "OrderRunner",
    "Refused",
    "Settings",
    "Storage",
    "load_verify_key",
]

log = logging.getLogger("virt8ra.agent.orders")

QUEUE_MAX: Final = 1000  # orders waiting their turn; more are dropped (sent again)


class OrderRunner:
    """The daemon's ``orders`` task (:meth:`run`): orders handed over by the uplink
    (:meth:`submit`) checked, journaled and run in turn; recovery at the start and whenever
    libvirt comes back; :meth:`fence` when the daemon finds the node cut off past its lease."""

    def __init__(self, *, settings: Settings, key: VerifyKey, journal: Journal,
                 hypervisor: Callable[[], Hypervisor | None], tls: Callable[[], Any],
                 report: Callable[[Callable[[int], bytes]], Awaitable[None]]) -> None:
        """``settings``: the node as orders see it; ``key``: the aggregator's order-signing
        key (``load_verify_key``); ``journal``: opened by the caller; ``hypervisor``: libvirt
        as it is connected now (None: not); ``tls``: the node's TLS context for the image
        service; ``report``: sends a report through the events spool (given a function that
        makes it for a sequence number)."""
        self._settings = settings
        self._key = key
        self._journal = journal
        self._hv = hypervisor
        self._tls = tls
        self._reports = Reports(settings.node, report)
        # The last contact with the aggregator as the journal had it when the agent started
        # (before this run touched it): set by the daemon.
        self.contact_at_start: float | None = None
        self._start_judged = False  # whether a recovery has judged the time before the start
        self._queue: asyncio.Queue[tuple[Order, bytes]] = asyncio.Queue(maxsize=QUEUE_MAX)
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

    async def _handle(self, order: Order, payload: bytes) -> None:
        try:
            check_order(order, payload, key=self._key, node=self._settings.node,
                        now=time.time())
            job = job_of(order)
        except Refused as exc:
            log.warning("refused order %s: %s", order.order_id, exc)
            await self._reports.send(order.order_id, "failed", {}, f"refused: {exc}")
            return
        hv = self._hv()
        if hv is None or not hv.alive():  # not accepted: the aggregator sends it again
            log.warning("order %s not taken: libvirt is not connected", order.order_id)
            return
        done = await self._journal.get(order.order_id)
        if done is not None:  # a duplicate: answer with what happened, never run it again
            if done.state != "accepted":
                await self._reports.send(order.order_id, done.state, done.result, done.error)
            return
        if not await self._journal.accept(order.order_id, order.seq, order.action, payload,
                                          time.time()):
            last = await self._journal.last_seq()
            log.warning("refused order %s: replayed number %d", order.order_id, order.seq)
            await self._reports.send(order.order_id, "failed", {},
                                     f"refused: replayed order number {order.seq} (last {last})")
            return
        await self._reports.send(order.order_id, "accepted", {}, "")
        await self._execute_in_turn(job)

    # --- sequencing ------------------------------------------------------------------------

    async def _execute_in_turn(self, job: Job[Any]) -> None:
        """Run an accepted order. A migration runs beside the orders after it: a drain moves
        several VMs of this node at once, and the node still takes other orders while they
        go. An order about a VM that is migrating waits for the migration (the queue with
        it: the aggregator sends none while a move runs); stopping ends that wait, and the
        order, journaled as accepted, is finished by the next start."""
        uuid = job.vm_uuid
        if not await self._after_migration_of(uuid):
            return
        if not handler_of(job).beside or not uuid:
            await self._execute(job)
            return
        task = asyncio.create_task(self._execute_beside(job),
                                   name=f"{job.order.action} {uuid}")
        self._moving[uuid] = task
        self._running.add(job.order_id)

        def ended(done: asyncio.Task[None]) -> None:
            self._running.discard(job.order_id)
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

    async def _execute_beside(self, job: Job[Any]) -> None:
        try:
            await self._execute(job)
        except HypervisorError as exc:  # libvirt went away: the order stays accepted
            log.error("order %s interrupted: %s; finished once libvirt is back",
                      job.order_id, exc)
            self._trouble_beside.set()
        except Exception as exc:  # handed to run(), which ends with it
            self._failed_beside = exc
            self._trouble_beside.set()

    # --- running ---------------------------------------------------------------------------

    def _context(self, hv: Hypervisor) -> Context:
        return Context(hv, self._journal, self._settings, self._tls, self._reports.progress)

    async def _execute(self, job: Job[Any]) -> None:
        """Run the order's handler; journal and report how it ended. libvirt going away in
        the middle is not the order's fault: it stays accepted (HypervisorError raised)."""
        hv = self._hv()
        if hv is None:
            raise HypervisorError("libvirt is not connected")
        try:
            outcome = await handler_of(job).run(self._context(hv), job)
        except (Refused, HypervisorError, DomainSpecError, images.ImageError, OSError,
                ValueError, ET.ParseError) as exc:
            if isinstance(exc, HypervisorError) and not hv.alive():
                raise  # not the order's fault: finish it once libvirt is back
            error = f"refused: {exc}" if isinstance(exc, Refused) else str(exc)
            log.warning("order %s failed: %s", job.order_id, error)
            await self._fail(job.order_id, error)
            return
        self.executed += 1
        await self._journal.finish(job.order_id, "succeeded", outcome.result, "", time.time(),
                                   outcome.desired, outcome.forget)
        await self._reports.send(job.order_id, "succeeded", outcome.result, "")

    async def _fail(self, order_id: str, error: str) -> None:
        await self._journal.finish(order_id, "failed", {}, error, time.time())
        await self._reports.send(order_id, "failed", {}, error)

    # --- recovery and fencing (decided in recovery.py and fencing.py) ----------------------

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

    async def _recover(self) -> None:
        """Finish what a killed agent left half-done, then bring the VMs that should run
        back up (after a host reboot, with or without an uplink). A node that was cut off
        past its lease before this start starts nothing: its VMs may run elsewhere by now."""
        hv = self._hv()
        now = time.time()
        lease_s, last = self._settings.lease_s, self.contact_at_start
        cut_off = recovery.cut_off_at_start(lease_s=lease_s, contact_at_start=last,
                                            judged=self._start_judged, now=now)
        if cut_off:
            paused, failed = await self.fence()
            log.warning("no contact with the aggregator for %.0f s before this start (lease"
                        " %.0f s): nothing is started, %d guest(s) paused until it says"
                        " otherwise%s", now - (last or 0), lease_s, paused,
                        f" ({failed} could not be)" if failed else "")
        if not await self._finish_unfinished(hv, cut_off):
            return  # stopping
        # The cut-off before this start is judged once: a later recovery (libvirt was away
        # for a moment) is no outage of the uplink's.
        self._start_judged = True
        if hv is None:
            return
        wants = await self._journal.desired()
        observed = await upkeep.observe(hv, recovery.to_restore(wants, cut_off=cut_off),
                                        "restore")
        await upkeep.restore(self._context(hv),
                             recovery.plan_restore(wants, observed, cut_off=cut_off))

    async def _finish_unfinished(self, hv: Hypervisor | None, cut_off: bool) -> bool:
        """Settle each order the journal holds as accepted, oldest first, each read again
        just before (it may have ended meanwhile); False if stopping came first."""
        for entry in await self._journal.unfinished():
            try:
                order = decode(entry.envelope)
            except ProtocolError:
                continue
            if not isinstance(order, Order) or order.order_id in self._running:
                continue  # (a migration still going on beside)
            try:
                job = job_of(order)
            except Refused as exc:  # accepted by an agent that read it otherwise
                await self._fail(order.order_id, f"refused: {exc}")
                continue
            if not await self._after_migration_of(job.vm_uuid):
                return False
            current = await self._journal.get(order.order_id)
            decision = recovery.settle(
                recovery.Unfinished(order.order_id, order.action, order.expires_at,
                                    current.state if current is not None else None,
                                    order.order_id in self._running),
                time.time(), cut_off=cut_off)
            if isinstance(decision, recovery.Abandon):
                log.warning("order %s (%s): %s", order.order_id, order.action, decision.error)
                if decision.undo_create and hv is not None:
                    await lifecycle.undo_create(self._context(hv), job.vm_uuid)
                await self._fail(order.order_id, decision.error)
            elif isinstance(decision, recovery.Resume):
                log.info("finishing order %s (%s) after a restart", order.order_id,
                         order.action)
                await self._execute(job)
        return True

    async def fence(self) -> tuple[int, int]:
        """The node is cut off past its lease: pause every guest it runs by order, and mark
        them fenced, so that nothing but an order issued after this starts them again (the
        aggregator may have started them elsewhere). Returns how many were paused and how
        many could not be (libvirt away): the caller tries again."""
        hv = self._hv()
        now = time.time()
        wants = await self._journal.desired()
        observed = await upkeep.observe(hv, fencing.to_fence(wants), "pause")
        return await upkeep.fence(hv, self._journal, fencing.plan_fence(wants, observed, now))
