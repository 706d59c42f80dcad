"""The fleet database: the only module of the aggregator that imports sqlite3 / sqlite-utils.

One writer thread owns the write connection and applies everything in batches: telemetry,
status and events from ingest, and the API's writes (as functions run on that thread). Reads
run on a small pool of threads, each with its own read-only connection (WAL lets them read
while the writer writes). Keep the store behind this module so moving to a replicated SQL
database stays a module, not a rewrite.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from aggregator.store import schema as migrations
from aggregator.store import sequences
from aggregator.store.ingest import (
    BatchWriter,
    EventHandlers,
    Ingested,
    IngestFigures,
    TelemetryIn,
)
from aggregator.store.tx import Tx
from contract.wire import (
    ProtocolError,
    Telemetry,
    decode,
    to_plain,
)

log = logging.getLogger("virt8ra.aggregator.store")
T = TypeVar("T")
NOT_RECEIVED = "not received"


def open_tx(path: Path) -> Tx:
    """The database at ``path`` (made and migrated if new) as one autocommitting :class:`Tx`,
    outside any :class:`Store`: for tools, benchmarks and tests that work on a file directly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(path)
    db.execute("PRAGMA journal_mode=WAL")
    migrations.apply(db)
    db.conn.isolation_level = None
    return Tx(db.conn, writable=True)


class _Call:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Tx], Any]) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()


_STOP = object()


class Store:
    """Open with :meth:`start`; :meth:`stop` flushes and closes."""

    def __init__(self, path: Path, *, batch_size: int = 2000, queue_max: int = 200_000,
                 handlers: EventHandlers | None = None) -> None:
        self.path = path
        self._batches = BatchWriter(handlers or EventHandlers())
        self._batch = batch_size
        self._queue_max = queue_max
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: Future[None] = Future()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read")
        self._local = threading.local()
        # Ingest figures (read by /metrics): what the writer has committed, and what was shed.
        self.figures: IngestFigures = self._batches.figures

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()
        self._ready.result()

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(_STOP)
            self._thread.join()
            self._thread = None
        self._readers.shutdown(wait=True)

    # --- the asyncio side -------------------------------------------------------------------

    def ingest(self, item: Ingested) -> bool:
        """Queue one received message for storage; False if shed because the writer is behind."""
        if self._q.qsize() >= self._queue_max and isinstance(item, TelemetryIn):
            self._batches.shed(item.node)
            return False
        self._q.put(item)
        return True

    @property
    def backlog(self) -> int:
        return self._q.qsize()

    # The figures by their old names (the service's /metrics snapshot reads these).
    @property
    def stored_samples(self) -> int:
        return self.figures.stored_samples

    @property
    def stored_events(self) -> int:
        return self.figures.stored_events

    @property
    def duplicates(self) -> int:
        return self.figures.duplicates

    @property
    def gaps_detected(self) -> int:
        return self.figures.gaps_detected

    @property
    def batches(self) -> int:
        return self.figures.batches

    @property
    def shed(self) -> int:
        return self.figures.shed

    async def write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` on the writer thread, inside a transaction, after queued ingest."""
        call = _Call(fn)
        self._q.put(call)
        result: T = await asyncio.wrap_future(call.future)
        return result

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` on a reader thread with its own read-only connection."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read, fn)

    async def flush(self) -> None:
        """Wait until everything queued so far is stored."""
        await self.write(lambda tx: None)

    def _read(self, fn: Callable[[Tx], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=5000")
            self._local.conn = conn
        return fn(Tx(conn, writable=False))

    # --- the writer thread ------------------------------------------------------------------

    def _writer(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite_utils.Database(self.path)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            applied = migrations.apply(db)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            self._batches.resume(db.conn)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        conn = db.conn
        stopping = False
        while not stopping:
            items = [self._q.get()]
            while len(items) < self._batch:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            ingest: list[Ingested] = []
            for item in items:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Call):
                    self._batches.apply(conn, ingest)
                    ingest = []
                    self._call(db, item)
                else:
                    ingest.append(item)
            self._batches.apply(conn, ingest)
        db.conn.close()

    def _call(self, db: sqlite_utils.Database, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            with db.conn:
                result = call.fn(Tx(db.conn, writable=True))
        except BaseException as exc:
            call.future.set_exception(exc)
        else:
            call.future.set_result(result)

    # --- retention (runs on the writer thread through write()) ------------------------------

    @staticmethod
    def sweep(db: Tx, now: float, raw_hours: float, bucket_s: int,
              rollup_days: float, chunk: int = 5000) -> tuple[int, int]:
        """Roll up to ``chunk`` raw samples older than ``raw_hours`` into buckets and delete
        them; drop roll-ups older than ``rollup_days``. Returns (rolled up, roll-ups dropped).
        One chunk per call, so ingest batches interleave with a long sweep."""
        conn = db
        rows = conn.execute(
            "SELECT node_id, seq, payload FROM telemetry WHERE received_at < ? LIMIT ?",
            (now - raw_hours * 3600, chunk),
        ).fetchall()
        samples = []
        for node_id, _seq, payload in rows:
            try:
                msg = decode(payload)
            except ProtocolError:  # stored before a contract change: drop it, keep sweeping
                log.warning("dropping undecodable telemetry of %s during retention", node_id)
                continue
            if isinstance(msg, Telemetry):
                samples.append((node_id, msg.ts, to_plain(msg.host)))
        for r in sequences.rollup(samples, bucket_s):
            conn.execute(
                "INSERT INTO telemetry_rollup (node_id, bucket_start, metric, count, min, max,"
                " sum) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id, metric, bucket_start)"
                " DO UPDATE SET count = count + excluded.count, min = min(min, excluded.min),"
                " max = max(max, excluded.max), sum = sum + excluded.sum",
                (r.node_id, r.bucket_start, r.metric, r.count, r.min, r.max, r.sum),
            )
        conn.executemany(
            "DELETE FROM telemetry WHERE node_id = ? AND seq = ?",
            [(node_id, seq) for node_id, seq, _ in rows],
        )
        dropped = conn.execute(
            "DELETE FROM telemetry_rollup WHERE bucket_start < ?", (now - rollup_days * 86400,)
        ).rowcount
        return len(rows), dropped
