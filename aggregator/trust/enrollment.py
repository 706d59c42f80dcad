"""Enrollment tokens and node enrollment: token → CSR → certificate signed by the fleet CA.

The functions that touch the database take a sqlite-utils ``Database`` and run on the store's
writer thread (through ``Store.write``), so checking and spending a token is one transaction.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from aggregator.errors import Refused
from aggregator.store import trust as repo
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
    token_id = repo.insert_enrollment_token(db, hash_secret(token), scope.site, scope.country,
                                            scope.provider, scope.profile, now, expires_at,
                                            node_id, actor)
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


def list_tokens(conn: Tx, now: float, state: str = "") -> list[dict[str, Any]]:
    """Every enrollment token (never the token itself: only its hash is stored)."""
    rows = []
    for token in repo.enrollment_tokens(conn):
        row = token.plain()
        row["state"] = _token_state(row, now)
        if not state or row["state"] == state:
            rows.append(row)
    return rows


def withdraw_token(db: Tx, token_id: int, now: float,
                   actor: str) -> dict[str, Any]:
    """Withdraw an unused token; withdrawing a withdrawn one changes nothing."""
    token = repo.enrollment_token(db, token_id)
    if token is None:
        raise EnrollmentError("not_found", f"no enrollment token {token_id}", 404)
    row = token.plain()
    if row["used_at"] is not None:
        raise EnrollmentError(
            "token_used", f"token {token_id} already enrolled {row['used_by']!r}: revoke the"
            " node instead", 409,
        )
    if row["withdrawn_at"] is None:
        repo.withdraw_enrollment_token(db, token_id, now)
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
    token = _spendable(db, req, now)
    _check_host(token.profile, req.facts, profiles)
    attrs = NodeAttributes(req.node_id, token.country, token.provider, token.site,
                           token.profile)
    try:
        issued = ca.sign_node_csr(req.csr_pem, attrs, cert_days,
                                  taken_names(db, req.node_id))
        key = csr_key_id(req.csr_pem)
    except PkiError as exc:
        raise EnrollmentError("invalid_csr", str(exc)) from None
    repo.use_enrollment_token(db, token.id, req.node_id, now)
    repo.save_enrolled_node(db, req.node_id, token.site, token.country, token.provider,
                            token.profile, now, req.inventory,
                            req.facts.to_plain() if req.facts is not None else None)
    repo.set_alt_names(db, req.node_id, list(issued.names))
    serial = format(issued.serial, "x")
    # Certificates of an earlier enrollment of this node stop working now.
    repo.revoke_certificates(db, req.node_id, now)
    repo.insert_certificate(db, serial, req.node_id, now, issued.not_after, "enroll", key,
                            issued.certificate_pem)
    again = token.node_id is not None
    audit(db, now, f"enrollment-token:{token.id}", "node.enroll", req.node_id, serial=serial,
          site=token.site, country=token.country, provider=token.provider,
          profile=token.profile, re_enrollment=again, names=" ".join(issued.names))
    return {
        "node_id": req.node_id,
        "certificate": issued.certificate_pem,
        "ca": ca.cert_pem(),
        "attributes": {"site": token.site, "country": token.country,
                       "provider": token.provider, "profile": token.profile},
        "not_after": issued.not_after,
        "re_enrollment": again,
    }


def _spendable(db: Tx, req: EnrollRequest, now: float) -> repo.EnrollmentToken:
    """The request's token, if it may enroll this node now."""
    token = repo.enrollment_token_by_hash(db, hash_secret(req.token))
    if token is None:
        raise EnrollmentError("invalid_token", "unknown enrollment token", 403)
    if token.withdrawn_at is not None:
        raise EnrollmentError("token_withdrawn", "this enrollment token was withdrawn", 403)
    if token.used_at is not None:
        raise EnrollmentError("token_used", "this enrollment token was already used", 403)
    if token.expires_at < now:
        raise EnrollmentError("token_expired", "this enrollment token has expired", 403)
    bound = token.node_id
    if bound is not None and bound != req.node_id:
        raise EnrollmentError(
            "token_for_other_node", f"this token re-enrolls node {bound!r}, not {req.node_id!r}",
            403,
        )
    existing = repo.node_identity(db, req.node_id)
    if existing is not None and existing.revoked_at is not None:
        raise EnrollmentError("node_revoked", f"node {req.node_id!r} was revoked", 403)
    if existing is not None and existing.enrolled_at is not None and bound is None:
        raise EnrollmentError(
            "node_exists", f"node {req.node_id!r} is already enrolled; to enroll it again, ask"
            " for a token bound to it (token create --node-id)", 409,
        )
    return token


def _check_host(profile: str, facts: HostFacts | None, profiles: dict[str, Profile]) -> None:
    """The host meets its token's profile (a profile this aggregator does not know asks
    nothing)."""
    known = profiles.get(profile)
    if known is None:
        return
    if facts is None:
        raise EnrollmentError("invalid_facts", "facts: the host's hardware facts are missing")
    reasons = profile_failures(known, facts)
    if reasons:
        raise EnrollmentError(
            "profile_mismatch",
            f"this host does not meet the profile {profile!r}: " + "; ".join(reasons), 422,
        )


def taken_names(db: Tx, node_id: str) -> set[str]:
    """The subjectAltNames other nodes' certificates carry (revoked nodes' too: theirs may
    still be in use until they expire)."""
    return repo.alt_names_of_others(db, node_id)
