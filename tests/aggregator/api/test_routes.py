"""The REST API over real HTTP on loopback, with a real store: roles, OpenAPI, bad input."""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.api.routes import ROUTES
from aggregator.trust.tokens import ROLES
from tests.conftest import SPARE_API_TOKEN_ID, SPARE_ENROLLMENT_TOKEN_ID, Api

TOKEN_BODY = {"site": "graz-tower-3", "country": "AT", "provider": "a1-telekom",
              "profile": "tower-5g", "ttl_seconds": 600}
VM_BODY = {"name": "cam-7", "vcpus": 1, "memory_mib": 256, "disk_gib": 1,
           "placement": {"countries": ["SI"]}}
# A valid request for every route: the role matrix below must cover each one.
EXAMPLES: dict[tuple[str, str], Any] = {  # (path, body), or a function of the Api to it
    ("GET", "/healthz"): ("/healthz", None),
    ("GET", "/metrics"): ("/metrics", None),
    ("GET", "/api/v1/openapi.json"): ("/api/v1/openapi.json", None),
    ("GET", "/api/v1/nodes"): ("/api/v1/nodes", None),
    ("GET", "/api/v1/nodes/{id}"): ("/api/v1/nodes/si-tower-01", None),
    ("GET", "/api/v1/nodes/{id}/telemetry"): ("/api/v1/nodes/si-tower-01/telemetry", None),
    ("POST", "/api/v1/enrollment-tokens"): ("/api/v1/enrollment-tokens", TOKEN_BODY),
    ("GET", "/api/v1/ca"): ("/api/v1/ca", None),
    ("POST", "/api/v1/enroll"): ("/api/v1/enroll", None),  # authorised by its body instead
    ("POST", "/api/v1/api-tokens"): ("/api/v1/api-tokens", {"role": "viewer", "name": "x"}),
    ("GET", "/api/v1/api-tokens"): ("/api/v1/api-tokens", None),
    ("DELETE", "/api/v1/api-tokens/{id}"): (f"/api/v1/api-tokens/{SPARE_API_TOKEN_ID}", None),
    ("GET", "/api/v1/enrollment-tokens"): ("/api/v1/enrollment-tokens?state=active", None),
    ("DELETE", "/api/v1/enrollment-tokens/{id}"):
        (f"/api/v1/enrollment-tokens/{SPARE_ENROLLMENT_TOKEN_ID}", None),
    ("POST", "/api/v1/nodes/{id}/revoke"):
        ("/api/v1/nodes/at-stolen-01/revoke", {"reason": "stolen from the tower"}),
    ("GET", "/api/v1/audit"): ("/api/v1/audit?action=node&limit=5", None),
    ("POST", "/api/v1/nodes/{id}/cordon"): ("/api/v1/nodes/at-stolen-01/cordon",
                                            {"reason": "maintenance"}),
    ("POST", "/api/v1/nodes/{id}/uncordon"): ("/api/v1/nodes/at-stolen-01/uncordon", None),
    ("GET", "/api/v1/images"): ("/api/v1/images", None),
    # An upload: registering a file of the aggregator's host is for admin only (tested below).
    ("POST", "/api/v1/images"): ("/api/v1/images?name=tiny&format=raw", b"\0" * 4096),
    ("GET", "/api/v1/vms"): ("/api/v1/vms?node=si-rack-01", None),
    ("POST", "/api/v1/vms"): lambda api: ("/api/v1/vms", _vm_body()),
    ("POST", "/api/v1/placement/dry-run"): ("/api/v1/placement/dry-run", VM_BODY),
    ("GET", "/api/v1/vms/{id}"): lambda api: (f"/api/v1/vms/{api.ids['vm']}", None),
    ("DELETE", "/api/v1/vms/{id}"): lambda api: (f"/api/v1/vms/{_matrix_vm(api)}", None),
    ("POST", "/api/v1/vms/{id}/start"): lambda api: (f"/api/v1/vms/{api.ids['vm']}/start",
                                                     None),
    ("POST", "/api/v1/vms/{id}/stop"): lambda api: (f"/api/v1/vms/{api.ids['vm']}/stop", None),
    ("POST", "/api/v1/vms/{id}/reboot"): lambda api: (f"/api/v1/vms/{api.ids['vm']}/reboot",
                                                      None),
    ("GET", "/api/v1/vms/{id}/residency"): lambda api: (
        f"/api/v1/vms/{api.ids['vm']}/residency", None),
    ("GET", "/api/v1/residency/verify"): ("/api/v1/residency/verify", None),
    ("GET", "/api/v1/orders"): ("/api/v1/orders?node=si-rack-01&limit=5", None),
    ("GET", "/api/v1/orders/{id}"): lambda api: (f"/api/v1/orders/{api.ids['order']}", None),
    ("POST", "/api/v1/vms/{id}/migrate"): lambda api: (
        f"/api/v1/vms/{api.ids[f'mover-{1 + next(_movers) % 3}']}/migrate",
        {"mode": "cold"}),
    ("GET", "/api/v1/moves"): ("/api/v1/moves?state=open&limit=5", None),
    ("GET", "/api/v1/moves/{id}"): lambda api: (f"/api/v1/moves/{api.ids['move']}", None),
    ("POST", "/api/v1/nodes/{id}/drain"): ("/api/v1/nodes/si-tower-01/drain",
                                           {"parallel": 1}),
    ("GET", "/api/v1/nodes/{id}/drain"): ("/api/v1/nodes/si-tower-01/drain", None),
}
# Each allowed call moves a VM of its own (a VM being moved cannot be moved again).
_movers = itertools.count(1)
_names = itertools.count(1)


