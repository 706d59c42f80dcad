"""The fleet database: the only module of the aggregator that imports sqlite3 / sqlite-utils.

One writer thread owns the write connection and applies everything in batches: telemetry,
status and events from ingest, and the API's writes (as functions run on that thread). Reads
run on a small pool of threads, each with its own read-only connection (WAL lets them read
while the writer writes). Keep the store behind this module so moving to a replicated SQL
database stays a module, not a rewrite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import sqlite_utils

from aggregator.store import schema as migrations
from aggregator.store import sequences
from aggregator.store.tx import Tx
from contract.wire import (
    LifecycleEvent,
    ProtocolError,
    RenewRequest,
    Report,
    Status,
    Telemetry,
    TelemetryGap,
    decode,
    to_plain,
)

log = logging.getLogger("virt8ra.aggregator.store")
T = TypeVar("T")
NOT_RECEIVED = "not received"


# What ingest hands to the writer: named tuples, the cheapest records to make per message.
class TelemetryIn(NamedTuple):
    node: str
    seq: int
    ts: float
    received_at: float
    payload: bytes


class StatusIn(NamedTuple):
    status: Status
    received_at: float
    retained: bool


class EventIn(NamedTuple):
    event: LifecycleEvent | TelemetryGap | Report | RenewRequest
    received_at: float


class MalformedIn(NamedTuple):
    node: str


Ingested = TelemetryIn | StatusIn | EventIn | MalformedIn


@dataclass
class _Figures:
    samples: int = 0
    duplicates: int = 0
    events: int = 0
    gaps: int = 0


def _ignore(*args: Any) -> None:
    return None


@dataclass(frozen=True)
class EventHandlers:
    """What the fleet's state does when a node's messages arrive: called on the writer thread
    inside the transaction that stores them (the service passes
    :mod:`aggregator.workloads.orders`' functions; the store decides nothing itself)."""

    node_online: Callable[[Tx, str, float], None] = _ignore  # (tx, node, when)
    lifecycle: Callable[[Tx, str, str, str, float], None] = _ignore  # (tx, node, vm, state, when)
    report: Callable[[Tx, Report, float], None] = _ignore  # (tx, report, when)


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
        self._handlers = handlers or EventHandlers()
        self._batch = batch_size
        self._queue_max = queue_max
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: Future[None] = Future()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read")
        self._local = threading.local()
        # Ingest figures (read by /metrics); written only by the writer thread, except `shed`.
        self.stored_samples = 0
        self.stored_events = 0
        self.duplicates = 0
        self.gaps_detected = 0
        self.shed = 0
        self.batches = 0
        self._pending = _Figures()  # figures of the batch being written, not yet committed
        # Writer-thread state: highest sequence number per (node, channel).
        self._last: dict[tuple[str, str], int] = {}
        # Values of _last before the batch being written (None: absent), to undo on failure.
        self._undo: dict[tuple[str, str], int | None] = {}
        self._shed_nodes: set[str] = set()
        self._shed_lock = threading.Lock()

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
            with self._shed_lock:
                self.shed += 1
                self._shed_nodes.add(item.node)
            return False
        self._q.put(item)
        return True

    @property
    def backlog(self) -> int:
        return self._q.qsize()

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
            for node_id, t_last, e_last in db.execute(
                "SELECT id, telemetry_last_seq, events_last_seq FROM nodes"
            ).fetchall():
                self._last[(node_id, "telemetry")] = t_last
                self._last[(node_id, "events")] = e_last
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
                    self._apply(conn, ingest)
                    ingest = []
                    self._call(db, item)
                else:
                    ingest.append(item)
            self._apply(conn, ingest)
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

    def _apply(self, conn: sqlite3.Connection, items: list[Ingested]) -> None:
        if not items:
            return
        self._undo.clear()
        try:
            with conn:
                self._apply_batch(conn, items)
        except Exception:  # disk full, or our bug: the writer must live on either way
            log.exception("storing a batch of %d messages failed; they will show as gaps",
                          len(items))
            # Roll the sequence state back with the transaction: what was lost is then missing
            # from the sequence, hence a gap when the next numbers arrive.
            for key, old in self._undo.items():
                if old is None:
                    self._last.pop(key, None)
                else:
                    self._last[key] = old
            self._pending = _Figures()
            return
        # Counted only once committed: /metrics never runs ahead of what a reader can see.
        p, self._pending = self._pending, _Figures()
        self.stored_samples += p.samples
        self.duplicates += p.duplicates
        self.stored_events += p.events
        self.gaps_detected += p.gaps
        self.batches += 1

    def _apply_batch(self, conn: sqlite3.Connection, items: list[Ingested]) -> None:
        telemetry: list[tuple[str, int, float, float, bytes]] = []
        seen: dict[str, float] = {}
        touched: set[str] = set()

        def store_telemetry() -> None:
            if not telemetry:
                return
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO telemetry (node_id, seq, ts, received_at, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                telemetry,
            )
            stored = conn.total_changes - before
            self._pending.samples += stored
            self._pending.duplicates += len(telemetry) - stored
            telemetry.clear()

        for item in items:
            if isinstance(item, TelemetryIn):
                if self._sequence(conn, item.node, "telemetry", item.seq, item.received_at):
                    telemetry.append(
                        (item.node, item.seq, item.ts, item.received_at, item.payload)
                    )
                seen[item.node] = item.received_at
                touched.add(item.node)
            elif isinstance(item, StatusIn):
                self._status(conn, item)
            elif isinstance(item, EventIn):
                store_telemetry()  # a gap report must see every sample received before it
                self._event(conn, item)
                seen[item.event.node] = item.received_at
                touched.add(item.event.node)
            else:
                self._ensure_node(conn, item.node)
                conn.execute(
                    "UPDATE nodes SET malformed_messages = malformed_messages + 1 WHERE id = ?",
                    (item.node,),
                )
        store_telemetry()
        if touched:
            conn.executemany(
                "UPDATE nodes SET last_seen = max(coalesce(last_seen, 0), ?), "
                "telemetry_last_seq = ?, events_last_seq = ? WHERE id = ?",
                [
                    (
                        seen[n],
                        self._last.get((n, "telemetry"), 0),
                        self._last.get((n, "events"), 0),
                        n,
                    )
                    for n in touched
                ],
            )

    def _ensure_node(self, conn: sqlite3.Connection, node: str) -> None:
        if (node, "telemetry") not in self._last:
            conn.execute("INSERT OR IGNORE INTO nodes (id) VALUES (?)", (node,))
            self._set_last((node, "telemetry"), 0)
            self._set_last((node, "events"), 0)

    def _set_last(self, key: tuple[str, str], value: int) -> None:
        """Change the sequence state, remembering the value before this batch."""
        self._undo.setdefault(key, self._last.get(key))
        self._last[key] = value

    def _sequence(
        self, conn: sqlite3.Connection, node: str, channel: str, seq: int, now: float
    ) -> bool:
        """Track ``seq``; record a gap it reveals or close one it fills. False for a duplicate."""
        self._ensure_node(conn, node)
        step = sequences.next_seq(self._last[(node, channel)], seq)
        self._set_last((node, channel), step.last)
        if step.gap is not None:
            with self._shed_lock:
                shed_here = node in self._shed_nodes
                self._shed_nodes.discard(node)
            reason = "shed by the aggregator under load" if shed_here else NOT_RECEIVED
            self._record_gap(conn, node, channel, step.gap[0], step.gap[1], now, reason)
            self._pending.gaps += 1
            return True
        if step.late:
            row = conn.execute(
                "SELECT id, first_seq, last_seq, reason FROM gaps WHERE node_id = ? AND channel = ?"
                " AND first_seq <= ? AND last_seq >= ?",
                (node, channel, seq, seq),
            ).fetchone()
            if row is None:
                return True  # a replay: the insert below ignores what is already stored
            gap_id, first, last, reason = row
            conn.execute("DELETE FROM gaps WHERE id = ?", (gap_id,))
            conn.executemany(
                "INSERT INTO gaps (node_id, channel, first_seq, last_seq, detected_at, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(node, channel, a, b, now, reason)
                 for a, b in sequences.split_gap(first, last, seq)],
            )
        return True

    def _record_gap(self, conn: sqlite3.Connection, node: str, channel: str, first: int,
                    last: int, now: float, reason: str, explained: bool = False) -> None:
        """Record missing numbers once. A gap the node explains replaces what was only
        detected as not received, and leaves out what did arrive (a message the broker got
        but never acknowledged can be dropped from the node's spool later); otherwise numbers
        already recorded are left alone."""
        rows = conn.execute(
            "SELECT id, first_seq, last_seq, reason FROM gaps WHERE node_id = ? AND channel = ?"
            " AND last_seq >= ? AND first_seq <= ?",
            (node, channel, first, last),
        ).fetchall()
        keep: list[tuple[int, int]] = []
        if explained:
            table = "telemetry" if channel == "telemetry" else "events"
            keep.extend(sequences.runs(s for (s,) in conn.execute(
                f"SELECT seq FROM {table} WHERE node_id = ? AND seq BETWEEN ? AND ?"
                " ORDER BY seq",
                (node, first, last),
            )))
        for gap_id, a, b, why in rows:
            if explained and why == NOT_RECEIVED:
                conn.execute("DELETE FROM gaps WHERE id = ?", (gap_id,))
                conn.executemany(
                    "INSERT INTO gaps (node_id, channel, first_seq, last_seq, detected_at,"
                    " reason) VALUES (?, ?, ?, ?, ?, ?)",
                    [(node, channel, x, y, now, why)
                     for x, y in sequences.subtract(a, b, [(first, last)])],
                )
            else:
                keep.append((a, b))
        conn.executemany(
            "INSERT INTO gaps (node_id, channel, first_seq, last_seq, detected_at, reason) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(node, channel, x, y, now, reason) for x, y in sequences.subtract(first, last, keep)],
        )

    def _status(self, conn: sqlite3.Connection, item: StatusIn) -> None:
        st = item.status
        self._ensure_node(conn, st.node)
        inventory = json.dumps(to_plain(st.inventory)) if st.inventory is not None else None
        conn.execute(
            "UPDATE nodes SET reported_status = ?, status_changed_at = ?, "
            "interval_s = CASE WHEN ? > 0 THEN ? ELSE interval_s END, "
            "inventory = coalesce(?, inventory), lease_s = ?, "
            "last_seen = CASE WHEN ? THEN last_seen ELSE ? END WHERE id = ?",
            (
                st.state, item.received_at, st.interval_s, st.interval_s, inventory,
                st.lease_s, item.retained, item.received_at, st.node,
            ),
        )
        if st.state == "online" and not item.retained:
            self._handlers.node_online(Tx(conn, writable=True), st.node, item.received_at)

    def _event(self, conn: sqlite3.Connection, item: EventIn) -> None:
        ev = item.event
        if not self._sequence(conn, ev.node, "events", ev.seq, item.received_at):
            return
        if isinstance(ev, LifecycleEvent):
            vm_uuid, vm_name = ev.vm_uuid, ev.vm_name
            summary = f"{ev.vm_name}: {ev.event} ({ev.detail}), now {ev.state}"
            self._handlers.lifecycle(Tx(conn, writable=True), ev.node, ev.vm_uuid, ev.state,
                                   item.received_at)
        elif isinstance(ev, TelemetryGap):
            vm_uuid = vm_name = ""
            summary = f"{ev.channel} {ev.first_seq}..{ev.last_seq} dropped: {ev.reason}"
            self._record_gap(conn, ev.node, ev.channel, ev.first_seq, ev.last_seq,
                             item.received_at, ev.reason, explained=True)
        elif isinstance(ev, RenewRequest):
            vm_uuid = vm_name = ""
            summary = "asks for a new certificate (the current one expires " + time.strftime(
                "%Y-%m-%d %H:%M:%S UTC)", time.gmtime(ev.not_after))
        else:
            vm_uuid = vm_name = ""
            summary = f"order {ev.order_id}: {ev.state}" + (f" ({ev.error})" if ev.error else "")
            self._handlers.report(Tx(conn, writable=True), ev, item.received_at)
        cur = conn.execute(
            "INSERT OR IGNORE INTO events (node_id, seq, ts, received_at, type, vm_uuid, vm_name,"
            " summary, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ev.node, ev.seq, ev.ts, item.received_at, ev.TYPE, vm_uuid, vm_name, summary,
                json.dumps(to_plain(ev)),
            ),
        )
        self._pending.events += cur.rowcount

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
