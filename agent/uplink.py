"""The agent's MQTT uplink: the only module of the agent that imports aiomqtt.

Connects with the node's certificate, sets the retained ``offline`` status as last will,
announces ``online`` with the inventory on every connect, and drains the spool in order with
QoS 1, removing a message only after the broker acknowledged it. When the connection fails it
reconnects with exponential backoff and full jitter; the spool keeps filling meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from agent.spool import Pending, Spool
from agent.wire import Inventory, Status, encode, topic

log = logging.getLogger("virt8ra.agent.uplink")


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    node: str
    host: str
    port: int
    tls: ssl.SSLContext
    keepalive_s: int
    connect_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    interval_s: float
    batch: int = 200
    window: int = 50


def backoff_delay(attempt: int, initial: float, maximum: float, rand: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2**attempt)]."""
    return float(rand * min(maximum, initial * (2.0 ** min(attempt, 32))))


class Uplink:
    """Owns the MQTT session; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        settings: UplinkSettings,
        spool: Spool,
        inventory: Callable[[], Inventory],
    ) -> None:
        self._s = settings
        self._spool = spool
        self._inventory = inventory
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Tell the uplink that the spool has something new, or that it should stop."""
        self._wake.set()

    def _status(self, state: str) -> bytes:
        inventory = self._inventory() if state == "online" else None
        return encode(
            Status(
                node=self._s.node,
                state="online" if state == "online" else "offline",
                ts=time.time(),
                interval_s=self._s.interval_s,
                inventory=inventory,
            )
        )

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        status_topic = topic(self._s.node, "status")
        while not stop.is_set():
            client = aiomqtt.Client(
                self._s.host,
                self._s.port,
                identifier=self._s.node,
                tls_context=self._s.tls,
                keepalive=self._s.keepalive_s,
                timeout=self._s.connect_timeout_s,
                will=aiomqtt.Will(status_topic, self._status("offline"), qos=1, retain=True),
                clean_session=True,
            )
            try:
                async with client:
                    attempt = 0
                    log.info("connected to %s:%d", self._s.host, self._s.port)
                    await client.publish(status_topic, self._status("online"), qos=1, retain=True)
                    await self._drain(client, stop)
                    # Stopping: say so ourselves rather than leave it to the will.
                    await client.publish(status_topic, self._status("offline"), qos=1, retain=True)
                    return
            except aiomqtt.MqttError as exc:
                log.warning("uplink down: %s", exc)
            delay = backoff_delay(
                attempt, self._s.backoff_initial_s, self._s.backoff_max_s, random.random()
            )
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(delay, 0.05))

    async def _drain(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Publish spooled messages in order until ``stop``; raises MqttError on link loss."""
        while not stop.is_set():
            self._wake.clear()
            batch = await self._spool.pending(self._s.batch)
            if not batch:
                await self._wake.wait()  # new messages, or stop (the daemon wakes us)
                continue
            for start in range(0, len(batch), self._s.window):
                window = batch[start : start + self._s.window]
                await asyncio.gather(*(self._publish(client, p) for p in window))
                await self._spool.remove([p.id for p in window])

    async def _publish(self, client: aiomqtt.Client, pending: Pending) -> None:
        name = topic(self._s.node, "telemetry" if pending.channel == "telemetry" else "events")
        await client.publish(name, pending.payload, qos=1)
