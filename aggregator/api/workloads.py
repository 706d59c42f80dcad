"""Handlers for workloads: images, VMs, placement, moves, orders and residency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from aggregator.api.common import (
    ApiError,
    Handler,
    actor_of,
    json_body,
    liveness_of,
    move_context,
    object_body,
    query_limit,
    role_of,
    services,
    signer_of,
)
from aggregator.errors import Refused, body_of
from aggregator.store.tx import Tx
from aggregator.trust import audit
from aggregator.workloads import images, moves, orders, residency, vms
from aggregator.workloads.moves_settings import MoveBody, MoveSettings


async def list_images(request: web.Request) -> web.Response:
    return web.json_response({"images": await services(request).store.read(images.list_images)})


async def add_image(request: web.Request) -> web.Response:
    """JSON ``{"name", "path", "format"}`` (a file on the aggregator), or the image itself as
    ``application/octet-stream`` with ``?name=&format=``."""
    svc = services(request)
    if request.content_type == "application/octet-stream":
        name = images.check_name(request.query.get("name"))
        fmt = request.query.get("format", "")

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(1 << 20):
                yield chunk

        sha256, size, path = await images.store_stream(chunks(), svc.images_dir,
                                                       svc.max_image_bytes)
    else:
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise ApiError(400, "invalid_request",
                           'body must be {"name", "path", "format"} or an upload')
        if await role_of(request) != "admin":  # it reads a file of the aggregator's host
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
    now, actor = time.time(), actor_of(request)

    def record(db: Any) -> dict[str, Any]:
        out = images.register(db, name, fmt, sha256, size, path, now)
        audit.record(db, now, actor, "image.register", name, sha256=sha256, size=size)
        return out

    return web.json_response(await svc.store.write(record), status=201)


async def list_vms(request: web.Request) -> web.Response:
    svc, node, now = services(request), request.query.get("node", ""), time.time()
    return web.json_response(
        {"vms": await svc.store.read(lambda c: vms.list_vms(c, node, now, liveness_of(svc)))})


async def create_vm(request: web.Request) -> web.Response:
    svc = services(request)
    req = vms.VmRequest.from_json(await json_body(request))
    signer, now, actor = signer_of(svc), time.time(), actor_of(request)
    result = await svc.store.write(lambda db: vms.create(
        db, signer, req, now, svc.profiles, liveness_of(svc), svc.order_ttl_s, actor))
    svc.orders_due.set()
    return web.json_response(result, status=202)


async def placement_dry_run(request: web.Request) -> web.Response:
    svc = services(request)
    req = vms.VmRequest.from_json(await json_body(request))
    now = time.time()
    return web.json_response(await svc.store.read(
        lambda c: vms.dry_run(c, req, now, svc.profiles, liveness_of(svc))))


async def get_vm(request: web.Request) -> web.Response:
    svc, ref, now = services(request), request.match_info["id"], time.time()
    vm = await svc.store.read(lambda c: vms.get(c, ref, now, liveness_of(svc)))
    if vm is None:
        raise ApiError(404, "not_found", f"no VM {ref!r}")
    return web.json_response(vm)


def vm_action(action: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        svc = services(request)
        ref = request.match_info["id"]
        signer, now, actor = signer_of(svc), time.time(), actor_of(request)
        result = await svc.store.write(lambda db: vms.act(
            db, signer, vms.resolve(db, ref), action, now, svc.order_ttl_s, actor))
        svc.orders_due.set()
        return web.json_response(result, status=202)

    handler.__name__ = f"{action}_vm"
    return handler


async def migrate_vm(request: web.Request) -> web.Response:
    svc, ref = services(request), request.match_info["id"]
    body = body_of(MoveBody, await object_body(request))
    settings, to = MoveSettings.of(body), body.to
    ctx, now, actor = move_context(svc), time.time(), actor_of(request)
    result = await svc.store.write(lambda db: moves.start(
        db, ctx, vms.resolve(db, ref), to, settings, now, actor))
    svc.orders_due.set()
    return web.json_response(result, status=202)


async def list_moves(request: web.Request) -> web.Response:
    q = request.query
    state = q.get("state", "")
    allowed = ("open", *moves.OPEN_STATES, "succeeded", "failed")
    if state and state not in allowed:
        raise ApiError(400, "invalid_query", f"state must be one of {', '.join(allowed)}")
    limit = query_limit(q.get("limit", "200"))
    ref = q.get("vm", "")

    def read(c: Any) -> list[dict[str, Any]]:
        vm_id = vms.resolve(c, ref) if ref else ""
        return moves.list_moves(c, vm_id, state, limit)

    return web.json_response({"moves": await services(request).store.read(read)})


async def get_move(request: web.Request) -> web.Response:
    move_id = request.match_info["id"]
    found = await services(request).store.read(lambda c: moves.get(c, move_id))
    if found is None:
        raise ApiError(404, "not_found", f"no move {move_id!r}")
    return web.json_response(found)


async def vm_residency(request: web.Request) -> web.Response:
    ref = request.match_info["id"]

    def read(c: Tx) -> dict[str, Any]:
        vm_id = vms.resolve_any(c, ref)
        if vm_id is None:
            raise ApiError(404, "not_found", f"no VM {ref!r}")
        return {"vm": vm_id, **residency.verify(c, vm_id)}

    return web.json_response(await services(request).store.read(read))


async def verify_residency(request: web.Request) -> web.Response:
    chains = await services(request).store.read(residency.verify_all)
    return web.json_response({"chains": chains,
                              "all_valid": all(c["chain_valid"] for c in chains)})


async def list_orders(request: web.Request) -> web.Response:
    q = request.query
    state = q.get("state", "")
    if state and state not in (*orders.OPEN, *orders.FINAL):
        raise ApiError(400, "invalid_query",
                       f"state must be one of {', '.join((*orders.OPEN, *orders.FINAL))}")
    limit = query_limit(q.get("limit", "200"))
    node, vm = q.get("node", ""), q.get("vm", "")
    found = await services(request).store.read(
        lambda c: orders.list_orders(c, node, vm, state, limit))
    return web.json_response({"orders": found})


async def get_order(request: web.Request) -> web.Response:
    order_id = request.match_info["id"]
    found = await services(request).store.read(lambda c: orders.order_json(c, order_id))
    if found is None:
        raise ApiError(404, "not_found", f"no order {order_id!r}")
    return web.json_response(found)
