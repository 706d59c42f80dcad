"""The contexts plumbing/tls.py builds, each in a real handshake (memory BIOs, no sockets)
against the aggregator's session-wide throwaway CA."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from aggregator.trust.pki import CertificateAuthority
from plumbing.tls import (
    client_context,
    client_context_from_pem,
    client_verifying_context,
    pinned_client_context,
    server_context,
    unverified_client_context,
)

HOST = "localhost"


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> dict[str, Any]:
    """Run a handshake between the two contexts; the client certificate the server saw."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    near = client.wrap_bio(c_in, c_out, server_hostname=HOST)
    far = server.wrap_bio(s_in, s_out, server_side=True)
    done = {near: False, far: False}
    for _ in range(10):
        for end in (near, far):
            try:
                end.do_handshake()
                done[end] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return far.getpeercert() or {}
    raise AssertionError("the handshake did not finish")


def _common_name(cert: dict[str, Any]) -> str:
    return dict(rdn[0] for rdn in cert["subject"])["commonName"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server_files(pki: CertificateAuthority, root_dir: Path) -> tuple[Path, Path]:
    d = root_dir / "tls-server"
    d.mkdir(exist_ok=True)
    pki.issue_to_files(HOST, d / "server.crt", d / "server.key", server=True)
    return d / "server.crt", d / "server.key"


@pytest.fixture(scope="module")
def verifying(pki: CertificateAuthority, server_files: tuple[Path, Path],
              root_dir: Path) -> ssl.SSLContext:
    crl = root_dir / "tls-server" / "crl.pem"
    pki.write_crl(crl, [])
    return client_verifying_context(*server_files, pki.cert_path, crl)


def test_a_client_with_a_certificate_in_memory_is_let_in_and_leaves_nothing_behind(
        pki: CertificateAuthority, verifying: ssl.SSLContext, tmp_path: Path) -> None:
    cred = pki.issue_ephemeral("edge-01", 60)
    ctx = client_context_from_pem(pki.cert_path, cred.certificate_pem, cred.key_pem,
                                  scratch_dir=tmp_path)
    assert _common_name(_handshake(ctx, verifying)) == "edge-01"
    assert list(tmp_path.iterdir()) == []  # the key was on disk only while it was loaded


def test_a_client_from_files_is_let_in(pki: CertificateAuthority, verifying: ssl.SSLContext,
                                       tmp_path: Path) -> None:
    pki.issue_to_files("aggregator", tmp_path / "c.crt", tmp_path / "c.key", server=False)
    ctx = client_context(pki.cert_path, tmp_path / "c.crt", tmp_path / "c.key")
    assert _common_name(_handshake(ctx, verifying)) == "aggregator"


def test_a_client_the_crl_names_is_refused(pki: CertificateAuthority,
                                           server_files: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    cred = pki.issue_ephemeral("stolen-01", 60)
    pki.write_crl(tmp_path / "crl.pem", [cred.serial])
    server = client_verifying_context(*server_files, pki.cert_path, tmp_path / "crl.pem")
    ctx = client_context_from_pem(pki.cert_path, cred.certificate_pem, cred.key_pem,
                                  scratch_dir=tmp_path)
    with pytest.raises(ssl.SSLError):
        _handshake(ctx, server)


def test_a_client_without_a_certificate_is_refused(pki: CertificateAuthority,
                                                   verifying: ssl.SSLContext) -> None:
    with pytest.raises(ssl.SSLError):
        _handshake(pinned_client_context(pki.cert_pem()), verifying)


def test_the_pinned_context_trusts_its_ca_alone(pki: CertificateAuthority,
                                                foreign_pki: CertificateAuthority,
                                                server_files: tuple[Path, Path]) -> None:
    server = server_context(*server_files)
    _handshake(pinned_client_context(pki.cert_pem()), server)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pinned_client_context(foreign_pki.cert_pem()), server)


def test_the_unverified_context_takes_any_server(foreign_pki: CertificateAuthority,
                                                 root_dir: Path) -> None:
    d = root_dir / "tls-foreign"
    d.mkdir(exist_ok=True)
    foreign_pki.issue_to_files("elsewhere", d / "s.crt", d / "s.key", server=True)
    _handshake(unverified_client_context(), server_context(d / "s.crt", d / "s.key"))
