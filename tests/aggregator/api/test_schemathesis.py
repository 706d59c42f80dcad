"""The API against its own OpenAPI document, fuzzed by schemathesis: the real aggregator with
its managed Mosquitto, a real store, two enrolled agents on simulated hosts, and an admin
token. Every operation is tested; those that change or destroy something act on objects this
test made. No answer may be a server error, and every answer (status, content type, body)
must be one the document declares."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.api.routes import ROUTES
from tests.rig import Fleet, Process, wait_for

# Fixed so a failure can be replayed; bounded so the suite stays fast.
SEED = 20261204
MAX_EXAMPLES = 30
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance")


def _config(objects: dict[str, Any]) -> str:
    """schemathesis.toml: the token, and every operation on a path with an id acting on one
    of the objects the test made (its negative cases still send other ids)."""
    node, vm, other = objects["node"], objects["vm"], objects["spare_node"]
    pinned = {
        "GET /api/v1/nodes/{id}": node,
        "GET /api/v1/nodes/{id}/telemetry": node,
        "GET /api/v1/nodes/{id}/drain": other,
        "POST /api/v1/nodes/{id}/cordon": node,
        "POST /api/v1/nodes/{id}/uncordon": node,
        "POST /api/v1/nodes/{id}/drain": other,
        "POST /api/v1/nodes/{id}/revoke": objects["revokee"],
        "DELETE /api/v1/enrollment-tokens/{id}": objects["enrollment_token"],
        "DELETE /api/v1/api-tokens/{id}": objects["api_token"],
        "GET /api/v1/vms/{id}": vm,
        "GET /api/v1/vms/{id}/residency": vm,
        "POST /api/v1/vms/{id}/start": vm,
        "POST /api/v1/vms/{id}/stop": vm,
        "POST /api/v1/vms/{id}/reboot": vm,
        "POST /api/v1/vms/{id}/migrate": objects["mover"],
        "DELETE /api/v1/vms/{id}": objects["doomed"],
        "GET /api/v1/moves/{id}": objects["move"],
        "GET /api/v1/orders/{id}": objects["order"],
    }
    lines = [f"request-timeout = 30.0\n[headers]\nAuthorization = "
             f"{json.dumps('Bearer ' + objects['token'])}\n"]
    for name, value in pinned.items():  # JSON strings and numbers are TOML ones too
        lines.append(f"[[operations]]\ninclude-name = {json.dumps(name)}\n"
                     f"parameters = {{ \"path.id\" = {json.dumps(value)} }}\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fleet(root_dir: Path) -> Iterator[tuple[Fleet, Process, dict[str, Any]]]:
    fleet = Fleet.create(root_dir / "schemathesis", managed_broker=True)
    aggregator = fleet.aggregator().start()
    agents: list[Process] = []
    try:
        fleet.wait_healthy()
        for node, country in (("si-tower-01", "SI"), ("at-tower-01", "AT")):
            fleet.enroll_node(node, country=country)
            agents.append(fleet.agent(node).start())
        fleet.enroll_node("hr-tower-01", country="HR")  # enrolled, never runs: revoked
        for node in ("si-tower-01", "at-tower-01"):
            wait_for(lambda node=node: fleet.node(node)["status"] == "online", timeout_s=30,
                     what=f"{node} online")
        api = fleet.api()
        image = root_dir / "schemathesis-image.raw"
        image.write_bytes(os.urandom(1 << 16))
        api.post("/api/v1/images", {"name": "tiny", "path": str(image)})

        def vm(name: str, *countries: str) -> dict[str, Any]:
            made: dict[str, Any] = api.post("/api/v1/vms", {
                "name": name, "vcpus": 1, "memory_mib": 128, "boot": {"image": "tiny"},
                "placement": {"countries": list(countries)}})
            wait_for(lambda: api.get(f"/api/v1/orders/{made['order']}")["state"]
                     == "succeeded", what=f"{name} created")
            return made

        kept, doomed, mover = vm("st-vm", "SI"), vm("st-doomed", "SI"), vm("st-mover", "AT", "SI")
        vm("st-drained", "AT", "SI")
        move = api.post("/api/v1/vms/st-mover/migrate", {"mode": "cold", "to": "si-tower-01"})
        wait_for(lambda: api.get(f"/api/v1/moves/{move['move']}")["state"]
                 in ("succeeded", "failed"), timeout_s=60, what="the first move to end")
        token = api.post("/api/v1/api-tokens", {"role": "admin", "name": "schemathesis"})
        spare = api.post("/api/v1/api-tokens", {"role": "viewer", "name": "to revoke"})
        grant = api.post("/api/v1/enrollment-tokens", {
            "site": "zagreb-tower-1", "country": "HR", "provider": "a1-hrvatska",
            "profile": "tower-5g"})
        objects = {"token": token["token"], "node": "si-tower-01", "spare_node": "at-tower-01",
                   "revokee": "hr-tower-01", "vm": kept["id"], "doomed": doomed["id"],
                   "mover": mover["id"], "move": move["move"], "order": kept["order"],
                   "api_token": spare["id"], "enrollment_token": grant["id"]}
        yield fleet, aggregator, objects
    finally:
        for agent in agents:
            agent.stop()
        assert aggregator.stop() in (0, None)


def test_every_operation_answers_as_documented_and_never_fails(
        fleet: tuple[Fleet, Process, dict[str, Any]]) -> None:
    rig, aggregator, objects = fleet
    config = rig.dir / "schemathesis.toml"
    config.write_text(_config(objects))
    junit = rig.dir / "schemathesis-junit.xml"
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         f"{rig.url}/api/v1/openapi.json", "--checks", ",".join(CHECKS),
         "--phases", "coverage,fuzzing", "--seed", str(SEED),
         "--max-examples", str(MAX_EXAMPLES), "--generation-database", "none",
         "--report", "junit", "--report-junit-path", str(junit)],
        capture_output=True, text=True, timeout=900, check=False, cwd=rig.dir,
        env={**os.environ, "NO_COLOR": "1"},
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts is not None, report[-5000:]
    assert int(counts[2]) == int(counts[1]) >= 20 * len(objects), report[-5000:]
    # Every operation, but the one serving the document (schemathesis leaves it out; it
    # loaded the document from it).
    tested = set(re.findall(r'<testcase[^>]* name="([A-Z]+ /[^"]*)"', junit.read_text()))
    assert tested == {f"{r.method} {r.path}" for r in ROUTES} - {"GET /api/v1/openapi.json"}
    # The aggregator is still there, and logged no failed request.
    assert aggregator.running()
    rig.api().get("/healthz")
    log = (rig.dir / "logs" / "aggregator.log").read_text()
    assert "Traceback" not in log, log[-20000:]
