"""The audit trail: who did what to whom, when, and whether it was allowed.

Rows are only ever appended. A change and its audit row are written in one transaction by the
function that makes the change; a refusal is recorded by its caller in a write of its own
(the refused change itself was rolled back).
"""

from __future__ import annotations

from typing import Any

from aggregator.store import trust as repo
from aggregator.store.tx import Tx


def record(db: Tx, now: float, actor: str,
           action: str, subject: str = "", outcome: str = "ok", **detail: Any) -> None:
    """Append one audit event. ``actor`` is who acted: ``token:<id>:<name>`` for an API token,
    ``node:<id>`` for a node, ``cli`` for the aggregator's own command line."""
    repo.append_audit(db, now, actor, action, subject, outcome, detail)


def events(conn: Tx, since: float | None, action: str, subject: str,
           limit: int) -> list[dict[str, Any]]:
    """The most recent audit events first, filtered by time, action (prefix) and subject."""
    return [{"id": e.id, "ts": e.ts, "actor": e.actor, "action": e.action,
             "subject": e.subject, "outcome": e.outcome, "detail": e.detail}
            for e in repo.audit_events(conn, since, action, subject, limit)]
