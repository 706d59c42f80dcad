"""The order dispatcher: each turn it expires what ran out of time, lets VMs and moves take
their next steps (which issue orders), and publishes the orders that are due, in sequence,
through the control session.

What is due, and when an unanswered order goes out again, is ``workloads/orders.py``'s
decision; this module only runs the turns: at once when woken (a new order, a node's report),
otherwise every ``dispatch_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from aggregator.config import OrdersConfig
from aggregator.fleet.control import ControlUnavailable
from aggregator.store.tx import Tx
from aggregator.store.writer import Store
from aggregator.trust.pki import OrderSigner
from aggregator.workloads import moves, orders, vms
from contract.profiles import Profile

log = logging.getLogger("virt8ra.aggregator.dispatcher")

_PUBLISH_WAIT_S = 2.0  # for the control session, per order, before the turn gives up


class Publisher(Protocol):
    """What reaches a node (``fleet/control.py``)."""

    async def publish(self, node: str, payload: bytes, wait_s: float = 10.0) -> None:
        """Send ``payload`` to ``node``; raises ControlUnavailable."""
        ...


class Listener(Protocol):
    """Ingest (``fleet/ingest.py``): nodes are judged silent only over time it listened."""

    @property
    def connected_since(self) -> float | None: ...


class Dispatcher:
    """:meth:`run` until ``stop``; setting ``wake`` starts a turn at once."""

    def __init__(self, store: Store, publisher: Publisher, *, signer: OrderSigner | None,
                 profiles: dict[str, Profile], liveness: vms.Liveness, config: OrdersConfig,
                 listener: Listener, wake: asyncio.Event) -> None:
        self._store = store
        self._publisher = publisher
        self._signer = signer
        self._profiles = profiles
        self._liveness = liveness
        self._config = config
        self._listener = listener
        self._wake = wake

    async def run(self, stop: asyncio.Event) -> None:
        """Publish due orders in sequence: new ones at once, unanswered ones again with
        backoff, everything a node missed when it comes back; expire what ran out of time."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.turn(time.time())
            except Exception:  # a bad turn must not stop order delivery for good
                log.exception("order dispatch failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=self._config.dispatch_interval_s)

    async def turn(self, now: float) -> None:
        expired = await self._store.write(lambda db: orders.expire(db, now))
        if expired:
            log.warning("%d order(s) expired unfinished", expired)
        if self._signer is not None:
            await self._step_vms(self._signer, now)
        await self._publish_due(now)

    async def _step_vms(self, signer: OrderSigner, now: float) -> None:
        """Restart what its node paused on its own; moves, drains and lost nodes' VMs take
        their next steps. Each issues orders, published in the same turn."""
        live, ttl = self._liveness, self._config.ttl_s
        restarted = await self._store.write(lambda db: vms.reconcile(db, signer, now, live, ttl))
        if restarted:
            log.info("resuming %d VM(s) their node paused on its own", len(restarted))
        ctx = moves.Context(signer, self._profiles, live, ttl)
        grace, since = self._config.node_loss_grace_s, self._listener.connected_since

        def move_on(db: Tx) -> list[str]:
            moves.advance(db, ctx, now)
            moves.drive(db, ctx, now)
            lost = moves.restart_lost(db, ctx, now, grace, since)
            moves.evict(db, ctx, now)
            return lost

        try:
            lost = await self._store.write(move_on)
        except Exception:  # orders already due still go out
            log.exception("moving VMs failed this turn; trying again at the next")
            return
        if lost:
            log.warning("restarting %d VM(s) of lost nodes elsewhere", len(lost))

    async def _publish_due(self, now: float) -> None:
        due = await self._store.read(lambda c: orders.due(c, now))
        sent: list[str] = []
        for item in due:
            try:
                await self._publisher.publish(item.node_id, item.payload, wait_s=_PUBLISH_WAIT_S)
            except ControlUnavailable as exc:
                log.warning("orders wait for the broker: %s", exc)
                break
            sent.append(item.order_id)
        if sent:
            await self._store.write(lambda db: orders.mark_sent(db, sent, now))
