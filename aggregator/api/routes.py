"""The REST API (aiohttp): one route table that declares each route's roles and documentation.

The table is the single source for routing, authorisation and the OpenAPI description, so a
route cannot exist without being documented and guarded. Errors are JSON
``{"error": {"code", "message"}}`` (aggregator/api/http.py); bad input never yields a 500.
The handlers live by resource in nodes.py, trust.py and workloads.py; what they share in
common.py; the OpenAPI document is generated from this table by openapi.py.
"""

from __future__ import annotations

import time

from aiohttp import web

from aggregator.api.common import (
    ACTOR_KEY,
    ALL_ROLES,
    PUBLIC,
    ROLE_KEY,
    SERVICES,
    ApiError,
    Handler,
    Route,
    Services,
    actor_of,
    services,
)
from aggregator.api.http import error, json_errors
from aggregator.api.nodes import (
    cordon,
    drain_node,
    get_drain,
    get_node,
    healthz,
    list_nodes,
    metrics,
    node_telemetry,
    revoke_node,
)
from aggregator.api.openapi import (
    DRAIN_BODY,
    LIMIT,
    MOVE_BODY,
    NO_SIGNER,
    NODE_404,
    OPERATE,
    REASON_BODY,
    VM_404,
    VM_ACTED,
    VM_BODY,
    _pattern,
    openapi_document,
)
from aggregator.api.trust import (
    ApiTokenBody,
    EnrollmentTokenBody,
    audit_events,
    ca_certificate,
    create_api_token,
    create_enrollment_token,
    enroll_node,
    list_api_tokens,
    list_enrollment_tokens,
    revoke_api_token,
    withdraw_enrollment_token,
)
from aggregator.api.workloads import (
    add_image,
    create_vm,
    get_move,
    get_order,
    get_vm,
    list_images,
    list_moves,
    list_orders,
    list_vms,
    migrate_vm,
    placement_dry_run,
    verify_residency,
    vm_action,
    vm_residency,
)
from aggregator.errors import Refused
from aggregator.fleet import queries
from aggregator.trust import audit
from aggregator.trust.enrollment import (
    hash_secret,
)
from aggregator.workloads import images, moves, orders
from plumbing import shapes


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(ROUTES))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", healthz, PUBLIC, "Liveness of the aggregator"),
    Route("GET", "/metrics", metrics, PUBLIC, "Fleet and ingest figures (Prometheus text)"),
    Route("GET", "/api/v1/openapi.json", openapi, ALL_ROLES, "This API's OpenAPI description"),
    Route("GET", "/api/v1/nodes", list_nodes, ALL_ROLES, "Every node with status and capacity"),
    Route("GET", "/api/v1/nodes/{id}", get_node, ALL_ROLES,
          "One node with its latest host and per-VM figures, gaps and events",
          responses=NODE_404),
    Route("GET", "/api/v1/nodes/{id}/telemetry", node_telemetry, ALL_ROLES,
          "A node's telemetry samples and roll-ups",
          query=(("since", "start (unix seconds or ISO 8601), default one hour ago"),
                 ("until", "end (unix seconds or ISO 8601), default now"),
                 ("metric", "host metric(s) to return, comma-separated or repeated",
                  {"type": "string", "enum": list(queries.HOST_METRICS)}),
                 ("limit", "most recent samples to return, 1-10000 (default 1000)", LIMIT)),
          responses={400: "bad query", **NODE_404}),
    Route("POST", "/api/v1/enrollment-tokens", create_enrollment_token, ("admin", "technician"),
          "A one-time token that enrolls one node at a site",
          body=shapes.schema(EnrollmentTokenBody),
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
          body=REASON_BODY, body_required=False, responses=NODE_404),
    Route("POST", "/api/v1/nodes/{id}/cordon", cordon(True), ("admin", "operator"),
          "Cordon a node: nothing new is placed there; what runs stays",
          body=REASON_BODY, body_required=False, responses=NODE_404),
    Route("POST", "/api/v1/nodes/{id}/uncordon", cordon(False), ("admin", "operator"),
          "Uncordon a node: placement may use it again", body=REASON_BODY,
          body_required=False, responses=NODE_404),
    Route("POST", "/api/v1/nodes/{id}/drain", drain_node, ("admin", "operator"),
          "Drain a node: cordon it and move every VM off (live where possible), a few at a"
          " time", body=DRAIN_BODY,
          body_required=False,
          responses={202: "draining (see GET /api/v1/nodes/{id}/drain)", **NODE_404,
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
                 ("limit", "most recent events to return, 1-10000 (default 200)", LIMIT)),
          responses={400: "bad query"}),
    Route("POST", "/api/v1/api-tokens", create_api_token, ("admin",),
          "A bearer token for a role",
          body=shapes.schema(ApiTokenBody),
          responses={201: "token created", 400: "bad request"}),
    Route("GET", "/api/v1/images", list_images, ALL_ROLES,
          "The fleet's images: name, format, size, sha256"),
    Route("POST", "/api/v1/images", add_image, OPERATE,
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
    Route("POST", "/api/v1/vms", create_vm, OPERATE,
          "Create a VM: placed under its policy and ordered created there",
          body=VM_BODY, responses={202: "ordered: {id, node, order}", 400: "bad request",
                                    409: "fits nowhere (with every node's reasons), or the"
                                         " name is taken",
                                    503: "this aggregator has no order-signing key"}),
    Route("POST", "/api/v1/placement/dry-run", placement_dry_run, ALL_ROLES,
          "Where a VM would go: ranked candidates and every other node with its reasons",
          body=VM_BODY, responses={400: "bad request"}),
    Route("GET", "/api/v1/vms/{id}", get_vm, ALL_ROLES,
          "One VM (by id or name) with its order history", responses=VM_404),
    Route("DELETE", "/api/v1/vms/{id}", vm_action("delete"), OPERATE,
          "Delete a VM: ordered off its node; then it answers 404", responses=VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/start", vm_action("start"), OPERATE, "Start a VM",
          responses=VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/stop", vm_action("stop"), OPERATE,
          "Stop a VM (shutdown, then power off after the node's timeout)",
          responses=VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/reboot", vm_action("reboot"), OPERATE, "Reboot a VM",
          responses=VM_ACTED),
    Route("POST", "/api/v1/vms/{id}/migrate", migrate_vm, OPERATE,
          "Move a VM to another node: live (default) or cold, to the node named or where"
          " placement picks under the VM's policy; both nodes check the move",
          body=MOVE_BODY,
          body_required=False,
          responses={202: "the move has begun (see GET /api/v1/moves/{id})", **VM_404,
                     **NO_SIGNER,
                     409: "the VM cannot move now, or no node can take it (with reasons)"}),
    Route("GET", "/api/v1/moves", list_moves, ALL_ROLES, "Moves of VMs, newest first",
          query=(("vm", "a VM's id or name"),
                 ("state", "open (any of the steps before the end), or one state",
                  {"type": "string",
                   "enum": ["open", *moves.OPEN_STATES, "succeeded", "failed"]}),
                 ("limit", "1-10000 (default 200)", LIMIT)),
          responses={400: "bad query", 404: "no such VM (the vm parameter)"}),
    Route("GET", "/api/v1/moves/{id}", get_move, ALL_ROLES,
          "One move: its step, the migration's progress while it runs, its result (downtime,"
          " duration, bytes) and its orders", responses={404: "no such move"}),
    Route("GET", "/api/v1/vms/{id}/residency", vm_residency, ALL_ROLES,
          "Where the VM and its disks lived, hash-chained and checked on every read",
          responses=VM_404),
    Route("GET", "/api/v1/residency/verify", verify_residency, ("admin", "operator"),
          "Check every VM's residency chain end to end"),
    Route("GET", "/api/v1/orders", list_orders, ALL_ROLES, "Orders, newest first",
          query=(("node", "only this node's"), ("vm", "only this VM's"),
                 ("state", "only orders in this state",
                  {"type": "string", "enum": [*orders.OPEN, *orders.FINAL]}),
                 ("limit", "at most this many, 1-10000 (default 200)", LIMIT)),
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


async def _identity(request: web.Request) -> tuple[int, str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = hash_secret(token.strip())
    return await services(request).store.read(lambda c: queries.token_identity(c, digest))


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
    now, actor = time.time(), actor_of(request)
    outcome = "ok" if status < 400 else ("forbidden" if status == 403 else "failed")
    await services(request).store.write(lambda db: audit.record(
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
