"""The node's certificate work, run by the daemon as a short-lived child process.

The daemon never imports cryptography (it would cost it ~9 MB for work done once in days);
it runs ``python -m agent.identity.certtool COMMAND`` instead, which answers one JSON object
on stdout
(``{"error": ...}`` and exit 1 on failure). Files, next to the current certificate and key:

    node.key.next   a new key, made for a renewal request (kept until a certificate for it comes)
    node.crt.next   the new certificate, verified, about to replace node.crt

Commands::

    status  --cert C --key K               finish an interrupted install; the current
                                           certificate's expiry and its installation time
    csr     --cert C --key K --node-id N   a CSR for node.key.next (made if missing)
    install --cert C --key K --node-id N --ca CA   (new certificate PEM on stdin)
            verify it (signed by the fleet CA, for node.key.next, same subject as the current
            one, not expired) and move key and certificate into place
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class CertToolError(Exception):
    """The work cannot be done; the message says why."""


def _next(path: Path) -> Path:
    return path.with_name(path.name + ".next")


def _write_like(path: Path, data: bytes, like: Path) -> None:
    """Write ``path`` atomically with the mode and group of ``like`` (the file it replaces)."""
    try:
        st = like.stat()
        mode, gid = st.st_mode & 0o777, st.st_gid
    except FileNotFoundError:
        mode, gid = 0o600, -1
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if gid != -1 and gid != os.getegid():
        with contextlib.suppress(PermissionError):  # the service user keeps its own group
            os.chown(tmp, -1, gid)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _finish_install(cert: Path, key: Path) -> None:
    """Complete an install that stopped between its renames (the new certificate was
    verified before either happened)."""
    new_cert, new_key = _next(cert), _next(key)
    if not new_cert.exists():
        return
    if new_key.exists():
        os.replace(new_key, key)
    os.replace(new_cert, cert)


def status(cert: Path, key: Path) -> dict[str, Any]:
    _finish_install(cert, key)
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    return {
        "not_before": c.not_valid_before_utc.timestamp(),
        "not_after": c.not_valid_after_utc.timestamp(),
        "installed_at": cert.stat().st_mtime,
        "serial": format(c.serial_number, "x"),
        "pending_key": _next(key).exists(),
    }


def csr(cert: Path, key: Path, node_id: str) -> dict[str, Any]:
    pending = _next(key)
    if pending.exists():
        new_key = serialization.load_pem_private_key(pending.read_bytes(), None)
        if not isinstance(new_key, ec.EllipticCurvePrivateKey):
            raise CertToolError(f"{pending} is not an EC key")
    else:
        new_key = ec.generate_private_key(ec.SECP256R1())
        _write_like(pending, new_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ), key)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
    try:  # the renewed certificate keeps the names the node is reached at (migration)
        current = x509.load_pem_x509_certificate(cert.read_bytes())
        names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    except (OSError, ValueError, x509.ExtensionNotFound):
        pass
    request = builder.sign(new_key, hashes.SHA256())
    return {"csr": request.public_bytes(serialization.Encoding.PEM).decode()}


def install(cert: Path, key: Path, node_id: str, ca_path: Path, pem: bytes) -> dict[str, Any]:
    pending = _next(key)
    if not pending.exists():
        raise CertToolError("no renewal is pending (no new key): ignoring the certificate")
    try:
        new = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertToolError(f"not a PEM certificate: {exc}") from None
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    current = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        new.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertToolError("the certificate is not signed by the fleet CA") from None
    new_key = serialization.load_pem_private_key(pending.read_bytes(), None)
    if _spki(new.public_key()) != _spki(new_key.public_key()):
        raise CertToolError("the certificate is not for this node's new key")
    cn = new.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != node_id:
        raise CertToolError(f"the certificate is not for node {node_id!r}")
    if new.subject != current.subject:
        raise CertToolError(
            f"the certificate's attributes changed ({new.subject.rfc4514_string()} instead of"
            f" {current.subject.rfc4514_string()})"
        )
    if new.not_valid_after_utc.timestamp() <= time.time():
        raise CertToolError("the certificate has expired already")
    _write_like(_next(cert), new.public_bytes(serialization.Encoding.PEM), cert)
    _finish_install(cert, key)
    return status(cert, key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.identity.certtool")
    p.add_argument("command", choices=["status", "csr", "install"])
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--node-id", default="")
    p.add_argument("--ca", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "status":
            out = status(args.cert, args.key)
        elif args.command == "csr":
            out = csr(args.cert, args.key, args.node_id)
        else:
            if args.ca is None:
                raise CertToolError("install needs --ca")
            out = install(args.cert, args.key, args.node_id, args.ca, sys.stdin.buffer.read())
    except (CertToolError, OSError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
