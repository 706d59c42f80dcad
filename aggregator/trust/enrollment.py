"""Enrollment tokens and node enrollment: token → CSR → certificate signed by the fleet CA.

The functions that touch the database take a sqlite-utils ``Database`` and run on the store's
writer thread (through ``Store.write``), so checking and spending a token is one transaction.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from aggregator.errors import Refused
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.trust.pki import CertificateAuthority, NodeAttributes, PkiError, csr_key_id
from contract.profiles import HostFacts, Profile, profile_failures
from contract.wire import ProtocolError, validate_node_id

COUNTRY = re.compile(r"[A-Z]{2}")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


class EnrollmentError(Refused):
    """A request about enrollment or trust that cannot be granted."""


def hash_secret(secret: str) -> str:
    # surrogatepass: whatever arrives (a header's undecodable bytes) hashes; it just matches
    # no token.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenScope:
    site: str
    country: str
    provider: str
    profile: str

    def __post_init__(self) -> None:
        if not COUNTRY.fullmatch(self.country):
            raise EnrollmentError("invalid_country", "country must be an ISO 3166 alpha-2 code")
        for name in ("site", "provider", "profile"):
            if not LABEL.fullmatch(getattr(self, name)):
                raise EnrollmentError(
                    f"invalid_{name}", f"{name} must be 1-64 letters, digits, space . _ -"
                )


def create_token(
    db: Tx, scope: TokenScope, ttl_s: float, now: float, *,
    actor: str = "cli", node_id: str | None = None,
) -> dict[str, Any]:
    """A one-time token. ``node_id`` binds it to one node id: the only way to enroll a node
    that is already enrolled again (its certificate expired while it was offline)."""
    if node_id is not None:
        try:
            validate_node_id(node_id)
        except ProtocolError as exc:
            raise EnrollmentError("invalid_node_id", exc.reason) from None
    token = "v8e_" + secrets.token_urlsafe(24)
    expires_at = now + ttl_s
    token_id = db.execute(
        "INSERT INTO enrollment_tokens (token_hash, site, country, provider, profile,"
        " created_at, expires_at, node_id, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (hash_secret(token), scope.site, scope.country, scope.provider, scope.profile, now,
         expires_at, node_id, actor)).lastrowid
    audit(db, now, actor, "enrollment_token.create", f"enrollment-token:{token_id}",
           site=scope.site, country=scope.country, provider=scope.provider,
           profile=scope.profile, node_id=node_id, expires_at=expires_at)
    return {"id": token_id, "token": token, "expires_at": expires_at, "node_id": node_id}


def _token_state(row: dict[str, Any], now: float) -> str:
    if row["withdrawn_at"] is not None:
        return "withdrawn"
    if row["used_at"] is not None:
        return "used"
    return "expired" if row["expires_at"] < now else "active"


def list_tokens(conn: Any, now: float, state: str = "") -> list[dict[str, Any]]:
    """Every enrollment token (never the token itself: only its hash is stored)."""
    cur = conn.execute(
        "SELECT id, site, country, provider, profile, node_id, created_at, created_by,"
        " expires_at, used_at, used_by, withdrawn_at FROM enrollment_tokens ORDER BY id"
    )
    names = [d[0] for d in cur.description]
    rows = []
    for values in cur:
        row = dict(zip(names, values, strict=True))
        row["state"] = _token_state(row, now)
        if not state or row["state"] == state:
            rows.append(row)
    return rows


def withdraw_token(db: Tx, token_id: int, now: float,
                   actor: str) -> dict[str, Any]:
    """Withdraw an unused token; withdrawing a withdrawn one changes nothing."""
    cur = db.execute(
        "SELECT id, site, country, provider, profile, node_id, created_at, created_by,"
        " expires_at, used_at, used_by, withdrawn_at FROM enrollment_tokens WHERE id = ?",
        [token_id],
    )
    names = [d[0] for d in cur.description]
    values = cur.fetchone()
    if values is None:
        raise EnrollmentError("not_found", f"no enrollment token {token_id}", 404)
    row = dict(zip(names, values, strict=True))
    if row["used_at"] is not None:
        raise EnrollmentError(
            "token_used", f"token {token_id} already enrolled {row['used_by']!r}: revoke the"
            " node instead", 409,
        )
    if row["withdrawn_at"] is None:
        db.execute("UPDATE enrollment_tokens SET withdrawn_at = ? WHERE id = ?", [now, token_id])
        row["withdrawn_at"] = now
        audit(db, now, actor, "enrollment_token.withdraw", f"enrollment-token:{token_id}")
    row["state"] = _token_state(row, now)
    return row


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    token: str
    node_id: str
    csr_pem: str
    inventory: dict[str, Any]
    facts: HostFacts | None

    @classmethod
    def from_json(cls, body: Any) -> EnrollRequest:
        if not isinstance(body, dict):
            raise EnrollmentError("invalid_request", "body must be a JSON object")
        for key in ("token", "node_id", "csr"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise EnrollmentError("invalid_request", f"{key} must be a non-empty string")
        inventory = body.get("inventory", {})
        if not isinstance(inventory, dict):
            raise EnrollmentError("invalid_request", "inventory must be an object")
        try:
            validate_node_id(body["node_id"])
        except ProtocolError as exc:
            raise EnrollmentError("invalid_node_id", exc.reason) from None
        facts = None
        if "facts" in body:
            try:
                facts = HostFacts.from_plain(body["facts"])
            except ValueError as exc:
                raise EnrollmentError("invalid_facts", f"facts: {exc}") from None
        return cls(body["token"], body["node_id"], body["csr"], inventory, facts)


def enroll(
    db: Tx,
    ca: CertificateAuthority,
    req: EnrollRequest,
    now: float,
    cert_days: float,
    profiles: dict[str, Profile],
) -> dict[str, Any]:
    """Spend the token and sign the node's certificate; all or nothing."""
    row = db.execute(
        "SELECT id, site, country, provider, profile, expires_at, used_at, node_id, withdrawn_at"
        " FROM enrollment_tokens WHERE token_hash = ?",
        [hash_secret(req.token)],
    ).fetchone()
    if row is None:
        raise EnrollmentError("invalid_token", "unknown enrollment token", 403)
    token_id, site, country, provider, profile, expires_at, used_at, bound, withdrawn = row
    if withdrawn is not None:
        raise EnrollmentError("token_withdrawn", "this enrollment token was withdrawn", 403)
    if used_at is not None:
        raise EnrollmentError("token_used", "this enrollment token was already used", 403)
    if expires_at < now:
        raise EnrollmentError("token_expired", "this enrollment token has expired", 403)
    if bound is not None and bound != req.node_id:
        raise EnrollmentError(
            "token_for_other_node", f"this token re-enrolls node {bound!r}, not {req.node_id!r}",
            403,
        )
    existing = db.execute("SELECT enrolled_at, revoked_at FROM nodes WHERE id = ?",
                          [req.node_id]).fetchone()
    if existing is not None and existing[1] is not None:
        raise EnrollmentError("node_revoked", f"node {req.node_id!r} was revoked", 403)
    if existing is not None and existing[0] is not None and bound is None:
        raise EnrollmentError(
            "node_exists", f"node {req.node_id!r} is already enrolled; to enroll it again, ask"
            " for a token bound to it (token create --node-id)", 409,
        )
    known = profiles.get(profile)
    if known is not None and req.facts is not None:
        reasons = profile_failures(known, req.facts)
        if reasons:
            raise EnrollmentError(
                "profile_mismatch",
                f"this host does not meet the profile {profile!r}: " + "; ".join(reasons), 422,
            )
    elif known is not None:
        raise EnrollmentError("invalid_facts", "facts: the host's hardware facts are missing")
    attrs = NodeAttributes(req.node_id, country, provider, site, profile)
    try:
        issued = ca.sign_node_csr(req.csr_pem, attrs, cert_days,
                                  taken_names(db, req.node_id))
        key = csr_key_id(req.csr_pem)
    except PkiError as exc:
        raise EnrollmentError("invalid_csr", str(exc)) from None
    db.execute(
        "UPDATE enrollment_tokens SET used_at = ?, used_by = ? WHERE id = ?",
        [now, req.node_id, token_id],
    )
    db.execute(
        "INSERT INTO nodes (id, site, country, provider, profile, enrolled_at, inventory)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET site = excluded.site,"
        " country = excluded.country, provider = excluded.provider, profile = excluded.profile,"
        " enrolled_at = excluded.enrolled_at, inventory = coalesce(nodes.inventory,"
        " excluded.inventory)",
        [req.node_id, site, country, provider, profile, now, json.dumps(req.inventory)],
    )
    if req.facts is not None:
        db.execute("UPDATE nodes SET facts = ? WHERE id = ?",
                   [json.dumps(req.facts.to_plain()), req.node_id])
    db.execute("UPDATE nodes SET alt_names = ? WHERE id = ?",
               [" ".join(issued.names), req.node_id])
    serial = format(issued.serial, "x")
    # Certificates of an earlier enrollment of this node stop working now.
    db.execute("UPDATE certificates SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
               [now, req.node_id])
    db.execute(
        "INSERT INTO certificates (serial, node_id, issued_at, not_after, kind, key_id, pem)"
        " VALUES (?, ?, ?, ?, 'enroll', ?, ?)",
        [serial, req.node_id, now, issued.not_after, key, issued.certificate_pem],
    )
    audit(db, now, f"enrollment-token:{token_id}", "node.enroll", req.node_id, serial=serial,
           site=site, country=country, provider=provider, profile=profile,
           re_enrollment=bound is not None, names=" ".join(issued.names))
    return {
        "node_id": req.node_id,
        "certificate": issued.certificate_pem,
        "ca": ca.cert_pem(),
        "attributes": {"site": site, "country": country, "provider": provider,
                       "profile": profile},
        "not_after": issued.not_after,
        "re_enrollment": bound is not None,
    }


def taken_names(db: Tx, node_id: str) -> set[str]:
    """The subjectAltNames other nodes' certificates carry (revoked nodes' too: theirs may
    still be in use until they expire)."""
    taken: set[str] = set()
    for (names,) in db.execute("SELECT alt_names FROM nodes WHERE id != ? AND alt_names != ''",
                               [node_id]).fetchall():
        taken.update(names.split())
    return taken
