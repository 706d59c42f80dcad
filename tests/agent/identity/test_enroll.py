"""The enroll command's steps that need no aggregator: refusals before anything is sent, the
certificate request, the answer read and checked, the config written. The whole enrollment
against a real aggregator: tests/aggregator/trust/test_enrollment.py."""

from __future__ import annotations

import datetime as dt
import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from agent.identity.enroll import (
    EnrollError,
    EnrollOptions,
    Granted,
    agent_config,
    certificate_request,
    enroll,
    read_answer,
)
from plumbing import configfile


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _certificate(cn: str, public_key: ec.EllipticCurvePublicKey,
                 issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
                 ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None]:
    """A certificate for ``public_key``, signed by ``issuer`` (else a self-signed CA: its
    key is returned)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca_key = ec.generate_private_key(ec.SECP256R1()) if issuer is None else None
    issuer_name, signer = issuer if issuer is not None else (name, ca_key)
    assert signer is not None
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
            .public_key(public_key if ca_key is None else ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(signer, hashes.SHA256()))
    return cert, ca_key


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert, key = _certificate("test CA", ec.generate_private_key(ec.SECP256R1()).public_key())
    assert key is not None
    return cert, key


def _answer(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
            node_key: ec.EllipticCurvePrivateKey, /, **changes: Any) -> dict[str, Any]:
    cert, _ = _certificate("si-tower-42", node_key.public_key(), (ca[0].subject, ca[1]))
    signing = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    answer = {
        "certificate": _pem(cert), "ca": _pem(ca[0]),
        "broker": {"host": "broker.example", "port": "8883"},
        "attributes": {"profile": "tower-5g", "country": "SI"},
        "order_signing_key": signing,
        "images_url": "https://aggregator.example:8480/images",
    }
    answer.update(changes)
    return answer


def _options(tmp_path: Path, **changes: Any) -> EnrollOptions:
    values: dict[str, Any] = {
        "aggregator": "http://127.0.0.1:1", "token": "v8e_t", "node_id": "si-tower-42",
        "config_dir": tmp_path / "etc", "state_dir": tmp_path / "var",
        "ca_fingerprint": "sha256:00", "profile": "tower-5g",
    }
    values.update(changes)
    return EnrollOptions(**values)


def test_a_bad_node_id_or_an_enrolled_node_is_refused_before_anything_is_sent(
        tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match=r"^--node-id: "):
        enroll(_options(tmp_path, node_id="Not A Node Id!"))
    assert not (tmp_path / "etc").exists()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "agent.toml").write_text("")
    with pytest.raises(EnrollError, match=r"already enrolled \(.*agent.toml exists\); pass "
                                          "--force to re-enroll"):
        enroll(_options(tmp_path))
    assert [p.name for p in (tmp_path / "etc").iterdir()] == ["agent.toml"]


def test_the_request_names_the_node_and_its_migration_address() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    plain = certificate_request("si-tower-42", "", key)
    assert plain.subject.rfc4514_string() == "CN=si-tower-42"
    assert plain.is_signature_valid
    assert not list(plain.extensions)
    by_ip = certificate_request("si-tower-42", "10.250.0.1", key)
    names = by_ip.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.250.0.1")]
    by_name = certificate_request("si-tower-42", "Tower-42.Example", key)
    names = by_name.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["tower-42.example"]


def test_the_answer_is_read_with_its_defaults(
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    granted = read_answer(_answer(ca, key), ca[0], key)
    assert granted.ca == ca[0]
    assert (granted.broker_host, granted.broker_port) == ("broker.example", 8883)
    assert granted.attributes == {"profile": "tower-5g", "country": "SI", "provider": "",
                                  "site": ""}
    assert granted.signing_key.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert granted.images_url == "https://aggregator.example:8480/images"
    bare = _answer(ca, key)
    del bare["images_url"]
    assert read_answer(bare, ca[0], key).images_url == ""


@pytest.mark.parametrize(("change", "refusal"), [
    ({"broker": {"host": "b"}}, r"answer is incomplete \('port'\); is the URL a virt8ra"),
    ({"attributes": {}}, r"answer is incomplete \('profile'\)"),
    ({"certificate": "not a certificate"}, "answer is incomplete"),
    ({"ca": "not a certificate"}, "answer is incomplete"),
    ({"certificate": None}, "answer is incomplete"),  # JSON null: no .encode()
    ({"ca": 17}, "answer is incomplete"),
    ({"order_signing_key": 7}, r"answer is incomplete \(order_signing_key is not a PEM"),
])
def test_an_incomplete_answer_is_refused(
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], change: dict[str, Any],
        refusal: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EnrollError, match=refusal):
        read_answer(_answer(ca, key, **change), ca[0], key)


def test_an_answer_for_another_ca_or_key_is_refused(
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other_ca, _ = _certificate("other CA", key.public_key())
    with pytest.raises(EnrollError, match=r"^the aggregator answered with another CA than the "
                                          r"pinned one$"):
        read_answer(_answer(ca, key), other_ca, key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EnrollError, match=r"^the certificate returned is not for this node's "
                                          r"key$"):
        read_answer(_answer(ca, other_key), ca[0], key)
    not_ed25519 = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(EnrollError, match="not an Ed25519 public key"):
        read_answer(_answer(ca, key, order_signing_key=not_ed25519), ca[0], key)


def test_the_config_names_the_identity_files_and_the_state(
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    granted: Granted = read_answer(_answer(ca, key), ca[0], key)
    opts = _options(tmp_path, migration_address="10.250.0.1", domain_type="qemu")
    config = tomllib.loads(configfile.dump_toml(agent_config(opts, "qemu:///system", granted)))
    etc, var = tmp_path / "etc", tmp_path / "var"
    assert config["node"] == {"id": "si-tower-42", "profile": "tower-5g", "country": "SI",
                              "provider": "", "site": ""}
    assert config["broker"] == {"host": "broker.example", "port": 8883,
                                "ca_file": f"{etc}/ca.crt", "cert_file": f"{etc}/node.crt",
                                "key_file": f"{etc}/node.key"}
    assert config["libvirt"] == {"uri": "qemu:///system", "domain_type": "qemu",
                                 "migration_address": "10.250.0.1",
                                 "migration_transport": "tls", "tls_dir": "/etc/pki",
                                 "admin_uri": "libvirtd:///system"}
    assert config["telemetry"] == {"interval_s": 10.0, "spool_path": f"{var}/spool.sqlite"}
    assert config["orders"] == {"signing_key_file": f"{etc}/order-signing.pub",
                                "journal_path": f"{var}/orders.sqlite",
                                "images_dir": f"{var}/images", "disks_dir": f"{var}/disks",
                                "images_url": "https://aggregator.example:8480/images"}
