"""The one place that builds TLS contexts (the aggregator uses it too); others receive one."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A mutual-TLS client context that trusts only ``ca_file`` and presents our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS server context presenting ``cert_file`` (the aggregator's HTTPS API)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
