"""Order signatures (agent/orders/signatures.py): the signing key's file, and the checks an
order passes before anything else looks at it."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import nacl.signing
import pytest

from agent.orders.errors import OrderKeyError, Refused
from agent.orders.signatures import check_order, load_verify_key
from contract.wire import Order, encode, order_envelope, signed_bytes

SPKI = bytes.fromhex("302a300506032b6570032100")
KEY = nacl.signing.SigningKey.generate()


def _pem(der: bytes) -> str:
    return f"-----BEGIN PUBLIC KEY-----\n{base64.b64encode(der).decode()}\n" \
           "-----END PUBLIC KEY-----\n"


def _signed(**changes: object) -> tuple[Order, bytes]:
    order = Order(node="si-a", seq=1, order_id="ord-1", issued_at=100.0, expires_at=200.0,
                  action="start", params={"vm_uuid": "vm-a"})
    order = dataclasses.replace(
        order, signature=KEY.sign(signed_bytes(order_envelope(order))).signature)
    sent = dataclasses.replace(order, **changes)  # type: ignore[arg-type]
    return sent, encode(sent)


def test_the_key_from_its_pem_file(tmp_path: Path) -> None:
    path = tmp_path / "orders.pem"
    path.write_text(_pem(SPKI + bytes(KEY.verify_key)))
    assert load_verify_key(path) == KEY.verify_key


@pytest.mark.parametrize(("text", "reason"), [
    (None, "No such file or directory; enroll again to get it"),
    ("not a key", "not a PEM public key"),
    ("-----BEGIN PUBLIC KEY-----\n%%%\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
    (_pem(bytes(44)), "not an Ed25519 public key"),
    (_pem(SPKI + bytes(31)), "not an Ed25519 public key"),
])
def test_a_key_file_that_is_not_one(tmp_path: Path, text: str | None, reason: str) -> None:
    path = tmp_path / "orders.pem"
    if text is not None:
        path.write_text(text)
    with pytest.raises(OrderKeyError) as caught:
        load_verify_key(path)
    assert str(caught.value) == f"{path}: {reason}"


def test_a_signed_order_for_this_node_in_time_passes() -> None:
    order, payload = _signed()
    check_order(order, payload, key=KEY.verify_key, node="si-a", now=150.0)
    check_order(order, payload, key=KEY.verify_key, node="si-a", now=200.0)


@pytest.mark.parametrize(("changes", "node", "now", "refusal"), [
    ({"params": {"vm_uuid": "vm-b"}}, "si-a", 150.0, "bad signature"),  # changed on the way
    ({"signature": b""}, "si-a", 150.0, "bad signature"),
    ({}, "si-b", 150.0, "order for node 'si-a', this is 'si-b'"),
    ({}, "si-a", 200.5, "expired before it arrived"),
])
def test_an_order_that_fails_a_check_is_refused(changes: dict[str, object], node: str,
                                                now: float, refusal: str) -> None:
    order, payload = _signed(**changes)
    with pytest.raises(Refused, match=refusal):
        check_order(order, payload, key=KEY.verify_key, node=node, now=now)


def test_an_order_signed_by_another_key_is_refused() -> None:
    order, payload = _signed()
    with pytest.raises(Refused, match="not signed by this fleet's aggregator"):
        check_order(order, payload, key=nacl.signing.SigningKey.generate().verify_key,
                    node="si-a", now=150.0)
