"""Revocation as the running service carries it out: the CRL written from the database and
kept fresh, the broker told to re-read it, and a revoked node's live session taken away.

The database side (which certificates a revocation names, the audit trail) is
``trust/nodes.py``; this module does what follows it outside the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from aggregator.fleet.control import ControlUnavailable
from aggregator.store.writer import Store
from aggregator.trust import nodes
from aggregator.trust.pki import CertificateAuthority

log = logging.getLogger("virt8ra.aggregator.revocation")

# The broker handles SIGHUP on its next loop turn: wait that long before taking a session over,
# or the node could reconnect under the old CRL.
_RELOAD_SETTLE_S = 0.3


class CrlReader(Protocol):
    """The broker, which checks node certificates against the CRL."""

    @property
    def managed(self) -> bool:
        """True when we run it (and can make it re-read the CRL)."""
        ...

    def reload(self) -> bool:
        """Have it re-read the CRL; False when it could not be told."""
        ...


class Sessions(Protocol):
    """Nodes' live broker sessions (``fleet/control.py``)."""

    async def cut_off(self, node: str) -> None:
        """Drop ``node``'s session; raises ControlUnavailable."""
        ...


class Revocation:
    """Keeps the CRL (re-signed at half its validity: an expired CRL makes the broker refuse
    every node) and carries revocations out."""

    def __init__(self, store: Store, ca: CertificateAuthority, *, crl_file: Path,
                 crl_days: float, broker: CrlReader, sessions: Sessions) -> None:
        self._store = store
        self._ca = ca
        self._crl_file = crl_file
        self._crl_days = crl_days
        self._broker = broker
        self._sessions = sessions
        self._lock = asyncio.Lock()

    async def refresh_crl(self) -> bool:
        """Write the CRL from the database and have the broker re-read it (SIGHUP); True when
        the broker was told. One at a time, so a newer list is never overwritten by an older."""
        async with self._lock:
            serials = await self._store.read(lambda c: nodes.crl_serials(c, time.time()))
            await asyncio.to_thread(self._ca.write_crl, self._crl_file, serials,
                                    self._crl_days)
            if self._broker.reload():
                log.info("CRL renewed (%d revoked); the broker re-reads it", len(serials))
                return True
            if not self._broker.managed:
                log.warning("CRL renewed at %s: have your broker re-read it (SIGHUP)",
                            self._crl_file)
            return False

    async def keep_crl(self, stop: asyncio.Event) -> None:
        """Re-sign the CRL at half its validity until ``stop``."""
        period = self._crl_days * 86400 / 2
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period)
            if not stop.is_set():
                try:
                    await self.refresh_crl()
                except Exception:  # retried at the next turn; the old CRL stays valid meanwhile
                    log.exception("CRL renewal failed")

    async def revoke(self, node: str, actor: str, reason: str) -> dict[str, Any]:
        """Revoke ``node``: CRL, broker reload, then take its live session away."""
        now = time.time()
        serials = await self._store.write(
            lambda db: nodes.revoke_node(db, node, now, actor, reason)
        )
        dropped, reloaded = await self.cut_off(node)
        return {"node": node, "revoked_at": now, "serials": serials, "reason": reason,
                "broker_reloaded": reloaded, "session_dropped": dropped}

    async def cut_off(self, node: str) -> tuple[bool, bool]:
        """After revoking certificates of ``node``: renew the CRL, have the broker re-read it
        and take the node's live session over; ``(session dropped, broker reloaded)``. With a
        broker we do not manage, the session is left alone: it would only reconnect under
        the old CRL until that broker re-reads it."""
        reloaded = await self.refresh_crl()
        if not reloaded:
            log.error("%s: revoked, but the broker was not told; its session stays until the"
                      " broker re-reads %s", node, self._crl_file)
            return False, False
        await asyncio.sleep(_RELOAD_SETTLE_S)
        try:
            await self._sessions.cut_off(node)
        except ControlUnavailable as exc:
            log.error("revoked %s, but its live session stays until it reconnects: %s", node,
                      exc)
            return False, True
        return True, True

    async def superseded(self, node: str) -> None:
        """``node`` enrolled again and its earlier certificates were revoked: renew the CRL
        and take over the session of whoever still uses them."""
        await self.cut_off(node)
