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
from paho.mqtt.enums import MQTTErrorCode

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
from agent.wirecheck import check
from aggregator.store import EventIn, MalformedIn, StatusIn, Store, TelemetryIn

log = logging.getLogger("virt8ra.aggregator.ingest")
_READ_BURST = 500  # packets per readable socket before other tasks get their turn


@dataclass
class IngestCounters:
    received: int = 0
    malformed: int = 0
    shed: int = 0
    connects: int = 0
    malformed_by_reason: dict[str, int] = field(default_factory=dict)


class _ReadBuffered:
    """The connected socket with a read buffer: paho reads each packet in three or four small
    ``recv`` calls (type, length, body); one large read now serves many of them."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf: bytes = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buf):
            self._buf = self._sock.recv(1 << 16)  # would-block errors reach paho as before
            self._pos = 0
        chunk = self._buf[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + int(inner)

    def send(self, data: bytes) -> int:
        return self._sock.send(data)  # type: ignore[no-any-return]

    def fileno(self) -> int:
        return self._sock.fileno()  # type: ignore[no-any-return]

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._sock.close()


class _LeanClient(aiomqtt.Client):
    """aiomqtt's client with a leaner receive path: every message goes straight to a callback
    (no per-message objects, no bounded queue), and each time the socket is readable, paho reads
    every packet that has arrived, not one per event-loop turn (its ``loop_read`` stops after one
    packet for a QoS 1 subscriber; with TLS that meant one loop turn per message)."""

    on_payload: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client.loop_read = self._read_all  # type: ignore[method-assign]

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not isinstance(client._sock, _ReadBuffered):
            client._sock = _ReadBuffered(client._sock)  # type: ignore[assignment]
        super()._on_socket_open(client, userdata, client._sock)

    def _read_all(self, max_packets: int = 1) -> MQTTErrorCode:
        client = self._client
        for _ in range(_READ_BURST):
            if client._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = client._packet_read()
            if rc > 0:
                return client._loop_rc_handle(rc)  # the connection is lost: paho tidies up
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return MQTTErrorCode.MQTT_ERR_SUCCESS

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
            kind, body = check(payload)  # validated whole, nothing built: the hot path
            if body["node"] != node:
                raise ProtocolError("node", f"{body['node']!r} published on {node!r}'s topic")
            if CHANNEL_OF[kind] != channel:
                raise ProtocolError("t", f"{kind!r} does not belong on {channel!r}")
        except ProtocolError as exc:
            self._malformed(node, exc)
            return
        if kind == Telemetry.TYPE:  # stored as it came; read back with decode
            if not self._store.ingest(TelemetryIn(node, body["seq"], body["ts"], now, payload)):
                c.shed += 1
            return
        msg = decode(payload)
        if isinstance(msg, Status):
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
