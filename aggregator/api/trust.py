"""Handlers for the trust lifecycle: enrollment tokens and enrollment, the CA, API tokens and
the audit trail."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

from aiohttp import web

from aggregator.api.common import (
    ApiError,
    actor_of,
    int_id,
    json_body,
    query_time,
    role_of,
    services,
)
from aggregator.errors import body_of
from aggregator.trust import audit, enrollment
from aggregator.trust import nodes as trust
from aggregator.trust import tokens as auth
from aggregator.trust.enrollment import (
    EnrollmentError,
    EnrollRequest,
    TokenScope,
    create_token,
    enroll,
    list_tokens,
    withdraw_token,
)
from plumbing.shapes import Rule

_LABEL_MUST = "1-64 letters, digits, space . _ -"


@dataclass(frozen=True)
class EnrollmentTokenBody:
    """``POST /api/v1/enrollment-tokens``: where the node stands and what it is."""

    site: Annotated[str, Rule(pattern=enrollment.LABEL.pattern, must=_LABEL_MUST,
                              code="invalid_site")]
    country: Annotated[str, Rule(pattern=enrollment.COUNTRY.pattern,
                                 must="an ISO 3166 alpha-2 code", code="invalid_country")]
    provider: Annotated[str, Rule(pattern=enrollment.LABEL.pattern, must=_LABEL_MUST,
                                  code="invalid_provider")]
    profile: Annotated[str, Rule(description="a hardware profile the aggregator knows")]
    ttl_seconds: Annotated[float, Rule(minimum=60, maximum=30 * 86400)] = 7200.0
    node_id: Annotated[str | None, Rule(description=(
        "bind the token to this node id: re-enrolls an enrolled node"))] = None


@dataclass(frozen=True)
class ApiTokenBody:
    """``POST /api/v1/api-tokens``."""

    role: Literal["admin", "operator", "viewer", "technician"]
    name: Annotated[str, Rule(max_length=100)] = ""


async def create_enrollment_token(request: web.Request) -> web.Response:
    svc = services(request)
    body = body_of(EnrollmentTokenBody, await json_body(request))
    fields = {"site": body.site, "country": body.country, "provider": body.provider,
              "profile": body.profile}
    if body.profile not in svc.profiles:
        raise ApiError(
            400, "unknown_profile",
            f"no hardware profile {body.profile!r}; known: {', '.join(sorted(svc.profiles))}",
        )
    ttl, node_id = body.ttl_seconds, body.node_id
    if node_id is not None and await role_of(request) not in ("admin", "operator"):
        # A token bound to a node replaces that node's identity: as strong as revoking it.
        raise ApiError(403, "forbidden", "only admin and operator may bind a token to a node")
    scope = TokenScope(**fields)
    now, actor = time.time(), actor_of(request)
    result = await svc.store.write(
        lambda db: create_token(db, scope, float(ttl), now, actor=actor, node_id=node_id)
    )
    result["ca_fingerprint"] = svc.ca.fingerprint()
    result.update(fields)
    return web.json_response(result, status=201)


async def list_enrollment_tokens(request: web.Request) -> web.Response:
    state = request.query.get("state", "")
    if state not in ("", "active", "used", "expired", "withdrawn"):
        raise ApiError(400, "invalid_query",
                       "state must be one of active, used, expired, withdrawn")
    tokens = await services(request).store.read(lambda c: list_tokens(c, time.time(), state))
    return web.json_response({"tokens": tokens})


async def withdraw_enrollment_token(request: web.Request) -> web.Response:
    token_id = int_id(request, "enrollment token")
    now, actor = time.time(), actor_of(request)
    row = await services(request).store.write(lambda db: withdraw_token(db, token_id, now, actor))
    return web.json_response(row)


async def enroll_node(request: web.Request) -> web.Response:
    svc = services(request)
    now = time.time()
    req: EnrollRequest | None = None
    try:
        req = EnrollRequest.from_json(await json_body(request))
        result = await svc.store.write(
            lambda db: enroll(db, svc.ca, req, now, svc.cert_days, svc.profiles)
        )
    except (EnrollmentError, ApiError) as exc:
        code, node = exc.code, req.node_id if req is not None else ""
        await svc.store.write(lambda db: audit.record(
            db, now, f"peer:{request.remote}", "node.enroll", node, "refused", reason=code,
        ))
        raise
    if result.get("re_enrollment"):  # its earlier certificates are revoked: whoever holds
        await svc.revocation.superseded(result["node_id"])  # them now is cut off
    result["broker"] = {"host": svc.broker_host, "port": svc.broker_port}
    if svc.images_url:
        result["images_url"] = svc.images_url
    result["order_signing_key"] = svc.order_public_key
    return web.json_response(result, status=201)


async def ca_certificate(request: web.Request) -> web.Response:
    svc = services(request)
    return web.json_response(
        {"ca": svc.ca.cert_pem(), "fingerprint": svc.ca.fingerprint(), "time": time.time()}
    )


async def audit_events(request: web.Request) -> web.Response:
    since = query_time(request, "since")
    action = request.query.get("action", "")
    subject = request.query.get("subject", "")
    try:
        limit = int(request.query.get("limit", "200"))
        if not 1 <= limit <= 10000:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_query", "limit must be an integer from 1 to 10000") from None
    events = await services(request).store.read(
        lambda c: audit.events(c, since, action, subject, limit)
    )
    return web.json_response({"events": events})


async def list_api_tokens(request: web.Request) -> web.Response:
    tokens = await services(request).store.read(trust.list_api_tokens)
    return web.json_response({"tokens": tokens})


async def revoke_api_token(request: web.Request) -> web.Response:
    token_id = int_id(request, "API token")
    now, actor = time.time(), actor_of(request)
    row = await services(request).store.write(
        lambda db: trust.revoke_api_token(db, token_id, now, actor)
    )
    return web.json_response(row)


async def create_api_token(request: web.Request) -> web.Response:
    svc = services(request)
    body = body_of(ApiTokenBody, await json_body(request))
    role, name = body.role, body.name
    now, actor = time.time(), actor_of(request)
    token_id, token = await svc.store.write(
        lambda db: auth.create_api_token(db, str(role), name, now, actor=actor)
    )
    return web.json_response({"id": token_id, "token": token, "role": role, "name": name},
                             status=201)
