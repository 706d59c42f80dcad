"""The agent's outbox: every outgoing telemetry and event message waits here until the broker
has acknowledged it (QoS 1 PUBACK), so nothing is lost while the uplink is down.

A bounded SQLite file. Messages get their per-node, per-channel sequence number here, in the
same transaction that stores them, so numbering survives restarts. When a channel holds more
than ``max_messages``, its oldest messages go and :meth:`Spool.append` reports the dropped
sequence range so the caller can tell the aggregator. The only module of the agent that
imports sqlite3; its calls run on one worker thread of its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_channel ON outbox (channel, id);
CREATE TABLE IF NOT EXISTS sequence (
    channel TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    id: int
    channel: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """Messages ``first_seq..last_seq`` of ``channel`` were dropped to keep the bound."""

    channel: str
    first_seq: int
    last_seq: int


class Spool:
    def __init__(self, path: Path, max_messages: int) -> None:
        self._path = path
        self._max = max_messages
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> None:
        def op() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA cache_size=-256")  # KiB: a small outbox needs little cache
            db.executescript(_SCHEMA)
            self._db = db

        await self._run(op)

    async def close(self) -> None:
        def op() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(op)
        self._executor.shutdown(wait=True)

    async def append(self, channel: str, make_payload: Callable[[int], bytes]) -> Dropped | None:
        """Number and store one message; ``make_payload(seq)`` builds it with its number."""

        def op() -> Dropped | None:
            db = self._conn()
            with _transaction(db):
                row = db.execute(
                    "SELECT next_seq FROM sequence WHERE channel = ?", (channel,)
                ).fetchone()
                seq = row[0] if row else 1
                db.execute(
                    "INSERT INTO outbox (channel, seq, payload) VALUES (?, ?, ?)",
                    (channel, seq, make_payload(seq)),
                )
                db.execute(
                    "INSERT INTO sequence (channel, next_seq) VALUES (?, ?) "
                    "ON CONFLICT (channel) DO UPDATE SET next_seq = excluded.next_seq",
                    (channel, seq + 1),
                )
                return self._enforce_bound(db, channel)

        return await self._run(op)

    def _enforce_bound(self, db: sqlite3.Connection, channel: str) -> Dropped | None:
        (count,) = db.execute(
            "SELECT count(*) FROM outbox WHERE channel = ?", (channel,)
        ).fetchone()
        excess = count - self._max
        if excess <= 0:
            return None
        first, last, last_id = db.execute(
            "SELECT min(seq), max(seq), max(id) FROM (SELECT seq, id FROM outbox "
            "WHERE channel = ? ORDER BY id LIMIT ?)",
            (channel, excess),
        ).fetchone()
        db.execute("DELETE FROM outbox WHERE channel = ? AND id <= ?", (channel, last_id))
        return Dropped(channel, first, last)

    async def pending(self, limit: int) -> list[Pending]:
        """The oldest ``limit`` messages, in the order they were appended."""

        def op() -> list[Pending]:
            rows = self._conn().execute(
                "SELECT id, channel, seq, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
            )
            return [Pending(*row) for row in rows]

        return await self._run(op)

    async def remove(self, ids: list[int]) -> None:
        """Forget messages the broker has acknowledged."""

        def op() -> None:
            db = self._conn()
            with _transaction(db):
                db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

        await self._run(op)

    async def count(self) -> int:
        def op() -> int:
            (n,) = self._conn().execute("SELECT count(*) FROM outbox").fetchone()
            return int(n)

        return await self._run(op)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("spool is not open")
        return self._db


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
