"""The REST API (aiohttp): one route table that declares each route's roles and documentation.

The table is the single source for routing, authorisation and the OpenAPI description, so a
route cannot exist without being documented and guarded. Errors are JSON
``{"error": {"code", "message"}}`` with a 4xx status; bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from aggregator.api.http import error, json_errors
from aggregator.api.metrics import render_metrics
from aggregator.errors import Refused
from aggregator.fleet import queries
from aggregator.store.writer import Store
from aggregator.trust import audit, enrollment
from aggregator.trust import nodes as trust
from aggregator.trust import tokens as auth
from aggregator.trust.enrollment import (
    EnrollmentError,
    EnrollRequest,
    TokenScope,
    create_token,
    enroll,
    hash_secret,
    list_tokens,
    withdraw_token,
)
from aggregator.trust.pki import CertificateAuthority, OrderSigner
from aggregator.trust.tokens import ROLES
from aggregator.workloads import images, moves, orders, placement, residency, vms
from contract.profiles import Profile

log = logging.getLogger("virt8ra.aggregator.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC: tuple[str, ...] = ()
ALL_ROLES = ROLES


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    roles: tuple[str, ...]  # empty: no bearer token (public, or authorised by the body)
    summary: str
    # (name, description) or (name, description, JSON schema); a string when no schema
    query: tuple[tuple[str, str] | tuple[str, str, dict[str, Any]], ...] = ()
    body: dict[str, Any] | None = None  # JSON schema of the request body
    responses: dict[int, str] = field(default_factory=dict)
    body_required: bool = True  # False: an empty body is {}
    other_bodies: dict[str, Any] = field(default_factory=dict)  # other media types accepted


@dataclass
class Services:
    """What the handlers need; built by the service and stored on the app."""

    store: Store
    ca: CertificateAuthority
    profiles: dict[str, Profile]
    heartbeat_factor: float
    min_timeout_s: float
    cert_days: float
    broker_host: str
    broker_port: int
    metrics: Callable[[], dict[str, float]]
    order_public_key: str  # PEM, handed to every node at enrollment
    # Revoke a node: (node, actor, reason) -> what was done; CRL, broker reload, cut-off.
    revoke: Callable[[str, str, str], Awaitable[dict[str, Any]]]
    # A node's earlier certificates were revoked (it enrolled again): renew the CRL and take
    # over the session of whoever still uses them.
    crl_changed: Callable[[str], Awaitable[None]]
    signer: OrderSigner | None = None  # None: this API cannot order anything
    order_ttl_s: float = 600.0
    images_dir: Path = Path("images")
    images_url: str = ""  # the image service nodes fetch from (https, node certificates)
    max_image_bytes: int = images.MAX_IMAGE_BYTES
    orders_changed: Callable[[], None] = lambda: None  # wake the dispatcher


SERVICES = web.AppKey("services", Services)
ACTOR_KEY = web.RequestKey("actor", str)  # who is acting, for the audit trail


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _svc(request: web.Request) -> Services:
    return request.app[SERVICES]


async def _json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > 1 << 20:
        raise ApiError(413, "too_large", "request body larger than 1 MiB")
    try:
        body = json.loads(await request.read())
        # Lone surrogates ("\ud800") are valid JSON escapes but no text can be stored.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise ApiError(400, "invalid_json", "request body is not valid JSON text") from None
    return body


def _query_time(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return queries.parse_time(raw)
    except ValueError:
        raise ApiError(
            400, "invalid_query", f"{name} must be unix seconds or an ISO 8601 time"
        ) from None


# --- handlers -------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    svc = _svc(request)
    fleet = await svc.store.read(
        lambda c: queries.fleet_figures(c, time.time(), svc.heartbeat_factor, svc.min_timeout_s)
    )
    body = render_metrics(svc.metrics(), fleet)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(ROUTES))


async def list_nodes(request: web.Request) -> web.Response:
    svc = _svc(request)
    nodes = await svc.store.read(
        lambda c: queries.list_nodes(
            c, time.time(), svc.heartbeat_factor, svc.min_timeout_s, svc.profiles
        )
    )
    return web.json_response({"nodes": nodes})


def _node_id(request: web.Request) -> str:
    return request.match_info["id"]


async def get_node(request: web.Request) -> web.Response:
    svc = _svc(request)
    node_id = _node_id(request)
    node = await svc.store.read(
        lambda c: queries.node_detail(
            c, node_id, time.time(), svc.heartbeat_factor, svc.min_timeout_s, svc.profiles
        )
    )
    if node is None:
        raise ApiError(404, "not_found", f"no node {node_id!r}")
    return web.json_response(node)


async def node_telemetry(request: web.Request) -> web.Response:
    svc = _svc(request)
    node_id = _node_id(request)
    since = _query_time(request, "since")
    until = _query_time(request, "until")
    metrics_asked = [
        m for raw in request.query.getall("metric", []) for m in raw.split(",") if m
    ]
    unknown = [m for m in metrics_asked if m not in queries.HOST_METRICS]
    if unknown:
        raise ApiError(
            400, "invalid_query",
            f"unknown metric {unknown[0]!r}; known: {', '.join(queries.HOST_METRICS)}",
        )
    try:
        limit = int(request.query.get("limit", "1000"))
        if not 1 <= limit <= 10000:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_query", "limit must be an integer from 1 to 10000") from None
    result = await svc.store.read(
        lambda c: queries.telemetry(c, node_id, since, until, metrics_asked, limit)
    )
    if result is None:
        raise ApiError(404, "not_found", f"no node {node_id!r}")
    return web.json_response(result)


async def create_enrollment_token(request: web.Request) -> web.Response:
    svc = _svc(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    fields = {}
    for key in ("site", "country", "provider", "profile"):
        value = body.get(key)
        if not isinstance(value, str):
            raise ApiError(400, "invalid_request", f"{key} must be a string")
        fields[key] = value
    if fields["profile"] not in svc.profiles:
        raise ApiError(
            400, "unknown_profile",
            f"no hardware profile {fields['profile']!r}; known: {', '.join(sorted(svc.profiles))}",
        )
    ttl = body.get("ttl_seconds", 7200)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 60 <= ttl <= 30 * 86400:
        raise ApiError(400, "invalid_request", "ttl_seconds must be a number from 60 to 2592000")
    node_id = body.get("node_id")
    if node_id is not None and not isinstance(node_id, str):
        raise ApiError(400, "invalid_request", "node_id must be a string")
    if node_id is not None and await _role(request) not in ("admin", "operator"):
        # A token bound to a node replaces that node's identity: as strong as revoking it.
        raise ApiError(403, "forbidden", "only admin and operator may bind a token to a node")
    scope = TokenScope(**fields)
    now, actor = time.time(), _actor(request)
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
    tokens = await _svc(request).store.read(lambda c: list_tokens(c, time.time(), state))
    return web.json_response({"tokens": tokens})


def _int_id(request: web.Request, what: str) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(404, "not_found", f"no {what} {raw!r}")
    return int(raw)


async def withdraw_enrollment_token(request: web.Request) -> web.Response:
    token_id = _int_id(request, "enrollment token")
    now, actor = time.time(), _actor(request)
    row = await _svc(request).store.write(lambda db: withdraw_token(db, token_id, now, actor))
    return web.json_response(row)


async def enroll_node(request: web.Request) -> web.Response:
    svc = _svc(request)
    now = time.time()
    req: EnrollRequest | None = None
    try:
        req = EnrollRequest.from_json(await _json_body(request))
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
        await svc.crl_changed(result["node_id"])  # them now is cut off
    result["broker"] = {"host": svc.broker_host, "port": svc.broker_port}
    if svc.images_url:
        result["images_url"] = svc.images_url
    result["order_signing_key"] = svc.order_public_key
    return web.json_response(result, status=201)


async def ca_certificate(request: web.Request) -> web.Response:
    svc = _svc(request)
    return web.json_response(
        {"ca": svc.ca.cert_pem(), "fingerprint": svc.ca.fingerprint(), "time": time.time()}
    )


async def _reason(request: web.Request) -> str:
    """The optional ``{"reason": text}`` body of a node action, for the audit trail."""
    body = await _object_body(request)
    if not isinstance(body.get("reason", ""), str):
        raise ApiError(400, "invalid_request", 'body must be {"reason": string}')
    return str(body.get("reason", ""))[:500]


async def revoke_node(request: web.Request) -> web.Response:
    svc = _svc(request)
    node_id = _node_id(request)
    reason = await _reason(request)
    result = await svc.revoke(node_id, _actor(request), reason)
    return web.json_response(result)


def _cordon(cordoned: bool) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        svc = _svc(request)
        node_id = _node_id(request)
        reason = await _reason(request)
        now, actor = time.time(), _actor(request)
        done = await svc.store.write(
            lambda db: trust.set_cordon(db, node_id, cordoned, now, actor, reason))
        return web.json_response(done)

    handler.__name__ = "cordon_node" if cordoned else "uncordon_node"
    return handler


async def audit_events(request: web.Request) -> web.Response:
    since = _query_time(request, "since")
    action = request.query.get("action", "")
    subject = request.query.get("subject", "")
    try:
        limit = int(request.query.get("limit", "200"))
        if not 1 <= limit <= 10000:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_query", "limit must be an integer from 1 to 10000") from None
    events = await _svc(request).store.read(
        lambda c: audit.events(c, since, action, subject, limit)
    )
    return web.json_response({"events": events})


async def list_api_tokens(request: web.Request) -> web.Response:
    tokens = await _svc(request).store.read(trust.list_api_tokens)
    return web.json_response({"tokens": tokens})


async def revoke_api_token(request: web.Request) -> web.Response:
    token_id = _int_id(request, "API token")
    now, actor = time.time(), _actor(request)
    row = await _svc(request).store.write(
        lambda db: trust.revoke_api_token(db, token_id, now, actor)
    )
    return web.json_response(row)


async def create_api_token(request: web.Request) -> web.Response:
    svc = _svc(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    role, name = body.get("role"), body.get("name", "")
    if role not in ROLES:
        raise ApiError(400, "invalid_request", f"role must be one of {', '.join(ROLES)}")
    if not isinstance(name, str) or len(name) > 100:
        raise ApiError(400, "invalid_request", "name must be a string of at most 100 characters")
    now, actor = time.time(), _actor(request)
    token_id, token = await svc.store.write(
        lambda db: auth.create_api_token(db, str(role), name, now, actor=actor)
    )
    return web.json_response({"id": token_id, "token": token, "role": role, "name": name},
                             status=201)


# --- VMs, images, orders ---------------------------------------------------------------------


def _live(svc: Services) -> vms.Liveness:
    return vms.Liveness(svc.heartbeat_factor, svc.min_timeout_s)


def _signer(svc: Services) -> OrderSigner:
    if svc.signer is None:
        raise ApiError(503, "no_signer", "this aggregator has no order-signing key")
    return svc.signer


async def list_images(request: web.Request) -> web.Response:
    return web.json_response({"images": await _svc(request).store.read(images.list_images)})


async def add_image(request: web.Request) -> web.Response:
    """JSON ``{"name", "path", "format"}`` (a file on the aggregator), or the image itself as
    ``application/octet-stream`` with ``?name=&format=``."""
    svc = _svc(request)
    if request.content_type == "application/octet-stream":
        name = images.check_name(request.query.get("name"))
        fmt = request.query.get("format", "")

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(1 << 20):
                yield chunk

        sha256, size, path = await images.store_stream(chunks(), svc.images_dir,
                                                       svc.max_image_bytes)
    else:
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise ApiError(400, "invalid_request",
                           'body must be {"name", "path", "format"} or an upload')
        if await _role(request) != "admin":  # it reads a file of the aggregator's host
            raise ApiError(403, "forbidden", "only admin may register a file on the"
                           " aggregator host; upload the image instead")
        name = images.check_name(body.get("name"))
        fmt = body.get("format", "")
        sha256, size, path = await asyncio.to_thread(
            images.take_file, body["path"], svc.images_dir.parent, svc.images_dir,
            svc.max_image_bytes)
    try:
        sniffed = await asyncio.to_thread(images.sniff_format, path)
        fmt = images.check_format(fmt or sniffed)
        if fmt in ("raw", "qcow2") and fmt != sniffed:
            raise ApiError(400, "invalid_format", f"the file is {sniffed}, not {fmt}")
    except (ApiError, Refused):
        await asyncio.to_thread(path.unlink, missing_ok=True)  # stored by digest: unused
        raise
    now, actor = time.time(), _actor(request)

    def record(db: Any) -> dict[str, Any]:
        out = images.register(db, name, fmt, sha256, size, path, now)
        audit.record(db, now, actor, "image.register", name, sha256=sha256, size=size)
        return out

    return web.json_response(await svc.store.write(record), status=201)


async def list_vms(request: web.Request) -> web.Response:
    svc, node, now = _svc(request), request.query.get("node", ""), time.time()
    return web.json_response(
        {"vms": await svc.store.read(lambda c: vms.list_vms(c, node, now, _live(svc)))})


async def create_vm(request: web.Request) -> web.Response:
    svc = _svc(request)
    req = vms.VmRequest.from_json(await _json_body(request))
    signer, now, actor = _signer(svc), time.time(), _actor(request)
    result = await svc.store.write(lambda db: vms.create(
        db, signer, req, now, svc.profiles, _live(svc), svc.order_ttl_s, actor))
    svc.orders_changed()
    return web.json_response(result, status=202)


async def placement_dry_run(request: web.Request) -> web.Response:
    svc = _svc(request)
    req = vms.VmRequest.from_json(await _json_body(request))
    now = time.time()
    return web.json_response(await svc.store.read(
        lambda c: vms.dry_run(c, req, now, svc.profiles, _live(svc))))


async def get_vm(request: web.Request) -> web.Response:
    svc, ref, now = _svc(request), request.match_info["id"], time.time()
    vm = await svc.store.read(lambda c: vms.get(c, ref, now, _live(svc)))
    if vm is None:
        raise ApiError(404, "not_found", f"no VM {ref!r}")
    return web.json_response(vm)


def _vm_action(action: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        svc = _svc(request)
        ref = request.match_info["id"]
        signer, now, actor = _signer(svc), time.time(), _actor(request)
        result = await svc.store.write(lambda db: vms.act(
            db, signer, vms.resolve(db, ref), action, now, svc.order_ttl_s, actor))
        svc.orders_changed()
        return web.json_response(result, status=202)

    handler.__name__ = f"{action}_vm"
    return handler


def _move_context(svc: Services) -> moves.Context:
    return moves.Context(_signer(svc), svc.profiles, _live(svc), svc.order_ttl_s)


async def _object_body(request: web.Request) -> dict[str, Any]:
    """A JSON object body; an empty body is ``{}``."""
    if not request.can_read_body:
        return {}
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    return body


async def migrate_vm(request: web.Request) -> web.Response:
    svc, ref = _svc(request), request.match_info["id"]
    body = await _object_body(request)
    settings = moves.MoveSettings.from_json(body)
    to = body.get("to") or ""
    if not isinstance(to, str):
        raise ApiError(400, "invalid_request", "to must be a node id")
    ctx, now, actor = _move_context(svc), time.time(), _actor(request)
    result = await svc.store.write(lambda db: moves.start(
        db, ctx, vms.resolve(db, ref), to, settings, now, actor))
    svc.orders_changed()
    return web.json_response(result, status=202)


async def list_moves(request: web.Request) -> web.Response:
    q = request.query
    state = q.get("state", "")
    allowed = ("open", *moves.OPEN_STATES, "succeeded", "failed")
    if state and state not in allowed:
        raise ApiError(400, "invalid_query", f"state must be one of {', '.join(allowed)}")
    limit = _limit(q.get("limit", "200"))
    ref = q.get("vm", "")

    def read(c: Any) -> list[dict[str, Any]]:
        vm_id = vms.resolve(c, ref) if ref else ""
        return moves.list_moves(c, vm_id, state, limit)

    return web.json_response({"moves": await _svc(request).store.read(read)})


async def get_move(request: web.Request) -> web.Response:
    move_id = request.match_info["id"]
    found = await _svc(request).store.read(lambda c: moves.get(c, move_id))
    if found is None:
        raise ApiError(404, "not_found", f"no move {move_id!r}")
    return web.json_response(found)


async def drain_node(request: web.Request) -> web.Response:
    svc, node_id = _svc(request), _node_id(request)
    body = await _object_body(request)
    settings = moves.MoveSettings.from_json(body, modes=("auto", "live", "cold"))
    parallel = body.get("parallel", 2)
    if isinstance(parallel, bool) or not isinstance(parallel, int):
        raise ApiError(400, "invalid_request", "parallel must be an integer")
    ctx, now, actor = _move_context(svc), time.time(), _actor(request)
    result = await svc.store.write(lambda db: moves.drain(
        db, ctx, node_id, settings, parallel, now, actor))
    svc.orders_changed()
    return web.json_response(result, status=202)


async def get_drain(request: web.Request) -> web.Response:
    node_id = _node_id(request)
    found = await _svc(request).store.read(lambda c: moves.drain_json(c, node_id))
    if found is None:
        raise ApiError(404, "not_found", f"node {node_id!r} has not been drained")
    return web.json_response(found)


def _limit(raw: str) -> int:
    try:
        limit = int(raw)
        if not 1 <= limit <= 10000:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_query", "limit must be an integer from 1 to 10000") from None
    return limit


async def vm_residency(request: web.Request) -> web.Response:
    ref = request.match_info["id"]

    def read(c: Any) -> dict[str, Any]:
        row = c.execute("SELECT id FROM vms WHERE id = ? OR name = ? ORDER BY created_at DESC"
                        " LIMIT 1", (ref, ref)).fetchone()
        if row is None:
            raise ApiError(404, "not_found", f"no VM {ref!r}")
        return {"vm": row[0], **residency.verify(c, row[0])}

    return web.json_response(await _svc(request).store.read(read))


async def verify_residency(request: web.Request) -> web.Response:
    chains = await _svc(request).store.read(residency.verify_all)
    return web.json_response({"chains": chains,
                              "all_valid": all(c["chain_valid"] for c in chains)})


async def list_orders(request: web.Request) -> web.Response:
    q = request.query
    state = q.get("state", "")
    if state and state not in (*orders.OPEN, *orders.FINAL):
        raise ApiError(400, "invalid_query",
                       f"state must be one of {', '.join((*orders.OPEN, *orders.FINAL))}")
    limit = _limit(q.get("limit", "200"))
    node, vm = q.get("node", ""), q.get("vm", "")
    found = await _svc(request).store.read(
        lambda c: orders.list_orders(c, node, vm, state, limit))
    return web.json_response({"orders": found})


async def get_order(request: web.Request) -> web.Response:
    order_id = request.match_info["id"]
    found = await _svc(request).store.read(lambda c: orders.order_json(c, order_id))
    if found is None:
        raise ApiError(404, "not_found", f"no order {order_id!r}")
    return web.json_response(found)


def _pattern(regex: re.Pattern[str]) -> str:
    """A Python regex the API matches whole, as an ECMA 262 pattern (anchored)."""
    return f"^(?:{regex.pattern})$"


def _names(regex: re.Pattern[str]) -> dict[str, Any]:
    return {"type": "array", "maxItems": placement.MAX_ITEMS,
            "items": {"type": "string", "pattern": _pattern(regex)}}


_VM_BODY: dict[str, Any] = {
    "type": "object", "required": ["name", "vcpus", "memory_mib"],
    "properties": {
        "name": {"type": "string", "pattern": _pattern(vms.VM_NAME),
                 "description": "a lower-case DNS label, unique among the fleet's VMs"},
        "vcpus": {"type": "integer", "minimum": 1, "maximum": 64},
        "memory_mib": {"type": "integer", "minimum": 64, "maximum": 1 << 20},
        "disk_gib": {"type": "integer", "minimum": 0, "maximum": 1 << 16, "default": 0},
        "on_node_loss": {"type": "string", "enum": ["wait", "restart"], "default": "wait",
                         "description": "restart: elsewhere, once the lost node has stopped"
                                        " it"},
        "boot": {"type": "object", "properties": {
            "image": {"type": "string"}, "kernel": {"type": "string"},
            "initrd": {"type": "string"}, "cmdline": {"type": "string"}}},
        "placement": {"type": "object", "additionalProperties": False, "properties": {
            "countries": _names(placement.COUNTRY), "providers": _names(placement.NAME),
            "sites": _names(placement.NAME),
            "labels": {"type": "object", "maxProperties": placement.MAX_LABELS,
                       "additionalProperties": {"type": "string",
                                                "pattern": _pattern(placement.LABEL_VALUE)}},
            "profile": {"type": "string", "nullable": True},
            "anti_affinity": {"type": "string", "nullable": True,
                              "pattern": _pattern(placement.GROUP)}}},
    },
}
_OPERATE = ("admin", "operator")
_MOVE_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "to": {"type": "string", "description": "the destination node (default: placement)"},
        "mode": {"type": "string", "enum": ["live", "cold"]},
        "max_downtime_ms": {"type": "integer", "minimum": 1, "maximum": 60_000,
                            "default": 300},
        "bandwidth_mib_s": {"type": "integer", "minimum": 0, "maximum": 1 << 20, "default": 0,
                            "description": "0: no limit"},
        "auto_converge": {"type": "boolean", "default": True},
        "postcopy": {"type": "boolean", "default": False},
        "timeout_s": {"type": "integer", "minimum": 1, "maximum": 86_400, "default": 300,
                      "description": "past it the migration is aborted; the VM stays"},
    },
}
_VM_404 = {404: "no such VM"}
_NO_SIGNER = {503: "this aggregator has no order-signing key"}
_VM_ACTED = {202: "ordered", **_VM_404, **_NO_SIGNER,
             409: "not now: the VM is on no node, being deleted, or moving"}
_REASON_BODY: dict[str, Any] = {
    "type": "object", "properties": {"reason": {"type": "string", "maxLength": 500,
                                                "description": "for the audit trail"}}}
_LIMIT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 10000}

_NODE_404 = {404: "no such node"}
ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", healthz, PUBLIC, "Liveness of the aggregator"),
    Route("GET", "/metrics", metrics, PUBLIC, "Fleet and ingest figures (Prometheus text)"),
    Route("GET", "/api/v1/openapi.json", openapi, ALL_ROLES, "This API's OpenAPI description"),
    Route("GET", "/api/v1/nodes", list_nodes, ALL_ROLES, "Every node with status and capacity"),
    Route("GET", "/api/v1/nodes/{id}", get_node, ALL_ROLES,
          "One node with its latest host and per-VM figures, gaps and events",
          responses=_NODE_404),
    Route("GET", "/api/v1/nodes/{id}/telemetry", node_telemetry, ALL_ROLES,
          "A node's telemetry samples and roll-ups",
          query=(("since", "start (unix seconds or ISO 8601), default one hour ago"),
                 ("until", "end (unix seconds or ISO 8601), default now"),
                 ("metric", "host metric(s) to return, comma-separated or repeated",
                  {"type": "string", "enum": list(queries.HOST_METRICS)}),
                 ("limit", "most recent samples to return, 1-10000 (default 1000)", _LIMIT)),
          responses={400: "bad query", **_NODE_404}),
    Route("POST", "/api/v1/enrollment-tokens", create_enrollment_token, ("admin", "technician"),
          "A one-time token that enrolls one node at a site",
          body={"type": "object", "required": ["site", "country", "provider", "profile"],
                "properties": {"site": {"type": "string", "pattern": _pattern(enrollment.LABEL)},
                               "country": {"type": "string",
                                           "pattern": _pattern(enrollment.COUNTRY)},
                               "provider": {"type": "string",
                                            "pattern": _pattern(enrollment.LABEL)},
                               "profile": {"type": "string"},
                               "ttl_seconds": {"type": "number", "minimum": 60,
                                               "maximum": 30 * 86400},
                               "node_id": {"type": "string", "description":
                                           "bind the token to this node id: re-enrolls an"
                                           " enrolled node"}}},
          responses={201: "token created", 400: "bad request"}),
    Route("GET", "/api/v1/enrollment-tokens", list_enrollment_tokens, ("admin", "technician"),
          "Every enrollment token with its scope and state (never the token itself)",
          query=(("state", "only tokens in this state",
                  {"type": "string", "enum": ["active", "used", "expired", "withdrawn"]}),),
          responses={400: "bad query"}),
    Route("DELETE", "/api/v1/enrollment-tokens/{id}", withdraw_enrollment_token,
          ("admin", "technician"), "Withdraw an unused enrollment token",
          responses={404: "no such token", 409: "the token was used already"}),
    Route("GET", "/api/v1/ca", ca_certificate, PUBLIC,
          "The fleet CA certificate, for nodes to check against their pinned fingerprint"),
    Route("POST", "/api/v1/enroll", enroll_node, PUBLIC,
          "A node trades its enrollment token and CSR for a certificate",
          body={"type": "object", "required": ["token", "node_id", "csr"],
                "properties": {"token": {"type": "string"}, "node_id": {"type": "string"},
                               "csr": {"type": "string"}, "inventory": {"type": "object"},
                               "facts": {"type": "object"}}},
          responses={201: "enrolled", 400: "bad request", 403: "token refused",
                     409: "node already enrolled", 422: "the host does not meet its profile"}),
    Route("POST", "/api/v1/nodes/{id}/revoke", revoke_node, ("admin", "operator"),
          "Revoke a node: its certificates go into the CRL and its broker session is dropped",
          body=_REASON_BODY, body_required=False, responses=_NODE_404),
    Route("POST", "/api/v1/nodes/{id}/cordon", _cordon(True), ("admin", "operator"),
          "Cordon a node: nothing new is placed there; what runs stays",
          body=_REASON_BODY, body_required=False, responses=_NODE_404),
    Route("POST", "/api/v1/nodes/{id}/uncordon", _cordon(False), ("admin", "operator"),
          "Uncordon a node: placement may use it again", body=_REASON_BODY,
          body_required=False, responses=_NODE_404),
    Route("POST", "/api/v1/nodes/{id}/drain", drain_node, ("admin", "operator"),
          "Drain a node: cordon it and move every VM off (live where possible), a few at a"
          " time", body={**_MOVE_BODY, "properties": {
              **_MOVE_BODY["properties"], "mode": {"type": "string",
                                                   "enum": ["auto", "live", "cold"]},
              "parallel": {"type": "integer", "minimum": 1, "maximum": 32, "default": 2}}},
          body_required=False,
          responses={202: "draining (see GET /api/v1/nodes/{id}/drain)", **_NODE_404,
                     409: "the node cannot be drained now (with the reason)",
                     503: "this aggregator has no order-signing key"}),
    Route("GET", "/api/v1/nodes/{id}/drain", get_drain, ALL_ROLES,
          "The node's latest drain: each VM moved, moving, waiting or failed (and why)",
          responses={404: "the node has not been drained"}),
    Route("GET", "/api/v1/audit", audit_events, ("admin", "operator"),
          "The audit trail: enrollments, renewals, revocations, token use, newest first",
          query=(("since", "from this time (unix seconds or ISO 8601)"),
                 ("action", "an action (e.g. node.revoke) or a prefix (node)"),
                 ("subject", "what was acted on, e.g. a node id"),
                 ("limit", "most recent events to return, 1-10000 (default 200)", _LIMIT)),
          responses={400: "bad query"}),
    Route("POST", "/api/v1/api-tokens", create_api_token, ("admin",),
          "A bearer token for a role",
          body={"type": "object", "required": ["role"],
                "properties": {"role": {"type": "string", "enum": list(ROLES)},
                               "name": {"type": "string"}}},
          responses={201: "token created", 400: "bad request"}),
    Route("GET", "/api/v1/images", list_images, ALL_ROLES,
          "The fleet's images: name, format, size, sha256"),
    Route("POST", "/api/v1/images", add_image, _OPERATE,
          "Register an image: a file on the aggregator, or uploaded as application/octet-stream"
          " with ?name=&format=",
          body={"type": "object", "required": ["name", "path"],
                "properties": {"name": {"type": "string", "pattern": _pattern(images.IMAGE_NAME)},
                               "path": {"type": "string",
                                        "description": "an absolute path (admin only)"},
                               "format": {"type": "string", "enum": list(images.FORMATS)}}},
          other_bodies={"application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}}},
          query=(("name", "with an upload: the image's name",
                  {"type": "string", "pattern": _pattern(images.IMAGE_NAME)}),
                 ("format", "with an upload: its format (default: what the file is)",
                  {"type": "string", "enum": list(images.FORMATS)})),
          responses={201: "registered", 400: "bad request",
                     403: "a file inside the data directory, or a role other than admin",
                     409: "the name has other content", 413: "larger than images.max_bytes",
                     422: "the file cannot be read, or is not a regular file"}),
    Route("GET", "/api/v1/vms", list_vms, ALL_ROLES, "Every VM: where it is, desired and actual"
          " state", query=(("node", "only the VMs on this node"),)),
    Route("POST", "/api/v1/vms", create_vm, _OPERATE,
          "Create a VM: placed under its policy and ordered created there",
          body=_VM_BODY, responses={202: "ordered: {id, node, order}", 400: "bad request",
                                    409: "fits nowhere (with every node's reasons), or the"
                                         " name is taken",
                                    503: "this aggregator has no order-signing key"}),
    Route("POST", "/api/v1/placement/dry-run", placement_dry_run, ALL_ROLES,
          "Where a VM would go: ranked candidates and every other node with its reasons",
          body=_VM_BODY, responses={400: "bad request"}),
    Route("GET", "/api/v1/vms/{id}", get_vm, ALL_ROLES,
          "One VM (by id or name) with its order history", responses=_VM_404),
    Route("DELETE", "/api/v1/vms/{id}", _vm_action("delete"), _OPERATE,
          "Delete a VM: ordered off its node; then it answers 404", responses=_VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/start", _vm_action("start"), _OPERATE, "Start a VM",
          responses=_VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/stop", _vm_action("stop"), _OPERATE,
          "Stop a VM (shutdown, then power off after the node's timeout)",
          responses=_VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/reboot", _vm_action("reboot"), _OPERATE, "Reboot a VM",
          responses=_VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/migrate", migrate_vm, _OPERATE,
          "Move a VM to another node: live (default) or cold, to the node named or where"
          " placement picks under the VM's policy; both nodes check the move",
          body=_MOVE_BODY,
          body_required=False,
          responses={202: "the move has begun (see GET /api/v1/moves/{id})", **_VM_404,
                     **_NO_SIGNER,
                     409: "the VM cannot move now, or no node can take it (with reasons)"}),
    Route("GET", "/api/v1/moves", list_moves, ALL_ROLES, "Moves of VMs, newest first",
          query=(("vm", "a VM's id or name"),
                 ("state", "open (any of the steps before the end), or one state",
                  {"type": "string",
                   "enum": ["open", *moves.OPEN_STATES, "succeeded", "failed"]}),
                 ("limit", "1-10000 (default 200)", _LIMIT)),
          responses={400: "bad query", 404: "no such VM (the vm parameter)"}),
    Route("GET", "/api/v1/moves/{id}", get_move, ALL_ROLES,
          "One move: its step, the migration's progress while it runs, its result (downtime,"
          " duration, bytes) and its orders", responses={404: "no such move"}),
    Route("GET", "/api/v1/vms/{id}/residency", vm_residency, ALL_ROLES,
          "Where the VM and its disks lived, hash-chained and checked on every read",
          responses=_VM_404),
    Route("GET", "/api/v1/residency/verify", verify_residency, ("admin", "operator"),
          "Check every VM's residency chain end to end"),
    Route("GET", "/api/v1/orders", list_orders, ALL_ROLES, "Orders, newest first",
          query=(("node", "only this node's"), ("vm", "only this VM's"),
                 ("state", "only orders in this state",
                  {"type": "string", "enum": [*orders.OPEN, *orders.FINAL]}),
                 ("limit", "at most this many, 1-10000 (default 200)", _LIMIT)),
          responses={400: "bad query"}),
    Route("GET", "/api/v1/orders/{id}", get_order, ALL_ROLES,
          "One order with its state history and the node's result",
          responses={404: "no such order"}),
    Route("GET", "/api/v1/api-tokens", list_api_tokens, ("admin",),
          "Every API token with its role and state (never the token itself)"),
    Route("DELETE", "/api/v1/api-tokens/{id}", revoke_api_token, ("admin",),
          "Revoke an API token",
          responses={404: "no such token", 409: "the last admin token"}),
)


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        "additionalProperties": True}},
}
_ERROR = {"$ref": "#/components/schemas/Error"}
_TEXT_ROUTES = frozenset({"/metrics"})


def _statuses(r: Route) -> dict[int, str]:
    """Every status the route can answer: its own, and those every route of its kind can."""
    out = {200: "ok", **r.responses}
    if any(code in out for code in (201, 202)) and 200 not in r.responses:
        del out[200]
    if r.body is not None:
        out.setdefault(400, "the body is not valid JSON, or breaks the schema")
        out.setdefault(413, "the body is larger than 1 MiB")
    if r.query:
        out.setdefault(400, "a query parameter is not valid")
    if "{id}" in r.path:
        out.setdefault(404, "not found")
    if r.roles:
        out[401] = "missing or invalid token"
        out[403] = "role not allowed"
    return dict(sorted(out.items()))


def _response(r: Route, code: int, text: str) -> dict[str, Any]:
    if code >= 400:
        return {"description": text, "content": {"application/json": {"schema": _ERROR}}}
    if r.path in _TEXT_ROUTES:
        return {"description": text, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {"description": text, "content": {"application/json": {"schema": {"type": "object"}}}}


def openapi_document(routes: tuple[Route, ...]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "responses": {str(code): _response(r, code, text)
                          for code, text in _statuses(r).items()},
        }
        if r.roles:
            op["security"] = [{"bearer": []}]
            op["x-roles"] = list(r.roles)
        params = [
            {"name": q[0], "in": "query", "required": False, "description": q[1],
             "schema": q[2] if len(q) == 3 else {"type": "string"}}
            for q in r.query
        ]
        if "{id}" in r.path:
            params.insert(0, {"name": "id", "in": "path", "required": True,
                              "schema": {"type": "string"}})
        if params:
            op["parameters"] = params
        if r.body is not None:
            content: dict[str, Any] = {"application/json": {"schema": r.body}}
            content.update(r.other_bodies)
            op["requestBody"] = {"required": r.body_required, "content": content}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "virt8ra aggregator API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": {"Error": _ERROR_SCHEMA}},
        "paths": paths,
    }


# --- middleware -----------------------------------------------------------------------------

ROLE_KEY = web.RequestKey("role", str)


async def _role(request: web.Request) -> str:
    return str(request.get(ROLE_KEY, ""))


def _actor(request: web.Request) -> str:
    return str(request.get(ACTOR_KEY, "anonymous"))


async def _identity(request: web.Request) -> tuple[int, str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = hash_secret(token.strip())
    return await _svc(request).store.read(lambda c: queries.token_identity(c, digest))


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    route: Route | None = getattr(request.match_info.route, "virt8ra_route", None)
    try:
        if route is not None and route.roles:
            identity = await _identity(request)
            if identity is None:
                return error(401, "unauthorized", "a valid bearer token is required")
            token_id, name, role = identity
            request[ACTOR_KEY] = f"token:{token_id}:{name}"
            request[ROLE_KEY] = role
            if role not in route.roles:
                await _audit_request(request, route, 403)
                return error(403, "forbidden", f"role {role!r} may not {route.method} {route.path}")
        response = await _handle(request, handler)
    except web.HTTPException as exc:  # the body reader's 413, rendered by json_errors
        if route is not None and route.roles and route.method != "GET":
            await _audit_request(request, route, exc.status)
        raise
    if route is not None and route.roles and route.method != "GET":
        await _audit_request(request, route, response.status)
    return response


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error(exc.status, exc.code, exc.message)
    except Refused as exc:
        response = error(exc.status, exc.code, str(exc))
        if exc.detail:
            response = web.json_response(
                {"error": {"code": exc.code, "message": str(exc), **exc.detail}},
                status=exc.status)
        return response


async def _audit_request(request: web.Request, route: Route, status: int) -> None:
    """Every use of an API token to change something, allowed or not, is on record."""
    now, actor = time.time(), _actor(request)
    outcome = "ok" if status < 400 else ("forbidden" if status == 403 else "failed")
    await _svc(request).store.write(lambda db: audit.record(
        db, now, actor, "api.request", request.path, outcome,
        method=route.method, route=route.path, status=status,
    ))


def make_app(services: Services) -> web.Application:
    app = web.Application(middlewares=[json_errors, guard], client_max_size=1 << 20)
    app[SERVICES] = services
    for r in ROUTES:
        resource_route = app.router.add_route(r.method, r.path, r.handler)
        resource_route.virt8ra_route = r  # type: ignore[attr-defined]
    return app
