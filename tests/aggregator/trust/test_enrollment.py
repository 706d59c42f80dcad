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
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from agent import config
from agent.identity.enroll import HINTS, EnrollError, EnrollOptions, enroll
from aggregator.trust import nodes as trust
from aggregator.trust.enrollment import EnrollmentError
from aggregator.trust.pki import CertificateAuthority, NodeAttributes, read_node_attributes
from contract.profiles import Profile
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
    # The service renews its certificate in place: the directory is the group's to write.
    assert stat.S_IMODE(os.stat(key.parent).st_mode) == 0o770
    assert os.stat(key.parent).st_gid == grp.getgrnam("nogroup").gr_gid
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
async def test_tampered_csrs_are_refused(api: Api, profiles: dict[str, Profile], node_id: str,
                                         csr: str, reason: str) -> None:
    grant = await _grant(api)
    facts = profiles["tower-5g"].simulation.facts().to_plain()
    status, answer = await api.call("POST", "/api/v1/enroll", None, {
        "token": grant["token"], "node_id": node_id, "csr": csr, "facts": facts})
    assert status == 400
    assert answer["error"]["code"] == "invalid_csr"
    assert reason in answer["error"]["message"]
    # A refused request does not spend the token.
    status, _ = await api.call("POST", "/api/v1/enroll", None, {
        "token": grant["token"], "node_id": node_id, "csr": _csr(node_id), "facts": facts})
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


# --- The hardware check, the clock and the order-signing key -----------------------------
# The tests against the real aggregator (`api`) need its side of the contract: the "facts"
# it re-checks, "time" in GET /api/v1/ca and "order_signing_key" in the enroll answer.


async def test_the_order_signing_key_is_written_and_configured(api: Api, workdir: Path) -> None:
    grant = await _grant(api)
    path = await asyncio.to_thread(enroll, _options(api, grant, workdir, "si-tower-53"))
    cfg = config.load(path)
    assert cfg.orders.signing_key_file == workdir / "etc" / "order-signing.pub"
    assert stat.S_IMODE(os.stat(cfg.orders.signing_key_file).st_mode) == 0o644
    key = serialization.load_pem_public_key(cfg.orders.signing_key_file.read_bytes())
    assert isinstance(key, ed25519.Ed25519PublicKey)
    assert sorted(p.name for p in (workdir / "etc").iterdir()) == [
        "agent.toml", "ca.crt", "node.crt", "node.key", "order-signing.pub",
        "simulated-host.xml"]


async def test_a_host_below_its_profile_is_refused_before_the_token_is_sent(
    api: Api, workdir: Path
) -> None:
    grant = await _grant(api)
    # A simulated tower box, checked against the edge-server profile it does not meet.
    opts = _options(api, grant, workdir, "si-tower-54", profile="edge-server")
    with pytest.raises(EnrollError) as info:
        await asyncio.to_thread(enroll, opts)
    message = str(info.value)
    assert "does not meet the hardware profile edge-server" in message
    assert "cpus: found 4 logical CPUs, required at least 16" in message
    assert "memory: found 16384 MiB, required at least 65536 MiB" in message
    assert "the token was not sent, nothing written" in message
    assert not (workdir / "etc").exists()
    # The token never left the node: it still enrolls this host under its own profile.
    path = await asyncio.to_thread(enroll, _options(api, grant, workdir, "si-tower-54"))
    assert config.load(path).node.profile == "tower-5g"


async def test_enroll_needs_a_known_profile(workdir: Path) -> None:
    base = {"aggregator": "http://127.0.0.1:1", "token": "t", "node_id": "n1",
            "config_dir": workdir / "etc", "state_dir": workdir / "state",
            "ca_fingerprint": "sha256:" + "0" * 64}
    with pytest.raises(EnrollError, match="--profile: name the hardware profile"):
        await asyncio.to_thread(enroll, EnrollOptions(**base))
    with pytest.raises(EnrollError, match=r"unknown profile 'tower-6g'.*tower-5g"):
        await asyncio.to_thread(enroll, EnrollOptions(**base, profile="tower-6g"))
    with pytest.raises(EnrollError, match="--simulate: unknown profile 'warp-box'"):
        await asyncio.to_thread(enroll, EnrollOptions(**base, profile="tower-5g",
                                                      simulate_profile="warp-box"))
    assert not (workdir / "etc").exists()


def test_every_refusal_code_says_what_to_do_next() -> None:
    for code in ("invalid_token", "token_used", "token_expired", "token_withdrawn",
                 "node_exists", "node_revoked", "profile_mismatch"):
        assert HINTS[code]
    assert "new --node-id" in HINTS["node_revoked"]
    assert "virt8ra-agent check" in HINTS["profile_mismatch"]


