"""The node's reports about orders: ``accepted``, ``succeeded`` or ``failed``, and a running
migration's ``progress`` (at most every PROGRESS_EVERY_S). They go through the events spool
(the ``report`` callable the daemon hands over), so they survive uplink loss."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from agent.host.hypervisor import MigrationProgress
from contract.wire import Report, encode, to_plain

PROGRESS_EVERY_S: Final = 1.0  # a running migration reports its figures this often


class Reports:
    def __init__(self, node: str,
                 report: Callable[[Callable[[int], bytes]], Awaitable[None]]) -> None:
        """``report`` takes a function that makes the message for a sequence number."""
        self._node = node
        self._report = report
        self._progress_at: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def send(self, order_id: str, state: str, result: dict[str, Any],
                   error: str) -> None:
        node = self._node
        plain = {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}

        def make(seq: int) -> bytes:
            return encode(Report(node=node, seq=seq, ts=time.time(), order_id=order_id,
                                 state=state, result=plain, error=error[:2000]))

        await self._report(make)

    def progress(self, order_id: str, figures: MigrationProgress) -> None:
        """A running migration's figures, sent without waiting (called from its progress
        callback), unless the last went less than PROGRESS_EVERY_S ago."""
        now = time.monotonic()
        if now - self._progress_at.get(order_id, 0.0) < PROGRESS_EVERY_S:
            return
        self._progress_at[order_id] = now
        plain = {k: v for k, v in to_plain(figures).items() if v is not None}
        task = asyncio.ensure_future(self.send(order_id, "progress", plain, ""))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
