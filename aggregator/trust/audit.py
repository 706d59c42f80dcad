"""The audit trail: who did what to whom, when, and whether it was allowed.

Rows are only ever appended. A change and its audit row are written in one transaction by the
function that makes the change; a refusal is recorded by its caller in a write of its own
(the refused change itself was rolled back).
"""

from __future__ import annotations

import json
from typing import Any

from aggregator.store.tx import Tx


def record(db: Tx, now: float, actor: str,
           action: str, subject: str = "", outcome: str = "ok", **detail: Any) -> None:
    """Append one audit event. ``actor`` is who acted: ``token:<id>:<name>`` for an API token,
    ``node:<id>`` for a node, ``cli`` for the aggregator's own command line."""
    db.execute(
        "INSERT INTO audit (ts, actor, action, subject, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
        [now, actor, action, subject, outcome, json.dumps(detail, sort_keys=True)],
    )


def events(conn: Tx, since: float | None, action: str, subject: str,
               limit: int) -> list[dict[str, Any]]:
    """The most recent audit events first, filtered by time, action (prefix) and subject."""
    sql = "SELECT id, ts, actor, action, subject, outcome, detail FROM audit WHERE 1"
    args: list[Any] = []
    if since is not None:
        sql += " AND ts >= ?"
        args.append(since)
    if action:
        sql += " AND (action = ? OR action LIKE ? ESCAPE '\\')"
        escaped = action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args += [action, escaped + ".%"]
    if subject:
        sql += " AND subject = ?"
        args.append(subject)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    return [
        {"id": i, "ts": ts, "actor": actor, "action": act, "subject": subj, "outcome": out,
         "detail": json.loads(detail)}
        for i, ts, actor, act, subj, out, detail in conn.execute(sql, args)
    ]
