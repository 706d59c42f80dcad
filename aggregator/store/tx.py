"""What a function run by the store is given: one transaction on the fleet database.

:meth:`Store.write <aggregator.store.writer.Store.write>` runs ``fn(tx)`` on the writer thread
inside a transaction; :meth:`Store.read <aggregator.store.writer.Store.read>` runs ``fn(tx)``
on a reader thread over a read-only connection. Domain code receives a :class:`Tx`, never a
``sqlite3.Connection``: the database's own types stay inside ``aggregator.store``.

The repositories of this package (``trust``, ``orders``, ``moves``, ``vms``, ``placement``,
``residency``, ``images``, ``fleet``) are the only code that runs SQL through it: each is a set
of functions ``(tx, ...)`` that take and return plain data, and decide nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

Row = Any  # a row as sqlite3 gives it: indexable by position and, for reads, by column name


class Tx:
    def __init__(self, conn: sqlite3.Connection, *, writable: bool) -> None:
        self._conn = conn
        self.writable = writable

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, rows)

    def close(self) -> None:
        """Close the connection of a Tx from :func:`~aggregator.store.writer.open_tx`."""
        self._conn.close()

    @contextlib.contextmanager
    def savepoint(self, on_error: Any = None) -> Iterator[None]:
        """Work that is undone alone if it fails (the rest of the transaction stays).
        ``on_error(exc)`` is told instead of the exception propagating, when given."""
        self._conn.execute("SAVEPOINT one_part")
        try:
            yield
        except Exception as exc:
            self._conn.execute("ROLLBACK TO one_part")
            if on_error is None:
                raise
            on_error(exc)
        finally:
            self._conn.execute("RELEASE one_part")
