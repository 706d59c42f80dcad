"""Ingest: the aggregator's MQTT session, the only module of the aggregator that imports aiomqtt.

aiomqtt owns the connection (TLS, reconnects, futures). The receive path is deliberately
lean: paho's ``on_message`` callback decodes and validates each payload and hands it straight
to the store's writer queue, without aiomqtt's per-message objects and bounded queue (which
drops QoS 1 messages after they were acknowledged). Past the store's bound, telemetry is shed
visibly: counted, and recorded as a gap when the node's next number arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from agent.wire import (
    CHANNEL_OF,
    LifecycleEvent,
    ProtocolError,
    Report,
    Status,
    Telemetry,
    TelemetryGap,
    decode,
    parse_topic,
    subscription,
)
from aggregator.store import EventIn, MalformedIn, StatusIn, Store, TelemetryIn

log = logging.getLogger("virt8ra.aggregator.ingest")


@dataclass
class IngestCounters:
    received: int = 0
    malformed: int = 0
    shed: int = 0
    connects: int = 0
    malformed_by_reason: dict[str, int] = field(default_factory=dict)


class _LeanClient(aiomqtt.Client):
    """aiomqtt's client with the receive path replaced by a direct callback."""

    on_payload: Any = None

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self.on_payload(message.topic, message.payload, message.retain)
        except Exception:  # our bug: log it, but never let it tear down the session
            log.exception("ingest failed on a message from %r", message.topic)


class Ingest:
    def __init__(
        self,
        store: Store,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        client_id: str = "aggregator",
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._store = store
        self._host = host
        self._port = port
        self._tls = tls
        self._client_id = client_id
        self._timeout = connect_timeout_s
        self.counters = IngestCounters()
        self.connected = asyncio.Event()

    def handle(self, topic: str, payload: bytes, retained: bool) -> None:
        """Validate one message and queue it for storage; bad input is counted and dropped."""
        c = self.counters
        c.received += 1
        now = time.time()
        try:
            node, channel = parse_topic(topic)
        except ProtocolError as exc:
            self._malformed(None, exc)
            return
        try:
            msg = decode(payload)
            if msg.node != node:
                raise ProtocolError("node", f"{msg.node!r} published on {node!r}'s topic")
            if CHANNEL_OF[msg.TYPE] != channel:
                raise ProtocolError("t", f"{msg.TYPE!r} does not belong on {channel!r}")
        except ProtocolError as exc:
            self._malformed(node, exc)
            return
        if isinstance(msg, Telemetry):
            if not self._store.ingest(TelemetryIn(node, msg.seq, msg.ts, now, payload)):
                c.shed += 1
        elif isinstance(msg, Status):
            self._store.ingest(StatusIn(msg, now, retained))
        elif isinstance(msg, LifecycleEvent | TelemetryGap | Report):
            self._store.ingest(EventIn(msg, now))

    def _malformed(self, node: str | None, exc: ProtocolError) -> None:
        self.counters.malformed += 1
        key = exc.field
        self.counters.malformed_by_reason[key] = self.counters.malformed_by_reason.get(key, 0) + 1
        log.warning("dropped malformed message from %s: %s", node or "unknown topic", exc)
        if node is not None:
            self._store.ingest(MalformedIn(node))

    async def run(self, stop: asyncio.Event) -> None:
        """Stay subscribed until ``stop``; reconnect with backoff. A persistent session keeps
        the broker queueing our messages while we are away."""
        attempt = 0
        while not stop.is_set():
            client = _LeanClient(
                self._host,
                self._port,
                identifier=self._client_id,
                tls_context=self._tls,
                timeout=self._timeout,
                clean_session=False,
                keepalive=30,
                max_inflight_messages=1000,
            )
            client.on_payload = self.handle
            try:
                async with client:
                    attempt = 0
                    self.counters.connects += 1
                    for channel in ("status", "telemetry", "events"):
                        await client.subscribe(subscription(channel), qos=1)
                    self.connected.set()
                    log.info("ingest subscribed at %s:%d", self._host, self._port)
                    await _until_disconnected(client, stop)
            except aiomqtt.MqttError as exc:
                log.warning("ingest connection lost: %s", exc)
            finally:
                self.connected.clear()
            delay = random.random() * min(30.0, 0.5 * 2**attempt)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(delay, 0.1))


async def _until_disconnected(client: aiomqtt.Client, stop: asyncio.Event) -> None:
    """Return when ``stop`` is set; raise MqttError when the connection drops."""
    disconnected: asyncio.Future[Any] = client._disconnected  # aiomqtt's future for the end
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({stopper, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if disconnected.done():
        exc = disconnected.exception()
        raise aiomqtt.MqttError(str(exc) if exc else "disconnected")