def _vm_body() -> dict[str, Any]:
    return {**VM_BODY, "name": f"matrix-{next(_names)}"}


def _matrix_vm(api: Api) -> str:
    """A VM of the fixture's, for a DELETE (deleting it twice is fine: the same order)."""
    return api.ids["doomed"]


def _tiny_image() -> Path:
    path = Path(tempfile.gettempdir()) / "virt8ra-api-test-image.raw"
    path.write_bytes(b"\0" * 4096)
    return path


def test_every_route_has_an_example_and_is_documented() -> None:
    assert {(r.method, r.path) for r in ROUTES} == set(EXAMPLES)


async def test_openapi_describes_every_route_that_exists(api: Api) -> None:
    status, doc = await api.call("GET", "/api/v1/openapi.json", api.tokens["viewer"])
    assert status == 200
    assert doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {
        (route.method, route.resource.canonical)
        for route in api.client.server.app.router.routes()  # type: ignore[union-attr]
        if route.method != "HEAD" and route.resource is not None
    }
    assert documented == served


MATRIX = [(r, role) for r in ROUTES for role in (*ROLES, None, "bogus")]


@pytest.mark.parametrize(("route", "role"), MATRIX,
                         ids=[f"{r.method} {r.path} as {role}" for r, role in MATRIX])
async def test_role_matrix(api: Api, route: Any, role: str | None) -> None:
    example = EXAMPLES[(route.method, route.path)]
    path, body = example(api) if callable(example) else example
    token = api.tokens.get(role, "v8a_not-a-token") if role else None
    if isinstance(body, bytes):  # an upload
        status, answer = await api.call(route.method, path, token, raw=body)
    else:
        status, answer = await api.call(route.method, path, token, body)
    if not route.roles:  # public; enroll is authorised by the token in its body (none here)
        assert status == (400 if route.path == "/api/v1/enroll" else 200)
        return
    if role is None or role == "bogus":
        assert status == 401
        assert answer["error"]["code"] == "unauthorized"
    elif role in route.roles:
        assert 200 <= status < 300, answer
    else:
        assert status == 403
        assert answer["error"]["code"] == "forbidden"


async def test_registering_a_host_file_is_for_admin_and_never_the_data_directory(
        api: Api, root_dir: Path) -> None:
    body = {"name": "from-host", "path": str(_tiny_image()), "format": "raw"}
    status, answer = await api.call("POST", "/api/v1/images", api.tokens["operator"], body)
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    status, answer = await api.call("POST", "/api/v1/images", api.tokens["admin"], body)
    assert status == 201, answer
    # The data directory holds keys: never an image, whoever asks.
    secret = root_dir / "api-order-signing.key"
    status, answer = await api.call("POST", "/api/v1/images", api.tokens["admin"],
                                    {"name": "stolen", "path": str(secret)})
    assert (status, answer["error"]["code"]) == (403, "invalid_path")
    # A qcow2 image whose header names a backing file is refused, and nothing is kept.
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + (512).to_bytes(8, "big") + b"\0" * 492
    status, answer = await api.call("POST", "/api/v1/images?name=sneaky&format=qcow2",
                                    api.tokens["operator"], raw=header + b"/etc/shadow")
    assert (status, answer["error"]["code"]) == (400, "backing_file")
    status, answer = await api.call("GET", "/api/v1/images", api.tokens["viewer"])
    assert "sneaky" not in {i["name"] for i in answer["images"]}


