"""Enrollment through the real HTTP path: token → CSR → certificate, and each refusal."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import ssl
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import config
from agent.enroll import EnrollError, EnrollOptions, enroll
from aggregator.pki import read_node_attributes
from tests.conftest import Api
from tests.rig import Fleet, wait_for

GRANT = {"site": "ljubljana-tower-7", "country": "SI", "provider": "telekom-slovenije",
         "profile": "tower-5g"}


async def _grant(api: Api, **overrides: Any) -> dict[str, Any]:
    status, grant = await api.call("POST", "/api/v1/enrollment-tokens", api.tokens["technician"],
                                   {**GRANT, **overrides})
    assert status == 201, grant
    return grant


def _options(api: Api, grant: dict[str, Any], home: Path, node_id: str,
             **overrides: Any) -> EnrollOptions:
    values: dict[str, Any] = {
        "aggregator": str(api.client.make_url("")).rstrip("/"), "token": grant["token"],
        "node_id": node_id, "config_dir": home / "etc", "state_dir": home / "state",
        "ca_fingerprint": grant["ca_fingerprint"], "simulate_profile": "tower-5g",
        **overrides,
    }
    return EnrollOptions(**values)


async def test_token_to_certificate(api: Api, workdir: Path) -> None:
    grant = await _grant(api)
    assert grant["ca_fingerprint"].startswith("sha256:")
    assert grant["expires_at"] > time.time() + 3000
    path = await asyncio.to_thread(enroll, _options(api, grant, workdir, "si-tower-42"))
    cfg = config.load(path)
    assert cfg.node.id == "si-tower-42"
    assert cfg.node.profile == "tower-5g"
    assert cfg.libvirt.uri.startswith("test://")
    assert stat.S_IMODE(os.stat(cfg.broker.key_file).st_mode) == 0o600
    attrs = read_node_attributes(cfg.broker.cert_file.read_text())
    assert (attrs.node_id, attrs.country, attrs.provider, attrs.site, attrs.profile) == (
        "si-tower-42", "SI", "telekom-slovenije", "ljubljana-tower-7", "tower-5g")
    status, node = await api.call("GET", "/api/v1/nodes/si-tower-42", api.tokens["viewer"])
    assert status == 200
    assert node["country"] == "SI"
    assert node["inventory"]["cpus"] == 4  # the simulated tower box, reported at enrollment

    # Re-running on an enrolled node is refused unless asked to re-enroll.
    with pytest.raises(EnrollError, match="already enrolled"):
        await asyncio.to_thread(enroll, _options(api, await _grant(api), workdir, "si-tower-42"))


async def test_the_service_group_may_read_the_key(api: Api, workdir: Path) -> None:
    grant = await _grant(api)
    path = await asyncio.to_thread(
        enroll, _options(api, grant, workdir, "si-tower-51", group="nogroup"))
    key = config.load(path).broker.key_file
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o640
    assert os.stat(key).st_gid == grp.getgrnam("nogroup").gr_gid
    with pytest.raises(EnrollError, match="no group"):
        await asyncio.to_thread(enroll, _options(api, await _grant(api), workdir / "b",
                                                 "si-tower-52", group="no-such-group"))
    assert not (workdir / "b" / "etc").exists()


async def test_a_token_enrolls_one_node_only(api: Api, workdir: Path) -> None:
    grant = await _grant(api)
    await asyncio.to_thread(enroll, _options(api, grant, workdir / "a", "si-tower-43"))
    with pytest.raises(EnrollError, match=r"already used.*new one"):
        await asyncio.to_thread(enroll, _options(api, grant, workdir / "b", "si-tower-44"))
    assert not (workdir / "b" / "etc").exists()


async def test_an_expired_token_is_refused(api: Api, workdir: Path) -> None:
    grant = await _grant(api)
    await api.store.write(lambda db: db.execute(
        "UPDATE enrollment_tokens SET expires_at = ? WHERE used_at IS NULL", [time.time() - 1]))
    with pytest.raises(EnrollError, match="expired"):
        await asyncio.to_thread(enroll, _options(api, grant, workdir, "si-tower-45"))
    assert not (workdir / "etc").exists()


async def test_a_wrong_fingerprint_sends_no_token_and_writes_nothing(
    api: Api, workdir: Path
) -> None:
    grant = await _grant(api)
    opts = _options(api, grant, workdir, "si-tower-46", ca_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(EnrollError, match="not the pinned"):
        await asyncio.to_thread(enroll, opts)
    assert not (workdir / "etc").exists()
    # The token never left the node, so it still works with the right pin.
    await asyncio.to_thread(enroll, _options(api, grant, workdir, "si-tower-46"))


async def test_an_unreachable_aggregator_says_so(workdir: Path) -> None:
    opts = EnrollOptions(aggregator="http://127.0.0.1:1", token="t", node_id="n1",
                         config_dir=workdir / "etc", state_dir=workdir / "state",
                         ca_fingerprint="sha256:" + "0" * 64, simulate_profile="tower-5g")
    with pytest.raises(EnrollError, match="cannot reach the aggregator"):
        await asyncio.to_thread(enroll, opts)
    assert not (workdir / "etc").exists()


def _csr(cn: str, country: str | None = None) -> str:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if country:
        names.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("node_id", "csr", "reason"),
    [
        ("si-tower-47", _csr("si-tower-47", country="DE"), "asks for country 'DE'"),
        ("si-tower-48", _csr("someone-else"), "common name 'someone-else'"),
        ("si-tower-49", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "not a PEM"),
    ],
)
async def test_tampered_csrs_are_refused(api: Api, node_id: str, csr: str, reason: str) -> None:
    grant = await _grant(api)
    status, answer = await api.call("POST", "/api/v1/enroll", None,
                                    {"token": grant["token"], "node_id": node_id, "csr": csr})
    assert status == 400
    assert answer["error"]["code"] == "invalid_csr"
    assert reason in answer["error"]["message"]
    # A refused request does not spend the token.
    status, _ = await api.call("POST", "/api/v1/enroll", None, {
        "token": grant["token"], "node_id": node_id, "csr": _csr(node_id)})
    assert status == 201


def test_enrollment_over_https_trusts_only_the_pinned_ca(root_dir: Path) -> None:
    fleet = Fleet.create(root_dir / "https-enroll", overrides={"api": {"tls": "on"}})
    broker = fleet.broker().start()
    aggregator = fleet.aggregator().start()
    try:
        assert fleet.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(fleet.layout.ca_cert))
        wait_for(lambda: _https_ok(fleet.url + "/healthz", ctx), what="the HTTPS API")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(fleet.url + "/healthz", timeout=5)  # noqa: S310
        # The API client trusts the system store; give the token request the fleet CA instead.
        status, grant = _post_json(fleet, "/api/v1/enrollment-tokens", GRANT, ctx)
        assert status == 201
        home = root_dir / "https-enroll" / "node"
        path = enroll(EnrollOptions(
            aggregator=fleet.url, token=grant["token"], node_id="si-tower-50",
            config_dir=home / "etc", state_dir=home / "state",
            ca_fingerprint=grant["ca_fingerprint"], simulate_profile="tower-5g",
        ))
        assert config.load(path).node.id == "si-tower-50"
    finally:
        aggregator.stop()
        broker.stop()


def _https_ok(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx):  # noqa: S310
            return True
    except OSError:
        return False


def _post_json(fleet: Fleet, path: str, body: Any, ctx: ssl.SSLContext) -> tuple[int, Any]:
    req = urllib.request.Request(fleet.url + path, data=json.dumps(body).encode(),  # noqa: S310
                                 method="POST", headers={
                                     "Authorization": f"Bearer {fleet.admin_token}",
                                     "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:  # noqa: S310
        return resp.status, json.loads(resp.read())
