"""The aggregator's control session on the broker: what it sends to nodes, and cutting a
revoked node off.

Ingest only reads; this module holds a second MQTT session, under its own identity
(``aggregator-control``: the broker forces every client id to its certificate's name, so two
sessions of one name would throw each other out). It publishes to nodes' orders topics.

Cutting a node off uses that same rule: after the CRL names the node's certificate, the
aggregator connects once with a one-minute certificate it issues itself for the node's name.
The broker hands the session over and drops the node's connection; the node's reconnection
then fails the CRL check. No broker restart, no plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from aggregator.trust.pki import CertificateAuthority
from contract.wire import topic
from plumbing.backoff import Backoff
from plumbing.tls import client_context, client_context_from_pem, no_delay

log = logging.getLogger("virt8ra.aggregator.control")

CONTROL_CN = "aggregator-control"
RECONNECT = Backoff(initial_s=0.5, max_s=30.0, floor_s=0.1)  # with full jitter


class ControlUnavailable(Exception):
    """The control session is not connected; the message says for how long it was waited for."""


@dataclass(frozen=True)
class ControlSettings:
    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    scratch_dir: Path  # private (0700): where one-off credentials live for a moment
    connect_timeout_s: float = 10.0


class Control:
    def __init__(self, settings: ControlSettings, ca: CertificateAuthority) -> None:
        self._s = settings
        self._ca = ca
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        s = self._s
        attempt = 0
        while not stop.is_set():
            tls = client_context(s.ca_file, s.cert_file, s.key_file)
            client = aiomqtt.Client(s.host, s.port, identifier=CONTROL_CN, tls_context=tls,
                                    timeout=s.connect_timeout_s, keepalive=30,
                                    clean_session=True)
            try:
                async with client:
                    attempt = 0
                    no_delay(client._client.socket())
                    self._client = client
                    self.connected.set()
                    log.info("control session up at %s:%d", s.host, s.port)
                    disconnected: asyncio.Future[Any] = client._disconnected  # its end
                    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
                    try:
                        await asyncio.wait({stopper, disconnected},
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stopper.cancel()
            except aiomqtt.MqttError as exc:
                log.warning("control session down: %s", exc)
            finally:
                self._client = None
                self.connected.clear()
            delay = RECONNECT.delay(attempt, random.random())
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def publish(self, node: str, payload: bytes, wait_s: float = 10.0) -> None:
        """Publish to ``node``'s orders topic (QoS 1); raises ControlUnavailable."""
        try:
            await asyncio.wait_for(self.connected.wait(), timeout=wait_s)
        except TimeoutError:
            raise ControlUnavailable(
                f"no control session to the broker for {wait_s:.0f} s"
            ) from None
        client = self._client
        if client is None:
            raise ControlUnavailable("the control session just went down")
        try:
            await client.publish(topic(node, "orders"), payload, qos=1)
        except aiomqtt.MqttError as exc:
            raise ControlUnavailable(f"publish failed: {exc}") from None

    async def cut_off(self, node: str) -> None:
        """Take over ``node``'s broker session, which drops the node's connection; raises
        ControlUnavailable when the broker cannot be reached."""
        try:
            await self._take_over(node)
        except (aiomqtt.MqttError, OSError) as exc:
            raise ControlUnavailable(f"cannot take over {node}'s session: {exc}") from None

    async def _take_over(self, node: str) -> None:
        s = self._s
        cred = await asyncio.to_thread(self._ca.issue_ephemeral, node, 60)
        tls = client_context_from_pem(s.ca_file, cred.certificate_pem, cred.key_pem,
                                      scratch_dir=s.scratch_dir)
        client = aiomqtt.Client(s.host, s.port, identifier=node, tls_context=tls,
                                timeout=s.connect_timeout_s, clean_session=True)
        async with client:  # connecting is the whole point: the node's session is ours now
            pass
        log.info("took over %s's broker session: the node is disconnected", node)
