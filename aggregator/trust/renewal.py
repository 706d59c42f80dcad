"""Certificate renewal as the running service carries it out: nodes' requests (which arrive
through ingest) queued, signed one at a time and the new certificate sent back over the control
session. What may be renewed, and the audit trail, is ``trust/nodes.py``'s."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from aggregator.fleet.control import ControlUnavailable
from aggregator.store.tx import Tx
from aggregator.store.writer import Store
from aggregator.trust import audit, nodes
from aggregator.trust.enrollment import EnrollmentError
from aggregator.trust.pki import CertificateAuthority
from contract.wire import Certificate, RenewRequest, encode

log = logging.getLogger("virt8ra.aggregator.renewal")

_WAITING_MAX = 10_000  # requests queued; past this, a node asks again later


class Sender(Protocol):
    """What reaches a node (``fleet/control.py``)."""

    async def publish(self, node: str, payload: bytes, wait_s: float = 10.0) -> None:
        """Send ``payload`` to ``node``; raises ControlUnavailable."""
        ...


class Renewals:
    """:meth:`request` takes a node's request; :meth:`run` answers them until ``stop``."""

    def __init__(self, store: Store, ca: CertificateAuthority, *, cert_days: float,
                 sender: Sender) -> None:
        self._store = store
        self._ca = ca
        self._cert_days = cert_days
        self._sender = sender
        self._waiting: asyncio.Queue[RenewRequest] = asyncio.Queue(maxsize=_WAITING_MAX)
        self.renewed = 0  # certificates newly signed and sent

    def request(self, request: RenewRequest) -> None:
        """Queue a node's request; dropped (the node asks again) when too many wait."""
        try:
            self._waiting.put_nowait(request)
        except asyncio.QueueFull:
            log.warning("renewal request from %s dropped: too many waiting; it will ask again",
                        request.node)

    async def run(self, stop: asyncio.Event) -> None:
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(self._waiting.get())
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                req = getter.result()
                try:
                    await self.renew(req)
                except Exception:  # one node's request must never stop the aggregator
                    log.exception("renewal for %s failed", req.node)
        finally:
            stopper.cancel()

    async def renew(self, req: RenewRequest) -> None:
        """Sign ``req`` (or refuse it, on the audit trail) and send the certificate back."""
        now, days = time.time(), self._cert_days

        def sign(db: Tx) -> nodes.Renewed:
            return nodes.renew(db, self._ca, req.node, req.csr, now, days)

        try:
            renewed = await self._store.write(sign)
        except EnrollmentError as exc:
            log.warning("refused to renew %s's certificate: %s", req.node, exc)
            code = exc.code
            await self._store.write(lambda db: audit.record(
                db, now, f"node:{req.node}", "certificate.renew", req.node, "refused",
                reason=code,
            ))
            return
        answer = encode(Certificate(node=req.node, ts=time.time(),
                                    certificate=renewed.certificate_pem,
                                    not_after=renewed.not_after))
        try:
            await self._sender.publish(req.node, answer)
        except ControlUnavailable as exc:
            log.warning("renewed %s's certificate but cannot send it (%s); the node will ask"
                        " again", req.node, exc)
            return
        if not renewed.reused:
            self.renewed += 1
        log.info("renewed %s's certificate (serial %s)", req.node, renewed.serial)
