"""API tokens and roles. A token is shown once; only its hash is stored."""

from __future__ import annotations

import secrets
from typing import Final

from aggregator.store import trust as repo
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.trust.enrollment import hash_secret

ROLES: Final = ("admin", "operator", "viewer", "technician")


def create_api_token(db: Tx, role: str, name: str, now: float, *,
                     actor: str = "cli") -> tuple[int, str]:
    """A new token for ``role``: ``(id, token)``; the token itself is never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = "v8a_" + secrets.token_urlsafe(32)
    token_id = repo.insert_api_token(db, name, role, hash_secret(token), now)
    audit(db, now, actor, "api_token.create", f"api-token:{token_id}", role=role, name=name)
    return token_id, token
