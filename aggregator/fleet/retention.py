"""Retention: every ``sweep_interval_s``, raw telemetry past ``raw_hours`` is rolled up into
buckets and rollups past ``rollup_days`` are dropped (``Store.sweep``, a chunk at a time so
ingest batches interleave with a long sweep)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aggregator.config import RetentionConfig
from aggregator.store.tx import Tx
from aggregator.store.writer import Store

log = logging.getLogger("virt8ra.aggregator.retention")

_CHUNK = 5000  # samples rolled up per write


class Retention:
    """:meth:`run` until ``stop``: one sweep at start, then one per interval."""

    def __init__(self, store: Store, config: RetentionConfig) -> None:
        self._store = store
        self._config = config

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            total = await self.sweep(time.time(), stop)
            if total:
                log.info("retention: rolled up %d samples", total)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._config.sweep_interval_s)

    async def sweep(self, now: float, stop: asyncio.Event) -> int:
        """Sweep chunk by chunk until done (or ``stop``); the samples rolled up. A sweep that
        fails is logged and left to the next interval: it must not take the service down."""
        r, total = self._config, 0

        def chunk(db: Tx) -> tuple[int, int]:
            return Store.sweep(db, now, r.raw_hours, r.rollup_bucket_s, r.rollup_days, _CHUNK)

        while not stop.is_set():
            try:
                rolled, _ = await self._store.write(chunk)
            except Exception:  # a sweep that fails must not take the service down
                log.exception("retention sweep failed; retrying at the next interval")
                break
            total += rolled
            if rolled < _CHUNK:
                break
        return total
