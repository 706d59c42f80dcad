"""The order journal: every order the node accepted, before it says so, with its outcome; and
the last signed desired state of each VM.

A SQLite file of its own in the state directory, used from one worker thread. Accepting an
order records it and the node's highest order number in one transaction, so a replayed number
is refused even after a restart, and an order killed half-way is found and finished at the
next start. The desired state is what the node restores after a host reboot with the uplink
down: the VMs that should run, and only those. Its states: ``running``, ``stopped``,
``incoming`` (a VM this node prepared to receive: never started from here), ``leaving`` (being
migrated away: never started from here again by the node itself), ``fenced`` (paused by the
node itself, cut off past its lease: it may run elsewhere now, so only an order resumes it).
The time of the last contact with the aggregator is kept too (a node that restarts after a
long time cut off must not start anything on its own), and of the last fencing (an order
issued before it does not resume a fenced VM).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    action TEXT NOT NULL,
    envelope BLOB NOT NULL,      -- the signed order as received
    state TEXT NOT NULL,         -- accepted, succeeded, failed
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS desired (
    vm_uuid TEXT PRIMARY KEY,
    spec TEXT NOT NULL,          -- the VmSpec of the order that created it, as plain JSON
    state TEXT NOT NULL,         -- running, stopped, incoming, leaving, fenced
    order_seq INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    order_id: str
    seq: int
    action: str
    envelope: bytes
    state: str
    result: dict[str, Any]
    error: str


@dataclass(frozen=True, slots=True)
class Desired:
    vm_uuid: str
    spec: dict[str, Any]
    state: str


class Journal:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "journal used before open()"
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        def op() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an accepted order survives power loss
            db.executescript(_SCHEMA)
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._executor, op)

    async def close(self) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self._run(op)
        self._executor.shutdown(wait=True)

    async def get(self, order_id: str) -> Entry | None:
        def op(db: sqlite3.Connection) -> Entry | None:
            row = db.execute(
                "SELECT order_id, seq, action, envelope, state, result, error FROM orders"
                " WHERE order_id = ?", (order_id,),
            ).fetchone()
            return None if row is None else _entry(row)

        return await self._run(op)

    async def last_seq(self) -> int:
        def op(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            return int(row[0]) if row else 0

        return await self._run(op)

    async def accept(self, order_id: str, seq: int, action: str, envelope: bytes,
                     now: float) -> bool:
        """Record the order and raise the node's order number to ``seq``; False (nothing
        written) when ``seq`` is not above the highest accepted so far: a replay."""

        def op(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
                if row is not None and seq <= row[0]:
                    db.execute("ROLLBACK")
                    return False
                db.execute(
                    "INSERT INTO orders (order_id, seq, action, envelope, state, received_at)"
                    " VALUES (?, ?, ?, ?, 'accepted', ?)", (order_id, seq, action, envelope, now),
                )
                db.execute("INSERT INTO meta (key, value) VALUES ('last_seq', ?) ON CONFLICT"
                           " (key) DO UPDATE SET value = excluded.value", (seq,))
                db.execute("COMMIT")
                return True
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(op)

    async def finish(self, order_id: str, state: str, result: dict[str, Any], error: str,
                     now: float, desired: Desired | None = None, forget: str = "") -> None:
        """Record the outcome, and in the same transaction the desired state it leads to
        (``desired``), or forget a deleted VM's (``forget``: its uuid)."""

        def op(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.execute(
                    "UPDATE orders SET state = ?, result = ?, error = ?, finished_at = ?"
                    " WHERE order_id = ?", (state, json.dumps(result), error, now, order_id),
                )
                if desired is not None:
                    seq = db.execute("SELECT seq FROM orders WHERE order_id = ?",
                                     (order_id,)).fetchone()[0]
                    db.execute(
                        "INSERT INTO desired (vm_uuid, spec, state, order_seq) VALUES"
                        " (?, ?, ?, ?) ON CONFLICT (vm_uuid) DO UPDATE SET state ="
                        " excluded.state, order_seq = excluded.order_seq,"
                        " spec = CASE WHEN excluded.spec = '{}' THEN desired.spec"
                        " ELSE excluded.spec END",
                        (desired.vm_uuid, json.dumps(desired.spec), desired.state, seq),
                    )
                if forget:
                    db.execute("DELETE FROM desired WHERE vm_uuid = ?", (forget,))

        await self._run(op)

    async def unfinished(self) -> list[Entry]:
        """Orders accepted but not finished (the agent stopped in the middle), oldest first."""

        def op(db: sqlite3.Connection) -> list[Entry]:
            return [_entry(r) for r in db.execute(
                "SELECT order_id, seq, action, envelope, state, result, error FROM orders"
                " WHERE state = 'accepted' ORDER BY seq"
            )]

        return await self._run(op)

    async def set_state(self, vm_uuid: str, old: str, new: str) -> bool:
        """Move one VM's desired state from ``old`` to ``new``; False if it was not ``old``."""

        def op(db: sqlite3.Connection) -> bool:
            return db.execute("UPDATE desired SET state = ? WHERE vm_uuid = ? AND state = ?",
                              (new, vm_uuid, old)).rowcount == 1

        return await self._run(op)

    async def forget(self, vm_uuid: str) -> None:
        """The VM's desired state is gone: it is no longer this node's (or never became)."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM desired WHERE vm_uuid = ?", (vm_uuid,))

        await self._run(op)

    async def last_contact(self) -> float | None:
        """When the node last knew it was in touch with the aggregator (unix seconds)."""

        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT value FROM meta WHERE key = 'last_contact'").fetchone()
            return float(row[0]) if row else None

        return await self._run(op)

    async def fenced_at(self) -> float | None:
        """When the node last fenced its VMs (paused them, cut off past its lease)."""
        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT value FROM meta WHERE key = 'fenced_at'").fetchone()
            return float(row[0]) if row else None

        return await self._run(op)

    async def touch_fenced(self, now: float) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO meta (key, value) VALUES ('fenced_at', ?) ON CONFLICT"
                       " (key) DO UPDATE SET value = excluded.value", (int(now) + 1,))

        await self._run(op)

    async def touch_contact(self, now: float) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO meta (key, value) VALUES ('last_contact', ?) ON CONFLICT"
                       " (key) DO UPDATE SET value = excluded.value", (int(now),))

        await self._run(op)

    async def desired_of(self, vm_uuid: str) -> Desired | None:
        def op(db: sqlite3.Connection) -> Desired | None:
            row = db.execute("SELECT vm_uuid, spec, state FROM desired WHERE vm_uuid = ?",
                             (vm_uuid,)).fetchone()
            return None if row is None else Desired(row[0], json.loads(row[1]), row[2])

        return await self._run(op)

    async def desired(self) -> list[Desired]:
        def op(db: sqlite3.Connection) -> list[Desired]:
            return [Desired(u, json.loads(s), st) for u, s, st in db.execute(
                "SELECT vm_uuid, spec, state FROM desired ORDER BY order_seq"
            )]

        return await self._run(op)


def _entry(row: tuple[Any, ...]) -> Entry:
    order_id, seq, action, envelope, state, result, error = row
    return Entry(order_id, seq, action, bytes(envelope), state, json.loads(result), error)
