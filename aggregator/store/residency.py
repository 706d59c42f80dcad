"""VMs' residency records as stored: each VM's chain of events and the head and length the VM
keeps of it. Append and read only (the table is append-only);
:mod:`aggregator.workloads.residency` hashes, chains and verifies."""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.store.tx import Tx

_COLUMNS = "seq, event, node_id, provider, country, site, ts, prev_hash, hash"


@dataclass(frozen=True, slots=True)
class Location:
    """Where a node is, as its certificate gave it."""

    provider: str
    country: str
    site: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One event of a VM's chain: ``arrived`` at a node or ``left`` it."""

    seq: int
    event: str
    node_id: str
    provider: str
    country: str
    site: str
    ts: float
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class Anchor:
    """The chain's last hash and length as the VM keeps them ("" and 0: no chain)."""

    head: str
    length: int


def node_location(tx: Tx, node_id: str) -> Location | None:
    row = tx.execute("SELECT provider, country, site FROM nodes WHERE id = ?",
                     (node_id,)).fetchone()
    return None if row is None else Location(*row)


def last_entry(tx: Tx, vm_id: str) -> Entry | None:
    row = tx.execute(f"SELECT {_COLUMNS} FROM residency WHERE vm_id = ? ORDER BY seq DESC"
                     " LIMIT 1", (vm_id,)).fetchone()
    return None if row is None else Entry(*row)


def last_event_at(tx: Tx, vm_id: str, node_id: str) -> str | None:
    """The VM's latest event at ``node_id`` (``arrived``, ``left``), if any."""
    row = tx.execute("SELECT event FROM residency WHERE vm_id = ? AND node_id = ? ORDER BY"
                     " seq DESC LIMIT 1", (vm_id, node_id)).fetchone()
    return None if row is None else str(row[0])


def append_entry(tx: Tx, vm_id: str, entry: Entry) -> None:
    """Add ``entry`` to the VM's chain and make it the head the VM keeps."""
    tx.execute(
        f"INSERT INTO residency (vm_id, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (vm_id, entry.seq, entry.event, entry.node_id, entry.provider, entry.country,
         entry.site, entry.ts, entry.prev_hash, entry.hash),
    )
    tx.execute("UPDATE vms SET residency_head = ?, residency_length = ? WHERE id = ?",
               (entry.hash, entry.seq, vm_id))


def entries(tx: Tx, vm_id: str) -> list[Entry]:
    """The VM's chain, by sequence number."""
    return [Entry(*row) for row in tx.execute(
        f"SELECT {_COLUMNS} FROM residency WHERE vm_id = ? ORDER BY seq", (vm_id,))]


def anchor(tx: Tx, vm_id: str) -> Anchor | None:
    """What the VM keeps of its chain (None: no such VM)."""
    row = tx.execute("SELECT residency_head, residency_length FROM vms WHERE id = ?",
                     (vm_id,)).fetchone()
    return None if row is None else Anchor(row[0], row[1])


def chained_vms(tx: Tx) -> list[str]:
    """Every VM with a chain: rows in the record, or a length kept (its chain was removed
    whole), by id."""
    return [str(vm_id) for (vm_id,) in tx.execute(
        "SELECT vm_id FROM residency UNION SELECT id FROM vms WHERE residency_length > 0"
        " ORDER BY 1").fetchall()]
