"""API tokens and roles. A token is shown once; only its hash is stored."""

from __future__ import annotations

import secrets
from typing import Final

import sqlite_utils

from aggregator.enrollment import hash_secret

ROLES: Final = ("admin", "operator", "viewer", "technician")


def create_api_token(db: sqlite_utils.Database, role: str, name: str, now: float) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = "v8a_" + secrets.token_urlsafe(32)
    db.table("api_tokens").insert(
        {"name": name, "role": role, "token_hash": hash_secret(token), "created_at": now}
    )
    return token
