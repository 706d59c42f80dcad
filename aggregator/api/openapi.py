"""The OpenAPI document, generated from the route table: request bodies, every status a route
can answer, and the error body."""

from __future__ import annotations

import re
from typing import Any

from aggregator.api.common import ReasonBody, Route
from aggregator.workloads import placement, vms
from aggregator.workloads.moves_settings import DrainBody, MoveBody
from plumbing import shapes


def _pattern(regex: re.Pattern[str]) -> str:
    """A Python regex the API matches whole, as an ECMA 262 pattern (anchored)."""
    return f"^(?:{regex.pattern})$"


def _names(regex: re.Pattern[str]) -> dict[str, Any]:
    return {"type": "array", "maxItems": placement.MAX_ITEMS,
            "items": {"type": "string", "pattern": _pattern(regex)}}


# The VM body from its shape; its placement as Policy.from_json reads it (which also refuses
# keys it does not know).
VM_BODY: dict[str, Any] = shapes.schema(vms.VmBody)
VM_BODY["properties"]["placement"] = {
    "type": "object", "additionalProperties": False, "nullable": True, "properties": {
        "countries": _names(placement.COUNTRY), "providers": _names(placement.NAME),
        "sites": _names(placement.NAME),
        "labels": {"type": "object", "maxProperties": placement.MAX_LABELS,
                   "additionalProperties": {"type": "string",
                                            "pattern": _pattern(placement.LABEL_VALUE)}},
        "profile": {"type": "string", "nullable": True},
        "anti_affinity": {"type": "string", "nullable": True,
                          "pattern": _pattern(placement.GROUP)}}}


OPERATE = ("admin", "operator")


# Bodies generated from the shapes that read them (plumbing/shapes.py).
MOVE_BODY: dict[str, Any] = shapes.schema(MoveBody)
DRAIN_BODY: dict[str, Any] = shapes.schema(DrainBody)


VM_404 = {404: "no such VM"}


NO_SIGNER = {503: "this aggregator has no order-signing key"}


VM_ACTED = {202: "ordered", **VM_404, **NO_SIGNER,
             409: "not now: the VM is on no node, being deleted, or moving"}


REASON_BODY: dict[str, Any] = shapes.schema(ReasonBody)


LIMIT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 10000}


NODE_404 = {404: "no such node"}


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
