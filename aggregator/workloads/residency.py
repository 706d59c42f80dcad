"""Where each VM and its disks lived: an append-only, hash-chained record per VM.

Every row is an event (``arrived`` at a node, ``left`` it) with the node's provider, country and
site as its certificate gave them at that time. Each row's hash covers its own fields and the
previous row's hash, so changing, removing or reordering a row breaks the chain from there on;
the VM keeps the chain's last hash and length, so removing rows from the end shows too.
:func:`verify` recomputes it end to end on every read and says where it breaks. The rows are
read and written through :mod:`aggregator.store.residency`; this module hashes and checks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aggregator.store import residency as repo
from aggregator.store.tx import Tx

GENESIS = "0" * 64


def _digest(vm_id: str, seq: int, event: str, node: str, provider: str, country: str,
            site: str, ts: float, prev: str) -> str:
    body = json.dumps([vm_id, seq, event, node, provider, country, site, repr(ts), prev],
                      separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def append(conn: Tx, vm_id: str, event: str, node_id: str, ts: float) -> None:
    where = repo.node_location(conn, node_id) or repo.Location("", "", "")
    last = repo.last_entry(conn, vm_id)
    seq, prev = (last.seq + 1, last.hash) if last is not None else (1, GENESIS)
    digest = _digest(vm_id, seq, event, node_id, where.provider, where.country, where.site, ts,
                     prev)
    repo.append_entry(conn, vm_id, repo.Entry(seq, event, node_id, where.provider,
                                              where.country, where.site, ts, prev, digest))


def staying(conn: Tx, vm_id: str, node_id: str) -> bool:
    """Whether the record has the VM at ``node_id`` now: arrived there, and not left since."""
    return repo.last_event_at(conn, vm_id, node_id) == "arrived"


def verify(conn: Tx, vm_id: str) -> dict[str, Any]:
    """``{"entries": [...], "chain_valid": bool, "broken_at": seq | None, "events": n}``.
    Entries are stays: node, provider, country, site, ``from`` and ``until`` (None: still
    there)."""
    rows = repo.entries(conn, vm_id)
    prev, broken = GENESIS, None
    for expected_seq, e in enumerate(rows, start=1):
        if broken is None and (
            e.seq != expected_seq or e.prev_hash != prev
            or e.hash != _digest(vm_id, e.seq, e.event, e.node_id, e.provider, e.country,
                                 e.site, e.ts, prev)
        ):
            broken = e.seq
        prev = e.hash
    anchor = repo.anchor(conn, vm_id)
    if broken is None and anchor is not None and (anchor.length, anchor.head) != (
            len(rows), prev if rows else ""):
        broken = len(rows) + 1  # rows were removed from the end (or the whole chain)
    entries: list[dict[str, Any]] = []
    for e in rows:
        if e.event == "arrived":
            entries.append({"node": e.node_id, "provider": e.provider, "country": e.country,
                            "site": e.site, "from": e.ts, "until": None})
        else:
            for entry in reversed(entries):
                if entry["node"] == e.node_id and entry["until"] is None:
                    entry["until"] = e.ts
                    break
    return {"entries": entries, "chain_valid": broken is None, "broken_at": broken,
            "events": len(rows)}


def verify_all(conn: Tx) -> list[dict[str, Any]]:
    """Every VM's chain, also of VMs whose chain was removed whole; for
    ``virt8ra audit verify``."""
    out = []
    for vm_id in repo.chained_vms(conn):
        result = verify(conn, vm_id)
        out.append({"vm": vm_id, "chain_valid": result["chain_valid"],
                    "broken_at": result["broken_at"], "events": result["events"]})
    return out
