"""Shared fixtures: a traversable temp root (the broker drops to its own user), throwaway CAs,
libvirt test-driver hosts from the hardware profiles, a running fleet rig."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from aggregator.api.common import Services
from aggregator.api.http import JsonErrorRunner
from aggregator.api.routes import make_app
from aggregator.store.writer import Store
from aggregator.trust import nodes as trust
from aggregator.trust.enrollment import TokenScope, create_token
from aggregator.trust.pki import CertificateAuthority, OrderSigner, make_order_key
from aggregator.trust.tokens import ROLES, create_api_token
from aggregator.workloads import moves, vms
from contract.profiles import Profile, default_profiles_dir, load_profiles


@pytest.fixture(scope="session")
def root_dir() -> Iterator[Path]:
    """A temp directory the broker's user can reach (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="virt8ra-tests-", dir="/tmp"))
    os.chmod(path, 0o755)  # noqa: S103 - the broker's user must reach it
    yield path
    if os.environ.get("VIRT8RA_KEEP_TEST_DIR"):  # to read the daemons' logs after a failure
        print(f"kept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir(root_dir: Path, request: pytest.FixtureRequest) -> Path:
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=root_dir))
    os.chmod(path, 0o755)  # noqa: S103 - the broker's user must reach it
    return path


@pytest.fixture(scope="session")
def profiles() -> dict[str, Profile]:
    return load_profiles(default_profiles_dir())


@pytest.fixture(scope="session")
def pki(root_dir: Path) -> CertificateAuthority:
    """A session-wide throwaway CA."""
    ca = CertificateAuthority(root_dir / "session-ca")
    ca.create(name="test CA")
    return ca


@pytest.fixture(scope="session")
def foreign_pki(root_dir: Path) -> CertificateAuthority:
    """A CA the fleet does not trust."""
    ca = CertificateAuthority(root_dir / "foreign-ca")
    ca.create(name="someone else's CA")
    return ca


