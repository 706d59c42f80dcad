"""The one place that builds TLS contexts (the aggregator uses it too); others receive one.

Modules that only hold or pass a context name its type :data:`TlsContext` and need not import
``ssl`` themselves.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any, TypeAlias

TlsContext: TypeAlias = ssl.SSLContext


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A mutual-TLS client context that trusts only ``ca_file`` and presents our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def client_context_from_pem(ca_file: Path, certificate_pem: str, key_pem: str, *,
                            scratch_dir: Path) -> ssl.SSLContext:
    """A mutual-TLS client context presenting a certificate held in memory (the aggregator's
    one-minute credential that takes a revoked node's broker session over). ``ssl`` loads a
    certificate only from files: they live in a private directory under ``scratch_dir`` (itself
    private) for as long as loading takes."""
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix=".credential-") as scratch:
        cert, key = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
        cert.write_text(certificate_pem)
        key.touch(mode=0o600)
        key.write_text(key_pem)
        return client_context(ca_file, cert, key)


def pinned_client_context(ca_pem: str) -> ssl.SSLContext:
    """A client context that trusts only the CA in ``ca_pem`` (an enrolling node, once it
    has checked the aggregator's CA against the operator's pin)."""
    return ssl.create_default_context(cadata=ca_pem)


def unverified_client_context() -> ssl.SSLContext:
    """A client context that checks neither the server's certificate nor its name: only for
    fetching something whose trust comes from elsewhere (the CA an enrolling node compares
    with the operator's pinned fingerprint)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS server context presenting ``cert_file`` (the aggregator's HTTPS API)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def client_verifying_context(cert_file: Path, key_file: Path, ca_file: Path,
                             crl_file: Path) -> ssl.SSLContext:
    """A server context that requires a client certificate from ``ca_file`` that
    ``crl_file`` does not revoke (the aggregator's image service for nodes)."""
    ctx = server_context(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.load_verify_locations(cafile=str(crl_file))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def no_delay(sock: Any) -> None:
    """Send small packets at once (TCP_NODELAY): an order or a report is one small packet,
    and Nagle's algorithm would hold it until the previous one's ACK, which the peer delays
    by up to 40 ms."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
