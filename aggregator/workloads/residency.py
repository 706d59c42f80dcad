"""Where each VM and its disks lived: an append-only, hash-chained record per VM.

Every row is an event (``arrived`` at a node, ``left`` it) with the node's provider, country and
site as its certificate gave them at that time. Each row's hash covers its own fields and the
previous row's hash, so changing, removing or reordering a row breaks the chain from there on;
the VM keeps the chain's last hash and length, so removing rows from the end shows too.
:func:`verify` recomputes it end to end on every read and says where it breaks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aggregator.store.tx import Tx

GENESIS = "0" * 64


def _digest(vm_id: str, seq: int, event: str, node: str, provider: str, country: str,
            site: str, ts: float, prev: str) -> str:
    body = json.dumps([vm_id, seq, event, node, provider, country, site, repr(ts), prev],
                      separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def append(conn: Tx, vm_id: str, event: str, node_id: str, ts: float) -> None:
    node = conn.execute("SELECT provider, country, site FROM nodes WHERE id = ?",
                        (node_id,)).fetchone()
    provider, country, site = node if node is not None else ("", "", "")
    last = conn.execute("SELECT seq, hash FROM residency WHERE vm_id = ? ORDER BY seq DESC"
                        " LIMIT 1", (vm_id,)).fetchone()
    seq, prev = (last[0] + 1, last[1]) if last is not None else (1, GENESIS)
    digest = _digest(vm_id, seq, event, node_id, provider, country, site, ts, prev)
    conn.execute(
        "INSERT INTO residency (vm_id, seq, event, node_id, provider, country, site, ts,"
        " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (vm_id, seq, event, node_id, provider, country, site, ts, prev, digest),
    )
    conn.execute("UPDATE vms SET residency_head = ?, residency_length = ? WHERE id = ?",
                 (digest, seq, vm_id))


def staying(conn: Tx, vm_id: str, node_id: str) -> bool:
    """Whether the record has the VM at ``node_id`` now: arrived there, and not left since."""
    row = conn.execute("SELECT event FROM residency WHERE vm_id = ? AND node_id = ? ORDER BY"
                       " seq DESC LIMIT 1", (vm_id, node_id)).fetchone()
    return row is not None and row[0] == "arrived"


def verify(conn: Tx, vm_id: str) -> dict[str, Any]:
    """``{"entries": [...], "chain_valid": bool, "broken_at": seq | None, "events": n}``.
    Entries are stays: node, provider, country, site, ``from`` and ``until`` (None: still
    there)."""
    rows = conn.execute(
        "SELECT seq, event, node_id, provider, country, site, ts, prev_hash, hash FROM"
        " residency WHERE vm_id = ? ORDER BY seq", (vm_id,),
    ).fetchall()
    prev, broken = GENESIS, None
    for expected_seq, row in enumerate(rows, start=1):
        seq, event, node, provider, country, site, ts, prev_hash, digest = row
        if broken is None and (
            seq != expected_seq or prev_hash != prev
            or digest != _digest(vm_id, seq, event, node, provider, country, site, ts, prev)
        ):
            broken = seq
        prev = digest
    anchor = conn.execute("SELECT residency_head, residency_length FROM vms WHERE id = ?",
                          (vm_id,)).fetchone()
    if broken is None and anchor is not None and (anchor[1], anchor[0]) != (
            len(rows), prev if rows else ""):
        broken = len(rows) + 1  # rows were removed from the end (or the whole chain)
    entries: list[dict[str, Any]] = []
    for _seq, event, node, provider, country, site, ts, _p, _h in rows:
        if event == "arrived":
            entries.append({"node": node, "provider": provider, "country": country,
                            "site": site, "from": ts, "until": None})
        else:
            for entry in reversed(entries):
                if entry["node"] == node and entry["until"] is None:
                    entry["until"] = ts
                    break
    return {"entries": entries, "chain_valid": broken is None, "broken_at": broken,
            "events": len(rows)}


def verify_all(conn: Tx) -> list[dict[str, Any]]:
    """Every VM's chain, also of VMs whose chain was removed whole; for
    ``virt8ra audit verify``."""
    out = []
    for (vm_id,) in conn.execute(
            "SELECT vm_id FROM residency UNION SELECT id FROM vms WHERE residency_length > 0"
            " ORDER BY 1").fetchall():
        result = verify(conn, vm_id)
        out.append({"vm": vm_id, "chain_valid": result["chain_valid"],
                    "broken_at": result["broken_at"], "events": result["events"]})
    return out
