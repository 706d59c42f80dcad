"""The trust lifecycle with real parts: the aggregator (with its managed Mosquitto) and agents as
processes, certificates from the fleet CA, renewal in seconds, revocation through the CRL."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity.enroll import EnrollError, EnrollOptions, enroll
from aggregator.cli.client import ApiClientError
from aggregator.trust.pki import CertificateAuthority, NodeAttributes
from tests.rig import Fleet, Process, wait_for

CERT_LIFETIME_S = 12.0


@dataclass
class Rig:
    fleet: Fleet
    aggregator: Process
    agents: dict[str, Process]

    def start_agent(self, node: str, **enroll_args: Any) -> Process:
        self.fleet.enroll_node(node, **enroll_args)
        proc = self.fleet.agent(node).start()
        self.agents[node] = proc
        wait_for(lambda: self.fleet.node(node)["status"] == "online", timeout_s=30,
                 what=f"{node} online")
        return proc

    def last_seq(self, node: str) -> int:
        return int(self.fleet.node(node)["sequence"]["telemetry_last_seq"])

    def audit(self, **query: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.fleet.api().get("/api/v1/audit", **query)["events"]
        return events


@pytest.fixture(scope="module")
def rig(root_dir: Path) -> Iterator[Rig]:
    """One aggregator with its managed broker; node certificates live seconds."""
    directory = root_dir / "trust-fleet"
    fleet = Fleet.create(directory, managed_broker=True, overrides={
        "pki": {"node_cert_days": CERT_LIFETIME_S / 86400},
    })
    aggregator = fleet.aggregator().start()
    rig = Rig(fleet, aggregator, {})
    try:
        fleet.wait_healthy()
        yield rig
    finally:
        for proc in rig.agents.values():
            proc.stop()
        assert aggregator.stop() == 0  # a clean stop, in time


def _broker_pid(fleet: Fleet) -> int:
    return int((fleet.layout.broker / "broker.pid").read_text())


def test_node_keeps_reporting_across_renewals_and_a_reconnect(rig: Rig) -> None:
    node = "si-renew-01"
    rig.start_agent(node)
    first = rig.fleet.node(node)["certificates"][0]["serial"]
    # Several renewals, each a certificate of its own for a new key.
    renewals = wait_for(
        lambda: (r := rig.audit(action="certificate.renew", subject=node)) and len(r) >= 3 and r,
        timeout_s=60, what="three renewals",
    )
    assert all(e["outcome"] == "ok" for e in renewals)
    serials = [c["serial"] for c in rig.fleet.node(node)["certificates"]]
    assert len(set(serials)) >= 4
    assert first in serials
    # By now the enrollment certificate has expired: a new connection works only with a
    # renewed one. Restart the broker (the aggregator's supervisor brings it back).
    before = rig.last_seq(node)
    pid = _broker_pid(rig.fleet)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: _broker_pid(rig.fleet) != pid, timeout_s=20, what="a new broker")
    wait_for(lambda: rig.last_seq(node) > before + 6, timeout_s=40,
             what="telemetry after the reconnect")
    detail = rig.fleet.node(node)
    assert detail["gaps"] == []  # contiguous sequence numbers throughout
    assert detail["status"] == "online"
    assert "refused a certificate" not in rig.agents[node].output()


def _mqtt_connect(fleet: Fleet, cert: Path, key: Path) -> None:
    tls = ssl.create_default_context(cafile=str(fleet.layout.ca_cert))
    tls.load_cert_chain(cert, key)

    async def connect() -> None:
        async with aiomqtt.Client("127.0.0.1", fleet.broker_port, tls_context=tls, timeout=3):
            pass

    asyncio.run(connect())


def test_revoked_node_is_cut_off_while_others_carry_on(rig: Rig) -> None:
    stolen, other = "si-stolen-01", "si-honest-01"
    rig.start_agent(stolen)
    rig.start_agent(other)
    etc = rig.fleet.dir / "nodes" / stolen / "etc"

    done = rig.fleet.api().post(f"/api/v1/nodes/{stolen}/revoke",
                                {"reason": "box stolen from the tower"})
    assert done["session_dropped"] is True
    assert done["serials"]
    node = rig.fleet.node(stolen)
    assert node["status"] == "revoked"
    assert node["revoked_reason"] == "box stolen from the tower"
    crl = x509.load_pem_x509_crl(rig.fleet.layout.crl.read_bytes())
    listed = {format(r.serial_number, "x") for r in crl}
    assert set(done["serials"]) <= listed

    # The node's session is gone and it cannot come back: its telemetry stops for good.
    wait_for(lambda: "uplink down" in rig.agents[stolen].output(), timeout_s=15,
             what="the stolen node's session to drop")
    stopped_at = rig.last_seq(stolen)
    honest_at = rig.last_seq(other)
    wait_for(lambda: rig.last_seq(other) > honest_at + 8, timeout_s=30,
             what="the other node to carry on")
    assert rig.last_seq(stolen) <= stopped_at + 1  # at most one message was in flight
    with pytest.raises(aiomqtt.MqttError):
        _mqtt_connect(rig.fleet, etc / "node.crt", etc / "node.key")

    # Revoking is on record, and the node id cannot be enrolled again.
    assert rig.audit(action="node.revoke", subject=stolen)[0]["detail"]["reason"] == \
        "box stolen from the tower"
    grant = rig.fleet.api().post("/api/v1/enrollment-tokens", {
        "site": "ljubljana-tower-7", "country": "SI", "provider": "telekom-slovenije",
        "profile": "tower-5g", "node_id": stolen,
    })
    with pytest.raises(EnrollError, match="revoked"):
        enroll(EnrollOptions(
            aggregator=rig.fleet.url, token=grant["token"], node_id=stolen,
            config_dir=rig.fleet.dir / "nodes" / "again" / "etc",
            state_dir=rig.fleet.dir / "nodes" / "again" / "state",
            ca_fingerprint=grant["ca_fingerprint"], simulate_profile="tower-5g",
        ))
    assert not (rig.fleet.dir / "nodes" / "again" / "etc").exists()


def _expire_certificate(fleet: Fleet, etc: Path, node: str) -> None:
    """Replace the node's certificate with one for the same key that expired a minute ago."""
    key = serialization.load_pem_private_key((etc / "node.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
           .sign(key, hashes.SHA256()))
    ca = CertificateAuthority(fleet.layout.pki)
    issued = ca.sign_node_csr(
        csr.public_bytes(serialization.Encoding.PEM).decode(),
        NodeAttributes(node, "SI", "telekom-slovenije", "ljubljana-tower-7", "tower-5g"),
        days=-60 / 86400,
    )
    (etc / "node.crt").write_text(issued.certificate_pem)


def test_node_offline_past_expiry_says_so_and_re_enrolls_with_a_bound_token(rig: Rig) -> None:
    node = "si-sleeper-01"
    rig.fleet.enroll_node(node)
    etc = rig.fleet.dir / "nodes" / node / "etc"
    _expire_certificate(rig.fleet, etc, node)

    agent = rig.fleet.agent(node).start()
    rig.agents[node] = agent
    assert agent.proc is not None
    assert agent.proc.wait(timeout=30) == 3
    out = agent.output()
    assert "certificate expired" in out
    assert "re-enrollment token" in out
    assert f"--node-id {node}" in out

    scope = {"site": "ljubljana-tower-7", "country": "SI", "provider": "telekom-slovenije",
             "profile": "tower-5g"}

    def re_enroll(token: str) -> Path:
        return enroll(EnrollOptions(
            aggregator=rig.fleet.url, token=token, node_id=node, config_dir=etc,
            state_dir=rig.fleet.dir / "nodes" / node / "state",
            ca_fingerprint=rig.fleet.ca_fingerprint, simulate_profile="tower-5g",
            interval_s=0.5, force=True,
        ))

    # An ordinary token cannot take over an existing node's identity ...
    plain = rig.fleet.api().post("/api/v1/enrollment-tokens", scope)
    with pytest.raises(EnrollError, match="already enrolled"):
        re_enroll(plain["token"])
    # ... a token bound to the node can, and the node reports again.
    bound = rig.fleet.api().post("/api/v1/enrollment-tokens", {**scope, "node_id": node})
    assert bound["node_id"] == node
    re_enroll(bound["token"])
    rig.agents[node] = rig.fleet.agent(node).start()
    wait_for(lambda: rig.fleet.node(node)["status"] == "online", timeout_s=30,
             what="the re-enrolled node online")
    enrolled = rig.audit(action="node.enroll", subject=node)
    assert enrolled[0]["detail"]["re_enrollment"] is True
    assert {e["outcome"] for e in enrolled} == {"ok", "refused"}


def test_withdrawn_token_cannot_enroll_and_tokens_are_listed(rig: Rig) -> None:
    api = rig.fleet.api()
    grant = api.post("/api/v1/enrollment-tokens", {
        "site": "zagreb-dc-1", "country": "HR", "provider": "a1-hrvatska",
        "profile": "edge-server",
    })
    listed = {t["id"]: t for t in api.get("/api/v1/enrollment-tokens")["tokens"]}
    assert listed[grant["id"]]["state"] == "active"
    assert "token" not in listed[grant["id"]]
    assert "token_hash" not in listed[grant["id"]]
    assert api.request("DELETE", f"/api/v1/enrollment-tokens/{grant['id']}")["state"] == \
        "withdrawn"
    home = rig.fleet.dir / "nodes" / "hr-late-01"
    with pytest.raises(EnrollError, match="withdrawn"):
        enroll(EnrollOptions(
            aggregator=rig.fleet.url, token=grant["token"], node_id="hr-late-01",
            config_dir=home / "etc", state_dir=home / "state",
            ca_fingerprint=grant["ca_fingerprint"], simulate_profile="edge-server",
        ))
    assert not (home / "etc").exists()
    active = api.get("/api/v1/enrollment-tokens", state="withdrawn")["tokens"]
    assert grant["id"] in {t["id"] for t in active}
    # A used token cannot be withdrawn: the node it enrolled is revoked instead.
    used = next(t for t in api.get("/api/v1/enrollment-tokens")["tokens"] if t["state"] == "used")
    with pytest.raises(ApiClientError) as err:
        api.request("DELETE", f"/api/v1/enrollment-tokens/{used['id']}")
    assert err.value.status == 409
