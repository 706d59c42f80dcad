"""Ingest: the aggregator's receiving MQTT session (control.py holds the sending one).

aiomqtt owns the connection (TLS, reconnects, futures). The receive path is deliberately
lean: paho's ``on_message`` callback checks each payload and passes it on, without aiomqtt's
per-message objects and bounded queue (which drops QoS 1 messages after they were
acknowledged). It runs in a process of its own; the aggregator feeds what it receives to the
store. Past the store's bound, telemetry is shed visibly: counted, and recorded as a gap when
the node's next number arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from aggregator.store.ingest import EventIn, MalformedIn, StatusIn, TelemetryIn
from aggregator.store.writer import Store
from contract.wire import (
    CHANNEL_OF,
    LifecycleEvent,
    ProtocolError,
    RenewRequest,
    Report,
    Status,
    Telemetry,
    TelemetryGap,
    decode,
    parse_topic,
    subscription,
)
from contract.wirecheck import check
from plumbing.backoff import Backoff
from plumbing.tls import client_context, no_delay

log = logging.getLogger("virt8ra.aggregator.ingest")
_READ_BURST = 500  # packets per readable socket before other tasks get their turn
RECONNECT = Backoff(initial_s=0.5, max_s=30.0, floor_s=0.1)  # the session; with full jitter
RESTART = Backoff(initial_s=0.5, max_s=30.0)  # the receiving process; no jitter


@dataclass
class IngestCounters:
    received: int = 0
    malformed: int = 0
    shed: int = 0
    connects: int = 0


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
        # paho logs every packet at debug level: two log calls per message on the hot path.
        # Its failures still reach us, as aiomqtt's exceptions.
        self._client.disable_logger()

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        no_delay(sock)
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


@dataclass(frozen=True)
class ReceiverSettings:
    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_id: str = "aggregator"
    connect_timeout_s: float = 10.0


# --- the receiving process --------------------------------------------------------------------
# Receiving costs ~90 us of Python per message (paho's packet parsing, the envelope check). It
# runs in a process of its own so that it and the store's writer each have a core instead of
# sharing one interpreter lock. It sends plain records to the aggregator in batches:
#   ["t", node, seq, ts, received_at, payload]      valid telemetry (stored as it came)
#   ["m", node, received_at, payload, retained]     a valid status or event
#   ["x", node, field, reason]                      malformed (node "" for a foreign topic)
#   ["c", connected]                                the MQTT session came up or went down
# A full pipe blocks the receiver, which stops reading the socket: the broker queues for us.

_FLUSH_AT = 1000
_PR_SET_PDEATHSIG = 1


class _Receiver:
    def __init__(self, settings: ReceiverSettings, conn: Connection) -> None:
        self._s = settings
        self._conn = conn
        self._batch: list[list[Any]] = []
        self._flush_pending = False
        self._loop = asyncio.get_running_loop()

    def handle(self, topic: str, payload: bytes, retained: bool) -> None:
        now = time.time()
        try:
            node, channel = parse_topic(topic)
        except ProtocolError as exc:
            self._emit(["x", "", exc.field, exc.reason])
            return
        try:
            kind, body = check(payload)  # validated whole, nothing built
            if body["node"] != node:
                raise ProtocolError("node", f"{body['node']!r} published on {node!r}'s topic")
            if CHANNEL_OF[kind] != channel:
                raise ProtocolError("t", f"{kind!r} does not belong on {channel!r}")
        except ProtocolError as exc:
            self._emit(["x", node, exc.field, exc.reason])
            return
        if kind == Telemetry.TYPE:
            self._emit(["t", node, body["seq"], body["ts"], now, payload])
        else:
            self._emit(["m", node, now, payload, retained])

    def _emit(self, record: list[Any]) -> None:
        self._batch.append(record)
        if len(self._batch) >= _FLUSH_AT:
            self._flush()
        elif not self._flush_pending:  # after this burst of packets
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._batch:
            self._conn.send_bytes(msgpack.packb(self._batch, use_bin_type=True))
            self._batch = []

    async def run(self, stop: asyncio.Event) -> None:
        """Stay subscribed until ``stop``; reconnect with backoff. A persistent session keeps
        the broker queueing our messages while we are away."""
        s = self._s
        tls = client_context(s.ca_file, s.cert_file, s.key_file)
        attempt = 0
        while not stop.is_set():
            client = _LeanClient(
                s.host, s.port, identifier=s.client_id, tls_context=tls,
                timeout=s.connect_timeout_s, clean_session=False, keepalive=30,
                max_inflight_messages=1000,
            )
            client.on_payload = self.handle
            try:
                async with client:
                    attempt = 0
                    for channel in ("status", "telemetry", "events"):
                        await client.subscribe(subscription(channel), qos=1)
                    self._emit(["c", True])
                    log.info("ingest subscribed at %s:%d", s.host, s.port)
                    await _until_disconnected(client, stop)
            except aiomqtt.MqttError as exc:
                log.warning("ingest connection lost: %s", exc)
            self._emit(["c", False])
            self._flush()
            delay = RECONNECT.delay(attempt, random.random())
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)


def _receiver_main(settings: ReceiverSettings, conn: Connection, parent: int) -> None:
    """The receiving process: runs until SIGTERM (Ctrl-C is the aggregator's to handle), which
    it also gets when the aggregator dies, however it dies: a second session under the
    aggregator's client id would fight the next aggregator's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        return
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await _Receiver(settings, conn).run(stop)

    asyncio.run(main())


# --- the aggregator's side --------------------------------------------------------------------


class Ingest:
    """Runs the receiving process, restarts it if it dies, and feeds its records to the
    store. Bad input is counted and dropped; past the store's bound telemetry is shed
    visibly (counted, and recorded as a gap when the node's next number arrives)."""

    def __init__(self, store: Store, settings: ReceiverSettings,
                 on_renew: Callable[[RenewRequest], None] | None = None,
                 on_report: Callable[[], None] | None = None) -> None:
        self._store = store
        self._settings = settings
        self._on_renew = on_renew
        self._on_report = on_report
        self.counters = IngestCounters()
        self.connected = asyncio.Event()
        # Since when the aggregator hears the broker (None: it does not now): nodes are
        # judged silent only over time it was listening.
        self.connected_since: float | None = None
        self.restarts = 0

    def _records(self, data: bytes) -> None:
        store, c = self._store, self.counters
        for record in msgpack.unpackb(data, raw=False):
            code = record[0]
            if code == "t":
                c.received += 1
                _, node, seq, ts, received_at, payload = record
                if not store.ingest(TelemetryIn(node, seq, ts, received_at, payload)):
                    c.shed += 1
            elif code == "m":
                c.received += 1
                _, node, received_at, payload, retained = record
                msg = decode(payload)
                if isinstance(msg, Status):
                    store.ingest(StatusIn(msg, received_at, retained))
                elif isinstance(msg, LifecycleEvent | TelemetryGap | Report):
                    store.ingest(EventIn(msg, received_at))
                    if isinstance(msg, Report) and msg.state != "progress" \
                            and self._on_report is not None:
                        self._on_report()
                elif isinstance(msg, RenewRequest):
                    store.ingest(EventIn(msg, received_at))
                    if self._on_renew is not None and not retained:  # a request is live
                        self._on_renew(msg)
            elif code == "x":
                c.received += 1
                _, node, field_name, reason = record
                self._malformed(node, field_name, reason)
            elif record[1]:
                c.connects += 1
                self.connected.set()
                self.connected_since = time.time()
            else:
                self.connected.clear()
                self.connected_since = None

    def _malformed(self, node: str, field_name: str, reason: str) -> None:
        c = self.counters
        c.malformed += 1
        log.warning("dropped malformed message from %s: %s: %s", node or "a foreign topic",
                    field_name, reason)
        if node:
            self._store.ingest(MalformedIn(node))

    async def run(self, stop: asyncio.Event) -> None:
        ctx = multiprocessing.get_context("spawn")
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            receiving, sending = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_receiver_main,
                               args=(self._settings, sending, os.getpid()),
                               name="virt8ra-ingest", daemon=True)
            proc.start()
            sending.close()
            ended = asyncio.Event()

            def readable(conn: Connection = receiving, done: asyncio.Event = ended) -> None:
                try:
                    self._records(conn.recv_bytes())
                except (EOFError, OSError):
                    done.set()

            loop.add_reader(receiving.fileno(), readable)
            loop.add_reader(proc.sentinel, ended.set)
            try:
                stopper = asyncio.ensure_future(stop.wait())
                ender = asyncio.ensure_future(ended.wait())
                await asyncio.wait({stopper, ender}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                ender.cancel()
            finally:
                loop.remove_reader(proc.sentinel)
                if proc.is_alive():
                    proc.terminate()  # SIGTERM: it says goodbye to the broker and flushes
                    await asyncio.to_thread(proc.join, 10)
                    if proc.is_alive():
                        proc.kill()
                        await asyncio.to_thread(proc.join)
                with contextlib.suppress(EOFError, OSError):
                    while receiving.poll():  # what it sent before it went
                        self._records(receiving.recv_bytes())
                loop.remove_reader(receiving.fileno())
                receiving.close()
                self.connected.clear()
            if not stop.is_set():
                delay = RESTART.delay(self.restarts)
                self.restarts += 1
                log.error("the ingest process exited (%s); restarting in %.1f s", proc.exitcode,
                          delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)


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
