"""Handlers for the fleet's nodes: listing, telemetry, revocation, cordons and drains, and the
service's own health and figures."""

from __future__ import annotations

import time

from aiohttp import web

from aggregator.api.common import (
    ApiError,
    Handler,
    actor_of,
    move_context,
    node_id_of,
    object_body,
    query_time,
    reason_body,
    services,
)
from aggregator.api.metrics import render_metrics
from aggregator.errors import body_of
from aggregator.fleet import queries
from aggregator.trust import nodes as trust
from aggregator.workloads import moves
from aggregator.workloads.moves_settings import DrainBody, MoveSettings


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    svc = services(request)
    fleet = await svc.store.read(
        lambda c: queries.fleet_figures(c, time.time(), svc.heartbeat_factor, svc.min_timeout_s)
    )
    body = render_metrics(svc.metrics(), fleet)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def list_nodes(request: web.Request) -> web.Response:
    svc = services(request)
    nodes = await svc.store.read(
        lambda c: queries.list_nodes(
            c, time.time(), svc.heartbeat_factor, svc.min_timeout_s, svc.profiles
        )
    )
    return web.json_response({"nodes": nodes})


async def get_node(request: web.Request) -> web.Response:
    svc = services(request)
    node_id = node_id_of(request)
    node = await svc.store.read(
        lambda c: queries.node_detail(
            c, node_id, time.time(), svc.heartbeat_factor, svc.min_timeout_s, svc.profiles
        )
    )
    if node is None:
        raise ApiError(404, "not_found", f"no node {node_id!r}")
    return web.json_response(node)


async def node_telemetry(request: web.Request) -> web.Response:
    svc = services(request)
    node_id = node_id_of(request)
    since = query_time(request, "since")
    until = query_time(request, "until")
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


async def revoke_node(request: web.Request) -> web.Response:
    svc = services(request)
    node_id = node_id_of(request)
    reason = await reason_body(request)
    result = await svc.revocation.revoke(node_id, actor_of(request), reason)
    return web.json_response(result)


def cordon(cordoned: bool) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        svc = services(request)
        node_id = node_id_of(request)
        reason = await reason_body(request)
        now, actor = time.time(), actor_of(request)
        done = await svc.store.write(
            lambda db: trust.set_cordon(db, node_id, cordoned, now, actor, reason))
        return web.json_response(done)

    handler.__name__ = "cordon_node" if cordoned else "uncordon_node"
    return handler


async def drain_node(request: web.Request) -> web.Response:
    svc, node_id = services(request), node_id_of(request)
    body = body_of(DrainBody, await object_body(request))
    settings, parallel = MoveSettings.of(body), body.parallel
    ctx, now, actor = move_context(svc), time.time(), actor_of(request)
    result = await svc.store.write(lambda db: moves.drain(
        db, ctx, node_id, settings, parallel, now, actor))
    svc.orders_due.set()
    return web.json_response(result, status=202)


async def get_drain(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    found = await services(request).store.read(lambda c: moves.drain_json(c, node_id))
    if found is None:
        raise ApiError(404, "not_found", f"node {node_id!r} has not been drained")
    return web.json_response(found)
