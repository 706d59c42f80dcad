"""The trust side of the fleet database: enrollment tokens, nodes' identities and certificates,
API tokens, the audit trail. Reads and writes only; :mod:`aggregator.trust` decides."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aggregator.store.tx import Tx

# --- enrollment tokens ----------------------------------------------------------------------

_TOKEN_COLUMNS = ("id", "site", "country", "provider", "profile", "node_id", "created_at",
                  "created_by", "expires_at", "used_at", "used_by", "withdrawn_at")


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    id: int
    site: str
    country: str
    provider: str
    profile: str
    node_id: str | None  # bound to this node: it re-enrolls it
    created_at: float
    created_by: str | None
    expires_at: float
    used_at: float | None
    used_by: str | None
    withdrawn_at: float | None

    def plain(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _TOKEN_COLUMNS}


def insert_enrollment_token(tx: Tx, token_hash: str, site: str, country: str, provider: str,
                            profile: str, now: float, expires_at: float, node_id: str | None,
                            actor: str) -> int:
    cur = tx.execute(
        "INSERT INTO enrollment_tokens (token_hash, site, country, provider, profile,"
        " created_at, expires_at, node_id, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (token_hash, site, country, provider, profile, now, expires_at, node_id, actor))
    return int(cur.lastrowid or 0)


def enrollment_tokens(tx: Tx) -> list[EnrollmentToken]:
    return [EnrollmentToken(*row) for row in tx.execute(
        f"SELECT {', '.join(_TOKEN_COLUMNS)} FROM enrollment_tokens ORDER BY id")]


def enrollment_token(tx: Tx, token_id: int) -> EnrollmentToken | None:
    row = tx.execute(f"SELECT {', '.join(_TOKEN_COLUMNS)} FROM enrollment_tokens WHERE id = ?",
                     (token_id,)).fetchone()
    return None if row is None else EnrollmentToken(*row)


def enrollment_token_by_hash(tx: Tx, token_hash: str) -> EnrollmentToken | None:
    row = tx.execute(f"SELECT {', '.join(_TOKEN_COLUMNS)} FROM enrollment_tokens"
                     " WHERE token_hash = ?", (token_hash,)).fetchone()
    return None if row is None else EnrollmentToken(*row)


def withdraw_enrollment_token(tx: Tx, token_id: int, now: float) -> None:
    tx.execute("UPDATE enrollment_tokens SET withdrawn_at = ? WHERE id = ?", (now, token_id))


def use_enrollment_token(tx: Tx, token_id: int, node_id: str, now: float) -> None:
    tx.execute("UPDATE enrollment_tokens SET used_at = ?, used_by = ? WHERE id = ?",
               (now, node_id, token_id))


# --- nodes' identities and certificates -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    site: str
    country: str
    provider: str
    profile: str
    enrolled_at: float | None
    revoked_at: float | None
    cordoned: bool


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    serial: str  # hex
    pem: str
    not_after: float


def node_identity(tx: Tx, node_id: str) -> NodeIdentity | None:
    row = tx.execute("SELECT site, country, provider, profile, enrolled_at, revoked_at,"
                     " cordoned FROM nodes WHERE id = ?", (node_id,)).fetchone()
    if row is None:
        return None
    site, country, provider, profile, enrolled_at, revoked_at, cordoned = row
    return NodeIdentity(site, country, provider, profile, enrolled_at, revoked_at,
                        bool(cordoned))


def save_enrolled_node(tx: Tx, node_id: str, site: str, country: str, provider: str,
                       profile: str, now: float, inventory: dict[str, Any],
                       facts: dict[str, Any] | None) -> None:
    """The node as its enrollment made it (again: an earlier inventory is kept)."""
    tx.execute(
        "INSERT INTO nodes (id, site, country, provider, profile, enrolled_at, inventory)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET site = excluded.site,"
        " country = excluded.country, provider = excluded.provider, profile = excluded.profile,"
        " enrolled_at = excluded.enrolled_at, inventory = coalesce(nodes.inventory,"
        " excluded.inventory)",
        (node_id, site, country, provider, profile, now, json.dumps(inventory)))
    if facts is not None:
        tx.execute("UPDATE nodes SET facts = ? WHERE id = ?", (json.dumps(facts), node_id))


def set_alt_names(tx: Tx, node_id: str, names: list[str]) -> None:
    tx.execute("UPDATE nodes SET alt_names = ? WHERE id = ?", (" ".join(names), node_id))


def alt_names_of_others(tx: Tx, node_id: str) -> set[str]:
    taken: set[str] = set()
    for (names,) in tx.execute("SELECT alt_names FROM nodes WHERE id != ? AND alt_names != ''",
                               (node_id,)).fetchall():
        taken.update(names.split())
    return taken


def insert_certificate(tx: Tx, serial: str, node_id: str, now: float, not_after: float,
                       kind: str, key_id: str, pem: str) -> None:
    tx.execute(
        "INSERT INTO certificates (serial, node_id, issued_at, not_after, kind, key_id, pem)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)", (serial, node_id, now, not_after, kind, key_id, pem))


def live_certificate_for_key(tx: Tx, node_id: str, key_id: str,
                             now: float) -> StoredCertificate | None:
    """The newest unrevoked, unexpired certificate issued to the node for this key."""
    row = tx.execute(
        "SELECT serial, pem, not_after FROM certificates WHERE node_id = ? AND key_id = ?"
        " AND revoked_at IS NULL AND not_after > ? AND pem != '' ORDER BY issued_at DESC",
        (node_id, key_id, now)).fetchone()
    return None if row is None else StoredCertificate(*row)


def unrevoked_serials(tx: Tx, node_id: str) -> list[str]:
    return [r[0] for r in tx.execute(
        "SELECT serial FROM certificates WHERE node_id = ? AND revoked_at IS NULL",
        (node_id,)).fetchall()]


def revoke_certificates(tx: Tx, node_id: str, now: float) -> None:
    tx.execute("UPDATE certificates SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
               (now, node_id))


def mark_node_revoked(tx: Tx, node_id: str, now: float, reason: str) -> None:
    tx.execute("UPDATE nodes SET revoked_at = ?, revoked_reason = ? WHERE id = ?",
               (now, reason, node_id))


def revoked_unexpired_serials(tx: Tx, now: float) -> list[str]:
    return [r[0] for r in tx.execute(
        "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ?",
        (now,))]


def set_cordoned(tx: Tx, node_id: str, cordoned: bool) -> None:
    tx.execute("UPDATE nodes SET cordoned = ? WHERE id = ?", (int(cordoned), node_id))


# --- API tokens -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: int
    name: str
    role: str
    created_at: float
    revoked_at: float | None


def insert_api_token(tx: Tx, name: str, role: str, token_hash: str, now: float) -> int:
    cur = tx.execute("INSERT INTO api_tokens (name, role, token_hash, created_at)"
                     " VALUES (?, ?, ?, ?)", (name, role, token_hash, now))
    return int(cur.lastrowid or 0)


def api_tokens(tx: Tx) -> list[ApiToken]:
    return [ApiToken(*row) for row in tx.execute(
        "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY id")]


def api_token(tx: Tx, token_id: int) -> ApiToken | None:
    row = tx.execute("SELECT id, name, role, created_at, revoked_at FROM api_tokens"
                     " WHERE id = ?", (token_id,)).fetchone()
    return None if row is None else ApiToken(*row)


def active_api_token(tx: Tx, token_hash: str) -> ApiToken | None:
    row = tx.execute("SELECT id, name, role, created_at, revoked_at FROM api_tokens"
                     " WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,)).fetchone()
    return None if row is None else ApiToken(*row)


def other_active_admins(tx: Tx, token_id: int) -> int:
    (n,) = tx.execute("SELECT count(*) FROM api_tokens WHERE role = 'admin' AND revoked_at IS"
                      " NULL AND id != ?", (token_id,)).fetchone()
    return int(n)


def revoke_api_token(tx: Tx, token_id: int, now: float) -> None:
    tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (now, token_id))


# --- the audit trail ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    ts: float
    actor: str
    action: str
    subject: str
    outcome: str
    detail: dict[str, Any]


def append_audit(tx: Tx, now: float, actor: str, action: str, subject: str, outcome: str,
                 detail: dict[str, Any]) -> None:
    tx.execute(
        "INSERT INTO audit (ts, actor, action, subject, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (now, actor, action, subject, outcome, json.dumps(detail, sort_keys=True)))


def audit_events(tx: Tx, since: float | None, action: str, subject: str,
                 limit: int) -> list[AuditEvent]:
    """Newest first; ``action`` matches itself or as a dotted prefix (``node`` matches
    ``node.revoke``)."""
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
    return [AuditEvent(i, ts, actor, act, subj, out, json.loads(detail))
            for i, ts, actor, act, subj, out, detail in tx.execute(sql, args)]
