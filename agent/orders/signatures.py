"""Order signatures: the aggregator's order-signing key, and the checks an order passes before
anything else looks at it. An order counts only if that Ed25519 key signed exactly the
envelope received, it is for this node and it has not expired.

PyNaCl (libsodium) verifies signatures: a fraction of cryptography's memory in the daemon. It
enters here and nowhere else; its errors become ours (OrderKeyError, Refused).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Final

import nacl.exceptions
import nacl.signing

from agent.orders.errors import OrderKeyError, Refused
from contract.wire import Order, ProtocolError, raw_envelope, signed_bytes

# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw key's 32 bytes follow.
_ED25519_SPKI: Final = bytes.fromhex("302a300506032b6570032100")

VerifyKey = nacl.signing.VerifyKey


def load_verify_key(path: Path) -> VerifyKey:
    """The aggregator's order-signing key from its PEM file (written at enrollment)."""
    try:
        lines = path.read_text().strip().splitlines()
    except OSError as exc:
        raise OrderKeyError(f"{path}: {exc.strerror}; enroll again to get it") from None
    if len(lines) < 3 or lines[0] != "-----BEGIN PUBLIC KEY-----" \
            or lines[-1] != "-----END PUBLIC KEY-----":
        raise OrderKeyError(f"{path}: not a PEM public key")
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except ValueError:
        raise OrderKeyError(f"{path}: not a PEM public key") from None
    if len(der) != 44 or not der.startswith(_ED25519_SPKI):
        raise OrderKeyError(f"{path}: not an Ed25519 public key")
    return nacl.signing.VerifyKey(der[len(_ED25519_SPKI):])


def check_order(order: Order, payload: bytes, *, key: VerifyKey, node: str,
                now: float) -> None:
    """Refuse an order not signed by ``key`` over ``payload`` (the envelope as received),
    for another node than ``node``, or expired at ``now``."""
    try:
        key.verify(signed_bytes(raw_envelope(payload)), order.signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError, ProtocolError,
            RecursionError):
        raise Refused("bad signature: not signed by this fleet's aggregator") from None
    if order.node != node:
        raise Refused(f"order for node {order.node!r}, this is {node!r}")
    if order.expires_at < now:
        raise Refused("expired before it arrived")