class FakeAggregator:
    """GET /api/v1/ca and POST /api/v1/enroll with answers a test chooses, signed by a real
    CA; records the enroll requests it was sent."""

    def __init__(self, ca: CertificateAuthority, *, skew_s: float = 0.0,
                 signing_key: str | None = None) -> None:
        self.ca, self.skew_s, self.signing_key = ca, skew_s, signing_key
        self.requests: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_get("/api/v1/ca", self._ca)
        app.router.add_post("/api/v1/enroll", self._enroll)
        self.server = TestServer(app, host="127.0.0.1")

    async def _ca(self, _request: web.Request) -> web.Response:
        return web.json_response({"ca": self.ca.cert_pem(), "fingerprint": self.ca.fingerprint(),
                                  "time": time.time() + self.skew_s})

    async def _enroll(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        attrs = NodeAttributes(body["node_id"], "SI", "telekom-slovenije", "ljubljana-tower-7",
                               "tower-5g")
        answer = {"certificate": self.ca.sign_node_csr(body["csr"], attrs, 1).certificate_pem,
                  "ca": self.ca.cert_pem(), "broker": {"host": "127.0.0.1", "port": 8883},
                  "attributes": {"profile": "tower-5g"}}
        if self.signing_key is not None:
            answer["order_signing_key"] = self.signing_key
        return web.json_response(answer, status=201)

    def options(self, home: Path, **overrides: Any) -> EnrollOptions:
        return EnrollOptions(**{
            "aggregator": str(self.server.make_url("")).rstrip("/"), "token": "v8e_test",
            "node_id": "si-tower-60", "config_dir": home / "etc", "state_dir": home / "state",
            "ca_fingerprint": self.ca.fingerprint(), "simulate_profile": "tower-5g",
            **overrides})


def _ed25519_pem() -> str:
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0, 90.0])
async def test_a_skewed_clock_sends_no_token(
    pki: CertificateAuthority, workdir: Path, skew_s: float
) -> None:
    fake = FakeAggregator(pki, skew_s=skew_s, signing_key=_ed25519_pem())
    await fake.server.start_server()
    try:
        with pytest.raises(EnrollError) as info:
            await asyncio.to_thread(enroll, fake.options(workdir))
    finally:
        await fake.server.close()
    assert f"clock is off by {abs(skew_s):.0f} seconds" in str(info.value)
    assert ("behind" if skew_s > 0 else "ahead of") in str(info.value)
    assert "NTP" in str(info.value)
    assert fake.requests == []
    assert not (workdir / "etc").exists()


async def test_a_small_skew_is_allowed_and_the_facts_are_sent(
    pki: CertificateAuthority, workdir: Path
) -> None:
    fake = FakeAggregator(pki, skew_s=-20.0, signing_key=_ed25519_pem())
    await fake.server.start_server()
    try:
        path = await asyncio.to_thread(enroll, fake.options(workdir, group="nogroup"))
    finally:
        await fake.server.close()
    (sent,) = fake.requests
    assert sent["facts"] == {"cpus": 4, "memory_mib": 16384,
                             "cpu_flags": ["vmx", "ept", "aes", "avx", "avx2", "sse4_2"],
                             "disk_gib": 256, "nics": 2}
    key_file = config.load(path).orders.signing_key_file
    assert key_file == workdir / "etc" / "order-signing.pub"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o644
    assert os.stat(key_file).st_gid == grp.getgrnam("nogroup").gr_gid


@pytest.mark.parametrize(
    "signing_key",
    [None, "not a key", _csr("x"),
     ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
         serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()],
)
async def test_an_answer_without_an_ed25519_signing_key_is_incomplete(
    pki: CertificateAuthority, workdir: Path, signing_key: str | None
) -> None:
    fake = FakeAggregator(pki, signing_key=signing_key)
    await fake.server.start_server()
    try:
        with pytest.raises(EnrollError, match="answer is incomplete"):
            await asyncio.to_thread(enroll, fake.options(workdir))
    finally:
        await fake.server.close()
    assert len(fake.requests) == 1
    assert not (workdir / "etc").exists()


@pytest.mark.parametrize("csr", [
    "", "not pem", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    # A well-formed request for a key type we do not accept (RSA).
    "RSA",
])
async def test_a_renewal_with_an_unusable_csr_is_refused_not_raised(
        api: Api, pki: CertificateAuthority, csr: str) -> None:
    if csr == "RSA":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        csr = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "si-tower-01")])
        ).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    await api.store.write(lambda db: db.execute(
        "UPDATE nodes SET enrolled_at = 1 WHERE id = 'si-tower-01' AND enrolled_at IS NULL"))
    with pytest.raises(EnrollmentError) as err:
        await api.store.write(
            lambda db: trust.renew(db, pki, "si-tower-01", csr, time.time(), 1.0))
    assert err.value.code == "invalid_csr"
