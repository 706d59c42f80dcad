"""What every handler of the API shares: the route record, the services the handlers use, request
parsing (JSON bodies, query parameters, ids) and who is acting."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from aiohttp import web

from aggregator.errors import body_of
from aggregator.fleet import queries
from aggregator.store.writer import Store
from aggregator.trust.pki import CertificateAuthority, OrderSigner
from aggregator.trust.tokens import ROLES
from aggregator.workloads import images, moves, vms
from contract.profiles import Profile
from plumbing.shapes import Rule

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


class Revoker(Protocol):
    """Cutting nodes off (:class:`aggregator.trust.revocation.Revocation`; tests pass a fake
    with the database half only)."""

    async def revoke(self, node: str, actor: str, reason: str) -> dict[str, Any]:
        """Revoke a node: its certificates into the CRL, the broker reloaded, its session
        taken over; what was done."""

    async def superseded(self, node: str) -> None:
        """The node enrolled again: its earlier certificates are revoked, so renew the CRL and
        cut off whoever still uses them."""


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
    revocation: Revoker
    signer: OrderSigner | None = None  # None: this API cannot order anything
    order_ttl_s: float = 600.0
    images_dir: Path = Path("images")
    images_url: str = ""  # the image service nodes fetch from (https, node certificates)
    max_image_bytes: int = images.MAX_IMAGE_BYTES
    orders_due: asyncio.Event = field(default_factory=asyncio.Event)  # wakes the dispatcher


SERVICES = web.AppKey("services", Services)


ACTOR_KEY = web.RequestKey("actor", str)  # who is acting, for the audit trail


ROLE_KEY = web.RequestKey("role", str)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


async def json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > 1 << 20:
        raise ApiError(413, "too_large", "request body larger than 1 MiB")
    try:
        body = json.loads(await request.read())
        # Lone surrogates ("\ud800") are valid JSON escapes but no text can be stored.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        raise ApiError(400, "invalid_json", "request body is not valid JSON text") from None
    return body


def query_time(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return queries.parse_time(raw)
    except ValueError:
        raise ApiError(
            400, "invalid_query", f"{name} must be unix seconds or an ISO 8601 time"
        ) from None


def int_id(request: web.Request, what: str) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(404, "not_found", f"no {what} {raw!r}")
    return int(raw)


async def object_body(request: web.Request) -> dict[str, Any]:
    """A JSON object body; an empty body is ``{}``."""
    if not request.can_read_body:
        return {}
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    return body


def query_limit(raw: str) -> int:
    try:
        limit = int(raw)
        if not 1 <= limit <= 10000:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid_query", "limit must be an integer from 1 to 10000") from None
    return limit


async def role_of(request: web.Request) -> str:
    return str(request.get(ROLE_KEY, ""))


def actor_of(request: web.Request) -> str:
    return str(request.get(ACTOR_KEY, "anonymous"))


def node_id_of(request: web.Request) -> str:
    return request.match_info["id"]


def liveness_of(svc: Services) -> vms.Liveness:
    return vms.Liveness(svc.heartbeat_factor, svc.min_timeout_s)


def signer_of(svc: Services) -> OrderSigner:
    if svc.signer is None:
        raise ApiError(503, "no_signer", "this aggregator has no order-signing key")
    return svc.signer


def move_context(svc: Services) -> moves.Context:
    return moves.Context(signer_of(svc), svc.profiles, liveness_of(svc), svc.order_ttl_s)


async def reason_body(request: web.Request) -> str:
    """The optional ``{"reason": text}`` body of a node action, for the audit trail."""
    return body_of(ReasonBody, await object_body(request)).reason[:500]


@dataclass(frozen=True)
class ReasonBody:
    """The optional body of a node action (revoke, cordon, uncordon)."""

    reason: Annotated[str, Rule(description="for the audit trail (at most 500 characters"
                                            " are kept)")] = ""