SPARE_API_TOKEN_ID = len(ROLES) + 1
SPARE_ENROLLMENT_TOKEN_ID = 1


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    tokens: dict[str, str]
    store: Store
    ids: dict[str, str]  # things the fixture made: a VM, an order

    async def call(self, method: str, path: str, token: str | None = None,
                   body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        resp = await self.client.request(method, path, headers=headers, data=data)
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


class JsonErrorTestServer(TestServer):
    """The test server on the service's own runner: parse errors answered as JSON too."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return JsonErrorRunner(self.app, **kwargs)


@pytest.fixture(scope="session")
async def api(root_dir: Path, pki: CertificateAuthority,
              profiles: dict[str, Profile]) -> AsyncIterator[Api]:
    store = Store(root_dir / "api.sqlite")
    store.start()
    now = time.time()
    tokens = {}
    for role in ROLES:
        tokens[role] = await store.write(
            lambda db, role=role: create_api_token(db, role, f"test {role}", now)[1])
    # Something for each DELETE and revoke route to act on (ids as a fresh database gives).
    spare_token_id, _ = await store.write(
        lambda db: create_api_token(db, "viewer", "spare, to be revoked", now))
    assert spare_token_id == SPARE_API_TOKEN_ID
    scope = TokenScope("graz-tower-3", "AT", "a1-telekom", "tower-5g")
    spare = await store.write(lambda db: create_token(db, scope, 600, now))
    assert spare["id"] == SPARE_ENROLLMENT_TOKEN_ID
    await store.write(lambda db: db.execute(
        "INSERT INTO nodes (id, site, country, provider, profile) VALUES"
        " ('si-tower-01', 'ljubljana-tower-7', 'SI', 'telekom-slovenije', 'tower-5g'),"
        " ('at-stolen-01', 'graz-tower-3', 'AT', 'a1-telekom', 'tower-5g')"))

    class DatabaseRevocation:
        """The database half of the service's revocation; the broker half is tested with a
        real broker (tests/aggregator/trust/test_trust.py)."""

        async def revoke(self, node: str, actor: str, reason: str) -> dict[str, Any]:
            at = time.time()
            serials = await store.write(
                lambda db: trust.revoke_node(db, node, at, actor, reason))
            return {"node": node, "revoked_at": at, "serials": serials, "reason": reason,
                    "session_dropped": False}

        async def superseded(self, node: str) -> None:
            pass

    order_key = root_dir / "api-order-signing.pub"
    make_order_key(root_dir / "api-order-signing.key", order_key)

    signer = OrderSigner(root_dir / "api-order-signing.key")
    # A node that is always online with room for VMs, and a VM on it with its create order.
    inventory = json.dumps({"cpus": 64, "memory_bytes": 512 << 30})
    await store.write(lambda db: db.execute(
        "INSERT INTO nodes (id, site, country, provider, profile, enrolled_at, reported_status,"
        " last_seen, interval_s, inventory) VALUES ('si-rack-01', 'ljubljana-dc-1', 'SI',"
        " 'arnes', 'rack-server', 1, 'online', 4102444800, 10, ?)", [inventory]))  # 2100
    live = vms.Liveness(3.0, 5.0)
    made = await store.write(lambda db: vms.create(
        db, signer, vms.VmRequest.from_json({"name": "fixture-vm", "vcpus": 1,
                                                  "memory_mib": 256}),
        now, profiles, live, 600, "test"))
    doomed = await store.write(lambda db: vms.create(
        db, signer, vms.VmRequest.from_json({"name": "fixture-doomed", "vcpus": 1,
                                                  "memory_mib": 256}),
        now, profiles, live, 600, "test"))
    # A second online node to move VMs to, VMs there to move (their creates done), a move
    # made, and a node drained.
    await store.write(lambda db: db.execute(
        "INSERT INTO nodes (id, site, country, provider, profile, enrolled_at, reported_status,"
        " last_seen, interval_s, inventory) VALUES ('si-rack-02', 'ljubljana-dc-1', 'SI',"
        " 'arnes', 'rack-server', 1, 'online', 4102444800, 10, ?)", [inventory]))
    ctx = moves.Context(signer, profiles, live, 600)
    movers = {}
    for i in range(4):
        mover = await store.write(lambda db, i=i: vms.create(
            db, signer, vms.VmRequest.from_json({"name": f"fixture-mover-{i}", "vcpus": 1,
                                                      "memory_mib": 256}),
            now, profiles, live, 600, "test"))
        await store.write(lambda db, m=mover: db.execute(
            "UPDATE orders SET state = 'succeeded' WHERE id = ?", [m["order"]]))
        movers[f"mover-{i}"] = mover["id"]
    move = await store.write(lambda db: moves.start(
        db, ctx, movers["mover-0"], "", moves.MoveSettings(mode="cold"), now, "test"))
    await store.write(lambda db: moves.drain(
        db, ctx, "si-tower-01", moves.MoveSettings(mode="auto"), 2, now, "test"))
    services = Services(
        store=store, ca=pki, profiles=profiles, heartbeat_factor=3.0, min_timeout_s=5.0,
        cert_days=1.0, broker_host="127.0.0.1", broker_port=8883, metrics=lambda: {},
        order_public_key=order_key.read_text(), revocation=DatabaseRevocation(), signer=signer,
        images_dir=root_dir / "api-images",
    )
    client = TestClient(JsonErrorTestServer(make_app(services), host="127.0.0.1"))
    await client.start_server()
    yield Api(client, tokens, store, {"vm": made["id"], "order": made["order"],
                                      "doomed": doomed["id"], "move": move["move"], **movers})
    await client.close()
    store.stop()


# Session fixtures for real QEMU guests: the system libvirtd and the tiny guest's images.
from tests.fleetrig import two_host_fleet  # noqa: E402, F401
from tests.guests import system_libvirt, tiny_guest  # noqa: E402, F401

