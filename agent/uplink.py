"""The agent's MQTT uplink: the only module of the agent that imports aiomqtt.

Connects with the node's certificate (read anew for every connection, so a renewed one is
used from the next), sets the retained ``offline`` status as last will, announces ``online``
with the inventory on every connect, and drains the spool in order with QoS 1, removing a
message only after the broker acknowledged it. It reads the node's orders topic and hands what
arrives there, decoded and as received, to ``on_message``. When the connection fails it
reconnects with exponential backoff and full jitter (``plumbing/backoff.py``); the spool keeps
filling meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from agent.spool import Pending, Spool
from contract.wire import Inventory, Message, ProtocolError, Status, decode, encode, topic
from plumbing.backoff import Backoff
from plumbing.tls import TlsContext, no_delay

log = logging.getLogger("virt8ra.agent.uplink")


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    node: str
    host: str
    port: int
    tls: Callable[[], TlsContext]  # made for each connection: certificates are renewed
    keepalive_s: int
    connect_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    interval_s: float
    batch: int = 200
    window: int = 50
    lease_s: float = 0.0  # told to the aggregator in the status


class Uplink:
    """Owns the MQTT session; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        settings: UplinkSettings,
        spool: Spool,
        inventory: Callable[[], Inventory],
        on_message: Callable[[Message, bytes], None] = lambda msg, payload: None,
    ) -> None:
        self._s = settings
        self._spool = spool
        self._inventory = inventory
        self._on_message = on_message
        self._wake = asyncio.Event()
        # When the session to the broker was last lost (monotonic); None while connected.
        self.down_since: float | None = time.monotonic()
        self.connects = 0  # sessions so far: one that came and went between looks still counts

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
                lease_s=self._s.lease_s,
            )
        )

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self._s.backoff_initial_s, self._s.backoff_max_s, floor_s=0.05)
        attempt = 0
        status_topic = topic(self._s.node, "status")
        while not stop.is_set():
            try:
                client = aiomqtt.Client(
                    self._s.host,
                    self._s.port,
                    identifier=self._s.node,
                    tls_context=self._s.tls(),
                    keepalive=self._s.keepalive_s,
                    timeout=self._s.connect_timeout_s,
                    will=aiomqtt.Will(status_topic, self._status("offline"), qos=1, retain=True),
                    clean_session=True,
                )
                async with client:
                    attempt = 0
                    no_delay(client._client.socket())
                    self.down_since = None
                    self.connects += 1
                    log.info("connected to %s:%d", self._s.host, self._s.port)
                    await self._session(client, stop)
                    # Stopping: say so ourselves rather than leave it to the will.
                    await client.publish(status_topic, self._status("offline"), qos=1, retain=True)
                    return
            except (aiomqtt.MqttError, OSError) as exc:  # ssl.SSLError is an OSError
                log.warning("uplink down: %s", exc)
            if self.down_since is None:
                self.down_since = time.monotonic()
            delay = backoff.delay(attempt, random.random())
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Subscribe, say ``online``, then drain the spool until ``stop``, while receiving
        orders. A lost link ends it all at once: the receiver sees it as it happens, while a
        subscribe or publish waiting for its acknowledgement would wait out the whole timeout
        (and the lease would count from then)."""
        receiver = asyncio.create_task(self._receive(client), name="receive")
        drainer = asyncio.create_task(self._announce_and_drain(client, stop), name="drain")
        try:
            done, _ = await asyncio.wait((receiver, drainer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiver, drainer):
                task.cancel()
            await asyncio.gather(receiver, drainer, return_exceptions=True)
        for task in done:
            task.result()  # the MqttError of a lost link
        if receiver in done:
            raise aiomqtt.MqttError("the broker's message stream ended")

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes):
                log.warning("ignored a non-binary message on %s", message.topic.value)
                continue
            try:
                msg = decode(payload)
            except ProtocolError as exc:
                log.warning("ignored a malformed message on %s: %s", message.topic.value, exc)
                continue
            if msg.node != self._s.node:
                log.warning("ignored a %s for node %r", msg.TYPE, msg.node)
                continue
            self._on_message(msg, payload)

    async def _announce_and_drain(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Subscribe to the orders topic, say ``online``, then publish spooled messages in
        order until ``stop``; raises MqttError on link loss."""
        await client.subscribe(topic(self._s.node, "orders"), qos=1)
        await client.publish(topic(self._s.node, "status"), self._status("online"), qos=1,
                             retain=True)
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
