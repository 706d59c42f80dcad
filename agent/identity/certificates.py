"""Keeping the node's certificate alive: renewal before expiry, over the MQTT session.

At two thirds of the time between installing a certificate and its expiry, the agent makes a
new key and sends a ``renew_request`` (with a CSR) through its events spool; the aggregator
answers with a ``certificate`` on the node's orders topic. The certificate is checked and
installed by ``agent.identity.certtool`` in a child process (the daemon never loads
cryptography); the
uplink's next connection uses it. An unanswered request is repeated with the same key.

A certificate that expires anyway (the node was offline past its life) cannot be renewed:
the node must be enrolled again with a token bound to it, and :class:`IdentityExpired` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.wire import Certificate, RenewRequest, encode

log = logging.getLogger("virt8ra.agent.identity")

RENEW_AT = 2 / 3  # of the time from installation to expiry
RETRY_MIN_S, RETRY_MAX_S = 2.0, 600.0
SLICE_S = 60.0  # the longest single sleep before the schedule is looked at again


class IdentityError(Exception):
    """The certificate tool failed; the message says why."""


class IdentityExpired(IdentityError):
    """The node's certificate expired: only a new enrollment brings the node back."""


@dataclass(frozen=True)
class CertStatus:
    not_after: float
    installed_at: float
    serial: str

    def renew_at(self) -> float:
        return self.installed_at + RENEW_AT * max(0.0, self.not_after - self.installed_at)


def expired_message(node: str, not_after: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
    return (
        f"this node's certificate expired at {when}: the node was cut off longer than its "
        f"certificate lives, so it cannot renew it. Ask the operator for a re-enrollment token "
        f"(virt8ra-aggregator token create --node-id {node} ...) and run "
        f"`virt8ra-agent enroll --force --node-id {node} ...` on this node"
    )


class Identity:
    def __init__(self, node: str, cert: Path, key: Path, ca: Path,
                 append_event: Callable[[Callable[[int], bytes]], Awaitable[None]],
                 on_installed: Callable[[], Awaitable[None]] | None = None) -> None:
        self._node = node
        self._on_installed = on_installed
        self._cert, self._key, self._ca = cert, key, ca
        self._append_event = append_event
        self._answers: asyncio.Queue[Certificate] = asyncio.Queue(maxsize=16)
        self.renewals = 0

    async def _tool(self, command: str, stdin: bytes = b"") -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.identity.certtool", command, "--cert", str(self._cert),
            "--key", str(self._key), "--node-id", self._node, "--ca", str(self._ca),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate(stdin)
        try:
            answer: dict[str, Any] = json.loads(out)
        except ValueError:
            raise IdentityError(f"certtool {command} failed (exit {proc.returncode})") from None
        if proc.returncode != 0 or "error" in answer:
            raise IdentityError(f"certtool {command}: {answer.get('error', 'failed')}")
        return answer

    async def status(self) -> CertStatus:
        s = await self._tool("status")
        return CertStatus(float(s["not_after"]), float(s["installed_at"]), str(s["serial"]))

    async def check(self) -> CertStatus:
        """The current certificate; raises IdentityExpired when it is past its life."""
        st = await self.status()
        if st.not_after <= time.time():
            raise IdentityExpired(expired_message(self._node, st.not_after))
        return st

    def on_certificate(self, msg: Certificate) -> None:
        """The uplink received a certificate for this node."""
        with contextlib.suppress(asyncio.QueueFull):
            self._answers.put_nowait(msg)

    async def run(self, stop: asyncio.Event) -> None:
        st = await self.check()
        log.info("certificate %s valid until %s; renewal due in %.0f s", st.serial,
                 time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st.not_after)),
                 max(0.0, st.renew_at() - time.time()))
        failures = 0
        while not stop.is_set():
            # In slices, recomputed from the wall clock each time: a clock that NTP corrects
            # after boot moves the renewal with it.
            if await _sleep(stop, min(SLICE_S, st.renew_at() - time.time())):
                return
            if time.time() < st.renew_at():
                continue
            try:
                st = await self._renew(stop, st)
                failures = 0
            except IdentityExpired:
                raise
            except IdentityError as exc:  # e.g. a full disk: try again, the clock is ticking
                failures += 1
                delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(failures, 10))
                log.error("certificate renewal failed (%s); retrying in %.0f s", exc, delay)
                if await _sleep(stop, delay):
                    return

    async def _renew(self, stop: asyncio.Event, st: CertStatus) -> CertStatus:
        """Ask until a certificate arrives and is installed; returns its status."""
        while not stop.is_set():
            if st.not_after <= time.time():
                raise IdentityExpired(expired_message(self._node, st.not_after))
            csr = str((await self._tool("csr"))["csr"])
            await self._append_event(_request(self._node, csr, st.not_after))
            log.info("asked the aggregator for a new certificate")
            wait = min(RETRY_MAX_S, max(RETRY_MIN_S, (st.not_after - time.time()) / 6))
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
                try:
                    answer = await asyncio.wait_for(self._answers.get(), timeout=left)
                except TimeoutError:
                    break
                try:
                    installed = await self._tool("install", answer.certificate.encode())
                except IdentityError as exc:
                    log.warning("refused a certificate: %s", exc)
                    continue
                self.renewals += 1
                new = CertStatus(float(installed["not_after"]), float(installed["installed_at"]),
                                 str(installed["serial"]))
                log.info("renewed: certificate %s valid until %s", new.serial,
                         time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(new.not_after)))
                if self._on_installed is not None:
                    await self._on_installed()
                return new
            if not stop.is_set():
                log.warning("no certificate came in %.0f s; asking again", wait)
        return st


def _request(node: str, csr: str, not_after: float) -> Callable[[int], bytes]:
    def make(seq: int) -> bytes:
        return encode(RenewRequest(node=node, seq=seq, ts=time.time(), csr=csr,
                                   not_after=not_after))

    return make


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop``; True when stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()