async def test_undecodable_bearer_bytes_are_just_a_wrong_token(api: Api) -> None:
    # Sent as the bytes ff fe, which are not UTF-8: the server sees undecodable text.
    resp = await api.client.get("/api/v1/nodes", headers={"Authorization": "Bearer \xff\xfe"})
    assert resp.status == 401


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "code"),
    [
        ("POST", "/api/v1/enrollment-tokens", b"{not json", 400, "invalid_json"),
        ("POST", "/api/v1/enrollment-tokens", b"[1, 2]", 400, "invalid_request"),
        ("POST", "/api/v1/enrollment-tokens",
         json.dumps({**TOKEN_BODY, "country": "Slovenia"}).encode(), 400, "invalid_country"),
        ("POST", "/api/v1/enrollment-tokens",
         json.dumps({**TOKEN_BODY, "profile": "toaster"}).encode(), 400, "unknown_profile"),
        ("POST", "/api/v1/enrollment-tokens",
         json.dumps({**TOKEN_BODY, "ttl_seconds": True}).encode(), 400, "invalid_request"),
        ("POST", "/api/v1/enroll", b"\xff\xfe", 400, "invalid_json"),
        ("POST", "/api/v1/enroll", json.dumps({"token": "x", "node_id": "Bad Id",
                                                "csr": "x"}).encode(), 400, "invalid_node_id"),
        ("POST", "/api/v1/enroll", json.dumps({"token": "x", "node_id": "n1",
                                                "csr": "x"}).encode(), 403, "invalid_token"),
        ("GET", "/api/v1/nodes/nope", b"", 404, "not_found"),
        ("GET", "/api/v1/nodes/si-tower-01/telemetry?since=yesterday", b"", 400,
         "invalid_query"),
        ("GET", "/api/v1/nodes/si-tower-01/telemetry?metric=nope", b"", 400, "invalid_query"),
        ("GET", "/api/v1/nodes/si-tower-01/telemetry?limit=0", b"", 400, "invalid_query"),
        ("GET", "/api/v1/nodes/nope/telemetry", b"", 404, "not_found"),
        ("GET", "/api/v1/no-such-route", b"", 404, "not_found"),
        ("POST", "/api/v1/api-tokens", b'{"role": "viewer", "name": "\\ud800"}', 400,
         "invalid_json"),
        ("POST", "/api/v1/enroll", b'{"token": "\\ud800", "node_id": "n1", "csr": "x"}', 400,
         "invalid_json"),
        ("POST", "/api/v1/enrollment-tokens", b"[" * 100_000, 400, "invalid_json"),
        ("GET", "/api/v1/nodes/si-tower-01/telemetry?since=1e400", b"", 400, "invalid_query"),
        ("GET", "/api/v1/nodes/si-tower-01/telemetry?until=nan", b"", 400, "invalid_query"),
        ("DELETE", "/api/v1/nodes", b"", 405, "method_not_allowed"),
    ],
)
async def test_bad_input_gets_a_clear_json_error(api: Api, method: str, path: str, raw: bytes,
                                                 status: int, code: str) -> None:
    got, answer = await api.call(method, path, api.tokens["admin"], raw=raw)
    assert got == status, answer
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(["site", "country", "provider", "profile", "ttl_seconds", "token",
                          "node_id", "csr", "inventory", "role", "name"])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/api/v1/enrollment-tokens", "/api/v1/enroll",
                             "/api/v1/api-tokens"]),
       body=JSON | st.dictionaries(FIELDS, JSON, max_size=6))
async def test_no_request_body_yields_a_500(api: Api, path: str, body: Any) -> None:
    status, _ = await api.call("POST", path, api.tokens["admin"], body)
    assert status < 500


