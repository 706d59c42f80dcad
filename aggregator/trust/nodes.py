"""The trust lifecycle after enrollment: renewal, revocation, the CRL, API tokens and the audit
trail.

The functions that change the database take a sqlite-utils ``Database`` and run on the store's
writer thread (through ``Store.write``), so each check-and-change is one transaction with its
audit event: an action without its audit row cannot happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.trust.enrollment import EnrollmentError, taken_names
from aggregator.trust.pki import CertificateAuthority, NodeAttributes, PkiError, csr_key_id

# --- renewal --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Renewed:
    node_id: str
    certificate_pem: str
    not_after: float
    serial: str
    reused: bool  # the same key was signed before: the stored certificate is sent again


def renew(db: Tx, ca: CertificateAuthority, node_id: str, csr_pem: str,
          now: float, cert_days: float) -> Renewed:
    """Sign a new certificate for an enrolled, unrevoked node, with the attributes its
    enrollment token gave it. A request repeated for the same key (the node retried, or the
    request was delivered twice) gets the certificate already issued for it."""
    row = db.execute(
        "SELECT site, country, provider, profile, enrolled_at, revoked_at FROM nodes"
        " WHERE id = ?", [node_id],
    ).fetchone()
    if row is None or row[4] is None:
        raise EnrollmentError("not_enrolled", f"node {node_id!r} is not enrolled", 403)
    site, country, provider, profile, _, revoked_at = row
    if revoked_at is not None:
        raise EnrollmentError("node_revoked", f"node {node_id!r} is revoked", 403)
    try:
        key = csr_key_id(csr_pem)
    except PkiError as exc:
        raise EnrollmentError("invalid_csr", str(exc)) from None
    earlier = db.execute(
        "SELECT serial, pem, not_after FROM certificates WHERE node_id = ? AND key_id = ?"
        " AND revoked_at IS NULL AND not_after > ? AND pem != '' ORDER BY issued_at DESC",
        [node_id, key, now],
    ).fetchone()
    if earlier is not None:
        return Renewed(node_id, earlier[1], earlier[2], earlier[0], reused=True)
    attrs = NodeAttributes(node_id, country, provider, site, profile)
    try:
        issued = ca.sign_node_csr(csr_pem, attrs, cert_days, taken_names(db, node_id))
    except PkiError as exc:
        raise EnrollmentError("invalid_csr", str(exc)) from None
    serial = format(issued.serial, "x")
    db.execute("UPDATE nodes SET alt_names = ? WHERE id = ?", [" ".join(issued.names), node_id])
    db.execute(
        "INSERT INTO certificates (serial, node_id, issued_at, not_after, kind, key_id, pem)"
        " VALUES (?, ?, ?, ?, 'renew', ?, ?)",
        [serial, node_id, now, issued.not_after, key, issued.certificate_pem],
    )
    audit(db, now, f"node:{node_id}", "certificate.renew", node_id, serial=serial,
          not_after=issued.not_after)
    return Renewed(node_id, issued.certificate_pem, issued.not_after, serial, reused=False)


# --- revocation -----------------------------------------------------------------------------


def revoke_node(db: Tx, node_id: str, now: float, actor: str,
                reason: str) -> list[str]:
    """Mark the node revoked and every certificate it holds; returns the serials revoked.
    Revoking a revoked node again changes nothing and is not an error."""
    row = db.execute("SELECT revoked_at FROM nodes WHERE id = ?", [node_id]).fetchone()
    if row is None:
        raise EnrollmentError("not_found", f"no node {node_id!r}", 404)
    serials = [
        r[0] for r in db.execute(
            "SELECT serial FROM certificates WHERE node_id = ? AND revoked_at IS NULL",
            [node_id],
        ).fetchall()
    ]
    db.execute("UPDATE certificates SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
               [now, node_id])
    if row[0] is None:
        db.execute("UPDATE nodes SET revoked_at = ?, revoked_reason = ? WHERE id = ?",
                   [now, reason, node_id])
    audit(db, now, actor, "node.revoke", node_id, serials=serials, reason=reason,
          already_revoked=row[0] is not None)
    return serials


def crl_serials(conn: Tx, now: float) -> list[int]:
    """Serials the CRL must list: revoked and not yet expired (an expired certificate is
    refused by the broker anyway, so the list stays short)."""
    return [
        int(r[0], 16) for r in conn.execute(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ?",
            [now],
        )
    ]


# --- API tokens -----------------------------------------------------------------------------


def list_api_tokens(conn: Tx) -> list[dict[str, Any]]:
    return [
        {"id": i, "name": name, "role": role, "created_at": created, "revoked_at": revoked,
         "state": "revoked" if revoked is not None else "active"}
        for i, name, role, created, revoked in conn.execute(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY id"
        )
    ]


def revoke_api_token(db: Tx, token_id: int, now: float,
                     actor: str) -> dict[str, Any]:
    row = db.execute("SELECT role, revoked_at, name FROM api_tokens WHERE id = ?",
                     [token_id]).fetchone()
    if row is None:
        raise EnrollmentError("not_found", f"no API token {token_id}", 404)
    role, revoked_at, name = row
    if revoked_at is None and role == "admin":
        others = db.execute(
            "SELECT count(*) FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL"
            " AND id != ?", [token_id],
        ).fetchone()[0]
        if not others:
            raise EnrollmentError(
                "last_admin", "this is the last admin token: create another admin token first",
                409,
            )
    if revoked_at is None:
        db.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", [now, token_id])
        audit(db, now, actor, "api_token.revoke", f"api-token:{token_id}", role=role, name=name)
    return {"id": token_id, "name": name, "role": role,
            "revoked_at": revoked_at if revoked_at is not None else now, "state": "revoked"}


def set_cordon(db: Tx, node_id: str, cordoned: bool, now: float, actor: str,
               reason: str) -> dict[str, Any]:
    """Cordon (no new VMs are placed on the node; its VMs stay) or uncordon a node."""
    row = db.execute("SELECT cordoned FROM nodes WHERE id = ?", [node_id]).fetchone()
    if row is None:
        raise EnrollmentError("not_found", f"no node {node_id!r}", 404)
    if bool(row[0]) != cordoned:
        db.execute("UPDATE nodes SET cordoned = ? WHERE id = ?", [int(cordoned), node_id])
        audit(db, now, actor, "node.cordon" if cordoned else "node.uncordon", node_id,
              reason=reason)
    return {"node": node_id, "cordoned": cordoned}
