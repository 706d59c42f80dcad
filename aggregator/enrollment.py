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

import sqlite_utils

from agent.wire import ProtocolError, validate_node_id
from aggregator.pki import CertificateAuthority, NodeAttributes, PkiError

COUNTRY = re.compile(r"[A-Z]{2}")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


class EnrollmentError(Exception):
    """A request that cannot be granted; ``code`` is the API error code, ``status`` its HTTP."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


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
    db: sqlite_utils.Database, scope: TokenScope, ttl_s: float, now: float
) -> dict[str, Any]:
    token = "v8e_" + secrets.token_urlsafe(24)
    expires_at = now + ttl_s
    db.table("enrollment_tokens").insert(
        {
            "token_hash": hash_secret(token),
            "site": scope.site,
            "country": scope.country,
            "provider": scope.provider,
            "profile": scope.profile,
            "created_at": now,
            "expires_at": expires_at,
        }
    )
    return {"token": token, "expires_at": expires_at}


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    token: str
    node_id: str
    csr_pem: str
    inventory: dict[str, Any]

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
        return cls(body["token"], body["node_id"], body["csr"], inventory)


def enroll(
    db: sqlite_utils.Database,
    ca: CertificateAuthority,
    req: EnrollRequest,
    now: float,
    cert_days: float,
) -> dict[str, Any]:
    """Spend the token and sign the node's certificate; all or nothing."""
    row = db.execute(
        "SELECT id, site, country, provider, profile, expires_at, used_at FROM enrollment_tokens"
        " WHERE token_hash = ?",
        [hash_secret(req.token)],
    ).fetchone()
    if row is None:
        raise EnrollmentError("invalid_token", "unknown enrollment token", 403)
    token_id, site, country, provider, profile, expires_at, used_at = row
    if used_at is not None:
        raise EnrollmentError("token_used", "this enrollment token was already used", 403)
    if expires_at < now:
        raise EnrollmentError("token_expired", "this enrollment token has expired", 403)
    existing = db.execute("SELECT enrolled_at FROM nodes WHERE id = ?", [req.node_id]).fetchone()
    if existing is not None and existing[0] is not None:
        raise EnrollmentError("node_exists", f"node {req.node_id!r} is already enrolled", 409)
    attrs = NodeAttributes(req.node_id, country, provider, site, profile)
    try:
        issued = ca.sign_node_csr(req.csr_pem, attrs, cert_days)
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
    db.execute(
        "INSERT INTO certificates (serial, node_id, issued_at, not_after) VALUES (?, ?, ?, ?)",
        [format(issued.serial, "x"), req.node_id, now, issued.not_after],
    )
    return {
        "node_id": req.node_id,
        "certificate": issued.certificate_pem,
        "ca": ca.cert_pem(),
        "attributes": {"site": site, "country": country, "provider": provider,
                       "profile": profile},
        "not_after": issued.not_after,
    }
