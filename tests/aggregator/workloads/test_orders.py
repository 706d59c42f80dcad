"""Orders against a real SQLite fleet database, with the nodes' reports made by hand: every way
through the transition table (tests/aggregator/workloads/test_order_states.py has the table
itself), the history each step leaves, and the reports that change nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from aggregator.store.tx import Tx
from aggregator.store.writer import open_tx
from aggregator.trust.pki import OrderSigner, make_order_key
from aggregator.workloads import orders
from contract.orders import EvictParams
from contract.wire import Report, Scalar


@pytest.fixture
def db(tmp_path: Path) -> Tx:
    database = open_tx(tmp_path / "fleet.sqlite")
    for node in ("si-a", "si-b"):
        database.execute(
            "INSERT INTO nodes (id, site, country, provider, profile, enrolled_at,"
            " reported_status, last_seen, interval_s) VALUES (?, 'ljubljana', 'SI', 'arnes',"
            " 'lab-host', 1, 'online', ?, 10)", [node, time.time()])
    return database


@pytest.fixture
def signer(tmp_path: Path) -> OrderSigner:
    make_order_key(tmp_path / "order.key", tmp_path / "order.pub")
    return OrderSigner(tmp_path / "order.key")


def _issue(db: Tx, signer: OrderSigner, now: float, node: str = "si-a") -> str:
    return orders.issue(db, signer, node, None, EvictParams(vm_uuid="x"), now, 600.0)


def _report(db: Tx, order_id: str, state: str, now: float, node: str = "si-a",
            result: dict[str, Scalar] | None = None, error: str = "") -> None:
    orders.apply_report(db, Report(node=node, seq=1, ts=now, order_id=order_id, state=state,
                                   result=result or {}, error=error), now)


def _order(db: Tx, order_id: str) -> dict[str, Any]:
    found = orders.order_json(db, order_id)
    assert found is not None
    return found


def _states(db: Tx, order_id: str) -> list[tuple[str, str]]:
    return [(h["state"], h["note"]) for h in _order(db, order_id)["history"]]


def test_an_order_is_numbered_per_node_and_published_with_backoff(
        db: Tx, signer: OrderSigner) -> None:
    now = time.time()
    first, second = _issue(db, signer, now), _issue(db, signer, now)
    other = _issue(db, signer, now, node="si-b")
    assert [(_order(db, o)["node"], _order(db, o)["seq"]) for o in (first, second, other)] == [
        ("si-a", 1), ("si-a", 2), ("si-b", 1)]
    assert [d.order_id for d in orders.due(db, now)] == [first, second, other]
    orders.mark_sent(db, [first], now)
    sent = _order(db, first)
    assert (sent["state"], sent["attempts"]) == ("sent", 1)
    assert first not in {d.order_id for d in orders.due(db, now)}  # 1 to 2 s later
    assert first in {d.order_id for d in orders.due(db, now + orders.RETRY_MIN_S)}
    orders.mark_sent(db, [first], now + orders.RETRY_MIN_S)
    assert _order(db, first)["attempts"] == 2
    assert _states(db, first) == [("pending", ""), ("sent", "attempt 1"), ("sent", "attempt 2")]


@pytest.mark.parametrize(("attempts", "jitter", "delay"),
                         [(1, 0.0, 1.0), (1, 1.0, 2.0), (3, 1.0, 8.0), (10, 1.0, 60.0),
                          (10, 0.0, 30.0)])
def test_the_retry_delay_doubles_up_to_its_maximum(attempts: int, jitter: float,
                                                   delay: float) -> None:
    assert orders.retry_delay(attempts, jitter) == delay


def test_a_report_that_overtakes_the_publish_counts_and_the_order_stays_ended(
        db: Tx, signer: OrderSigner) -> None:
    now = time.time()
    order = _issue(db, signer, now)
    _report(db, order, "succeeded", now + 1)
    orders.mark_sent(db, [order], now)
    ended = _order(db, order)
    assert (ended["state"], ended["attempts"]) == ("succeeded", 1)
    (latency,) = db.execute("SELECT latency_s FROM orders WHERE id = ?", [order]).fetchone()
    assert latency == pytest.approx(1.0)
    assert _states(db, order) == [("pending", ""), ("succeeded", "")]


def test_an_order_not_finished_by_its_expiry_expires_and_a_late_success_counts(
        db: Tx, signer: OrderSigner) -> None:
    now = time.time()
    order = _issue(db, signer, now)
    orders.mark_sent(db, [order], now)
    _report(db, order, "accepted", now + 1)
    assert orders.expire(db, now + 599) == 0
    assert orders.expire(db, now + 600) == 1
    expired = _order(db, order)
    assert (expired["state"], expired["error"]) == (
        "expired", "not finished by its expiry (last state: accepted)")
    assert orders.due(db, now + 600) == []
    _report(db, order, "failed", now + 601, error="too late")  # changes nothing
    assert _order(db, order)["state"] == "expired"
    _report(db, order, "succeeded", now + 602, result={"state": "deleted"})
    late = _order(db, order)
    assert (late["state"], late["result"]) == ("succeeded", {"state": "deleted"})
    assert _states(db, order)[-1] == ("succeeded", "reported after the order had expired")
    _report(db, order, "failed", now + 603)  # ended: stale
    assert _order(db, order)["state"] == "succeeded"


def test_stale_foreign_and_early_progress_reports_change_nothing(
        db: Tx, signer: OrderSigner) -> None:
    now = time.time()
    order = _issue(db, signer, now)
    _report(db, order, "progress", now, result={"done": 1})  # not sent yet: not kept
    _report(db, order, "succeeded", now, node="si-b")  # not its node
    _report(db, "ord-none", "succeeded", now)  # no such order
    assert (_order(db, order)["state"], _order(db, order)["progress"]) == ("pending", {})
    orders.mark_sent(db, [order], now)
    _report(db, order, "accepted", now)
    _report(db, order, "accepted", now)  # said again: no second history entry
    _report(db, order, "progress", now, result={"done": 5})
    assert (_order(db, order)["state"], _order(db, order)["progress"]) == (
        "accepted", {"done": 5})
    assert [state for state, _ in _states(db, order)] == ["pending", "sent", "accepted"]


def test_a_superseded_order_ends_unpublished_and_an_ended_one_stays_as_it_ended(
        db: Tx, signer: OrderSigner) -> None:
    now = time.time()
    order, done = _issue(db, signer, now), _issue(db, signer, now)
    _report(db, done, "failed", now, error="refused")
    orders.supersede(db, order, now, "the VM was restarted on si-b")
    orders.supersede(db, done, now, "the VM was restarted on si-b")
    assert (_order(db, order)["state"], _order(db, order)["error"]) == (
        "expired", "superseded: the VM was restarted on si-b")
    assert order not in {d.order_id for d in orders.due(db, now)}
    assert (_order(db, done)["state"], _order(db, done)["error"]) == ("failed", "refused")
    assert [state for state, _ in _states(db, done)] == ["pending", "failed"]


def test_an_order_reads_back_as_signed_and_lists_newest_first(
        db: Tx, signer: OrderSigner) -> None:
    now = time.time()
    first, second = _issue(db, signer, now), _issue(db, signer, now + 1)
    found = _order(db, first)
    assert set(found) == {"id", "node", "seq", "vm", "action", "state", "created_at",
                          "updated_at", "expires_at", "attempts", "result", "error",
                          "progress", "move", "params", "history"}
    assert (found["action"], found["params"], found["move"]) == ("evict", {"vm_uuid": "x"},
                                                                 None)
    assert [o["id"] for o in orders.list_orders(db, "si-a", "", "", 10)] == [second, first]
    assert orders.list_orders(db, "si-b", "", "", 10) == []
    assert [o["id"] for o in orders.list_orders(db, "", "", "pending", 1)] == [second]
    assert orders.order_json(db, "ord-none") is None
