"""The writer thread's half of ingest: a batch of received messages (telemetry, status,
events, malformed-message counts) stored in one transaction, with each node's sequence numbers
kept and every gap recorded (:mod:`aggregator.store.sequences` decides what is a gap)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from aggregator.store import sequences
from aggregator.store.tx import Tx
from contract.wire import (
    LifecycleEvent,
    RenewRequest,
    Report,
    Status,
    TelemetryGap,
    to_plain,
)

log = logging.getLogger("virt8ra.aggregator.store")
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
class IngestFigures:
    """Counters for /metrics: written by the writer thread once a batch is committed, except
    ``shed`` (by the thread that queues)."""

    stored_samples: int = 0
    stored_events: int = 0
    duplicates: int = 0
    gaps_detected: int = 0
    batches: int = 0
    shed: int = 0


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


class BatchWriter:
    """Owned by the store's writer thread (``shed`` and the figures are the exceptions, see
    :class:`IngestFigures`)."""

    def __init__(self, handlers: EventHandlers) -> None:
        self._handlers = handlers
        self.figures = IngestFigures()
        self._pending = _Figures()  # figures of the batch being written, not yet committed
        # Highest sequence number per (node, channel).
        self._last: dict[tuple[str, str], int] = {}
        # Values of _last before the batch being written (None: absent), to undo on failure.
        self._undo: dict[tuple[str, str], int | None] = {}
        self._shed_nodes: set[str] = set()
        self._shed_lock = threading.Lock()

    def resume(self, conn: sqlite3.Connection) -> None:
        """Carry each node's numbering on from the database."""
        for node_id, t_last, e_last in conn.execute(
            "SELECT id, telemetry_last_seq, events_last_seq FROM nodes"
        ).fetchall():
            self._last[(node_id, "telemetry")] = t_last
            self._last[(node_id, "events")] = e_last

    def shed(self, node: str) -> None:
        """A telemetry message of ``node`` was dropped before it was queued (any thread)."""
        with self._shed_lock:
            self.figures.shed += 1
            self._shed_nodes.add(node)

    def apply(self, conn: sqlite3.Connection, items: list[Ingested]) -> None:
        """Store one batch in one transaction; a batch that fails is lost as a whole and shows
        as gaps (the sequence state is rolled back with it)."""
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
        f = self.figures
        f.stored_samples += p.samples
        f.duplicates += p.duplicates
        f.stored_events += p.events
        f.gaps_detected += p.gaps
        f.batches += 1

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