async def test_token_use_and_refusals_are_on_the_audit_trail(api: Api) -> None:
    status, made = await api.call("POST", "/api/v1/api-tokens", api.tokens["admin"],
                                  {"role": "operator", "name": "night shift"})
    assert status == 201
    status, _ = await api.call("POST", "/api/v1/api-tokens", api.tokens["viewer"],
                               {"role": "admin", "name": "escalation"})
    assert status == 403
    status, answer = await api.call("GET", "/api/v1/audit?limit=50", api.tokens["operator"])
    assert status == 200
    events = answer["events"]
    created = next(e for e in events if e["action"] == "api_token.create"
                   and e["subject"] == f"api-token:{made['id']}")
    assert created["actor"].endswith(":test admin")
    assert created["detail"] == {"role": "operator", "name": "night shift"}
    refused = next(e for e in events if e["action"] == "api.request"
                   and e["outcome"] == "forbidden")
    assert refused["actor"].endswith(":test viewer")
    assert refused["detail"]["route"] == "/api/v1/api-tokens"
    # Newest first, and the filters narrow it.
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)
    status, only = await api.call("GET", "/api/v1/audit?action=api_token",
                                  api.tokens["admin"])
    assert {e["action"] for e in only["events"]} <= {"api_token.create", "api_token.revoke"}
    assert created["id"] in {e["id"] for e in only["events"]}
    status, _ = await api.call("GET", "/api/v1/audit?limit=0", api.tokens["admin"])
    assert status == 400


async def test_the_last_admin_token_cannot_be_revoked(api: Api) -> None:
    status, answer = await api.call("GET", "/api/v1/api-tokens", api.tokens["admin"])
    admins = [t for t in answer["tokens"] if t["role"] == "admin" and t["state"] == "active"]
    assert "token_hash" not in answer["tokens"][0]
    assert len(admins) == 1  # the session's only admin token
    status, err = await api.call("DELETE", f"/api/v1/api-tokens/{admins[0]['id']}",
                                 api.tokens["admin"])
    assert (status, err["error"]["code"]) == (409, "last_admin")
    status, _ = await api.call("DELETE", "/api/v1/api-tokens/99999", api.tokens["admin"])
    assert status == 404
    status, _ = await api.call("DELETE", "/api/v1/api-tokens/not-a-number", api.tokens["admin"])
    assert status == 404


@pytest.mark.parametrize("raw", ["%C2%B2", "%D9%A3", "1e3", "-1", "99999999999999999999"])
async def test_odd_ids_are_not_found_not_errors(api: Api, raw: str) -> None:
    for path in (f"/api/v1/api-tokens/{raw}", f"/api/v1/enrollment-tokens/{raw}"):
        status, answer = await api.call("DELETE", path, api.tokens["admin"])
        assert status == 404, answer


async def test_only_admin_and_operator_bind_a_token_to_a_node(api: Api) -> None:
    body = {**TOKEN_BODY, "node_id": "si-tower-01"}
    status, answer = await api.call("POST", "/api/v1/enrollment-tokens",
                                    api.tokens["technician"], body)
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    status, answer = await api.call("POST", "/api/v1/enrollment-tokens", api.tokens["admin"],
                                    body)
    assert status == 201
    assert answer["node_id"] == "si-tower-01"


@pytest.mark.parametrize(("boot", "code"), [
    ({"kernel": "k", "cmdline": "console=ttyS0\nroot=/dev/evil"}, "invalid_request"),
    ({"kernel": "k", "cmdline": "console=ttyS0\x00"}, "invalid_request"),
    ({"image": "no-such-image"}, "unknown_image"),
])
async def test_a_vm_that_cannot_boot_is_refused_at_the_api(api: Api, boot: dict[str, str],
                                                           code: str) -> None:
    status, answer = await api.call("POST", "/api/v1/vms", api.tokens["operator"],
                                    {"name": "badboot", "vcpus": 1, "memory_mib": 128,
                                     "boot": boot})
    assert (status, answer["error"]["code"]) == (400, code)


async def test_boot_images_must_have_the_right_format(api: Api) -> None:
    status, _ = await api.call("POST", "/api/v1/images?name=a-kernel&format=kernel",
                               api.tokens["admin"], raw=b"\x7fELF" + b"\0" * 60)
    assert status == 201
    status, answer = await api.call("POST", "/api/v1/vms", api.tokens["operator"],
                                    {"name": "kernel-as-disk", "vcpus": 1, "memory_mib": 128,
                                     "boot": {"image": "a-kernel"}})
    assert (status, answer["error"]["code"]) == (400, "wrong_image_format")
