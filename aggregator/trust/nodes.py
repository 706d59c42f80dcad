"""The trust lifecycle after enrollment: renewal, revocation, the CRL, API tokens and the audit
trail.

The functions that change the database run on the store's writer thread (through
``Store.write``, which hands them a :class:`~aggregator.store.tx.Tx`), so each check-and-change
is one transaction with its audit event: an action without its audit row cannot happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregator.store import trust as repo
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
    node = repo.node_identity(db, node_id)
    if node is None or node.enrolled_at is None:
        raise EnrollmentError("not_enrolled", f"node {node_id!r} is not enrolled", 403)
    if node.revoked_at is not None:
        raise EnrollmentError("node_revoked", f"node {node_id!r} is revoked", 403)
    try:
        key = csr_key_id(csr_pem)
    except PkiError as exc:
        raise EnrollmentError("invalid_csr", str(exc)) from None
    earlier = repo.live_certificate_for_key(db, node_id, key, now)
    if earlier is not None:
        return Renewed(node_id, earlier.pem, earlier.not_after, earlier.serial, reused=True)
    attrs = NodeAttributes(node_id, node.country, node.provider, node.site, node.profile)
    try:
        issued = ca.sign_node_csr(csr_pem, attrs, cert_days, taken_names(db, node_id))
    except PkiError as exc:
        raise EnrollmentError("invalid_csr", str(exc)) from None
    serial = format(issued.serial, "x")
    repo.set_alt_names(db, node_id, list(issued.names))
    repo.insert_certificate(db, serial, node_id, now, issued.not_after, "renew", key,
                            issued.certificate_pem)
    audit(db, now, f"node:{node_id}", "certificate.renew", node_id, serial=serial,
          not_after=issued.not_after)
    return Renewed(node_id, issued.certificate_pem, issued.not_after, serial, reused=False)


# --- revocation -----------------------------------------------------------------------------


def revoke_node(db: Tx, node_id: str, now: float, actor: str,
                reason: str) -> list[str]:
    """Mark the node revoked and every certificate it holds; returns the serials revoked.
    Revoking a revoked node again changes nothing and is not an error."""
    node = repo.node_identity(db, node_id)
    if node is None:
        raise EnrollmentError("not_found", f"no node {node_id!r}", 404)
    serials = repo.unrevoked_serials(db, node_id)
    repo.revoke_certificates(db, node_id, now)
    if node.revoked_at is None:
        repo.mark_node_revoked(db, node_id, now, reason)
    audit(db, now, actor, "node.revoke", node_id, serials=serials, reason=reason,
          already_revoked=node.revoked_at is not None)
    return serials


def crl_serials(conn: Tx, now: float) -> list[int]:
    """Serials the CRL must list: revoked and not yet expired (an expired certificate is
    refused by the broker anyway, so the list stays short)."""
    return [int(serial, 16) for serial in repo.revoked_unexpired_serials(conn, now)]


# --- API tokens -----------------------------------------------------------------------------


def list_api_tokens(conn: Tx) -> list[dict[str, Any]]:
    return [
        {"id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at,
         "revoked_at": t.revoked_at, "state": "revoked" if t.revoked_at is not None else "active"}
        for t in repo.api_tokens(conn)
    ]


def revoke_api_token(db: Tx, token_id: int, now: float,
                     actor: str) -> dict[str, Any]:
    token = repo.api_token(db, token_id)
    if token is None:
        raise EnrollmentError("not_found", f"no API token {token_id}", 404)
    role, revoked_at, name = token.role, token.revoked_at, token.name
    if revoked_at is None and role == "admin" and not repo.other_active_admins(db, token_id):
        raise EnrollmentError(
            "last_admin", "this is the last admin token: create another admin token first", 409)
    if revoked_at is None:
        repo.revoke_api_token(db, token_id, now)
        audit(db, now, actor, "api_token.revoke", f"api-token:{token_id}", role=role, name=name)
    return {"id": token_id, "name": name, "role": role,
            "revoked_at": revoked_at if revoked_at is not None else now, "state": "revoked"}


def set_cordon(db: Tx, node_id: str, cordoned: bool, now: float, actor: str,
               reason: str) -> dict[str, Any]:
    """Cordon (no new VMs are placed on the node; its VMs stay) or uncordon a node."""
    node = repo.node_identity(db, node_id)
    if node is None:
        raise EnrollmentError("not_found", f"no node {node_id!r}", 404)
    if node.cordoned != cordoned:
        repo.set_cordoned(db, node_id, cordoned)
        audit(db, now, actor, "node.cordon" if cordoned else "node.uncordon", node_id,
              reason=reason)
    return {"node": node_id, "cordoned": cordoned}
