"""The aggregator's side of a move, step by step against a real SQLite fleet database, with the
nodes' reports made by hand: every outcome a node can report (or fail to) at every step, and
where the VM is recorded after each. The whole stack runs in
tests/aggregator/workloads/test_moves.py and tests/agent/host/test_live_migration.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from aggregator.store.tx import Tx
from aggregator.store.writer import open_tx
from aggregator.trust.pki import OrderSigner, make_order_key
from aggregator.workloads import moves, orders, vms
from contract.profiles import Profile
from contract.wire import Order, Report, Scalar, decode

INVENTORY = json.dumps({"cpus": 16, "memory_bytes": 64 << 30, "domain_type": "qemu"})


@pytest.fixture
def db(tmp_path: Path) -> Tx:
    database = open_tx(tmp_path / "fleet.sqlite")
    now = time.time()
    for node, names in (("si-a", "10.0.0.1"), ("si-b", "10.0.0.2"), ("si-c", "10.0.0.3")):
        database.execute(
            "INSERT INTO nodes (id, site, country, provider, profile, enrolled_at,"
            " reported_status, last_seen, interval_s, inventory, lease_s, alt_names) VALUES"
            " (?, 'ljubljana', 'SI', 'arnes', 'lab-host', 1, 'online', ?, 10, ?, 60, ?)",
            [node, now, INVENTORY, names])
    return database


@pytest.fixture
def ctx(tmp_path: Path, profiles: dict[str, Profile]) -> moves.Context:
    make_order_key(tmp_path / "order.key", tmp_path / "order.pub")
    return moves.Context(OrderSigner(tmp_path / "order.key"), profiles,
                         vms.Liveness(3.0, 5.0), 600.0)


def _vm(db: Tx, ctx: moves.Context, name: str, node: str,
        on_node_loss: str = "wait") -> str:
    """A VM created on ``node`` (the others cordoned meanwhile), running."""
    conn = db
    conn.execute("UPDATE nodes SET cordoned = (id != ?)", (node,))
    made = vms.create(conn, ctx.signer, vms.VmRequest.from_json(
        {"name": name, "vcpus": 1, "memory_mib": 256, "on_node_loss": on_node_loss}),
        time.time(), ctx.profiles, ctx.live, 600, "test")
    conn.execute("UPDATE nodes SET cordoned = 0")
    _report(db, made["order"], "succeeded", {"state": "running"})
    return str(made["id"])


def _report(db: Tx, order_id: str, state: str,
            result: dict[str, Scalar] | None = None, error: str = "") -> None:
    (node,) = db.execute("SELECT node_id FROM orders WHERE id = ?", [order_id]).fetchone()
    orders.apply_report(db, Report(node=node, seq=1, ts=time.time(), order_id=order_id,
                                        state=state, result=result or {}, error=error),
                        time.time())


def _step(db: Tx, move_id: str) -> tuple[str, str, str, str]:
    """The move's state, and its current order's id, action and node."""
    row = db.execute("SELECT m.state, o.id, o.action, o.node_id FROM moves m JOIN orders o"
                     " ON o.id = m.step_order WHERE m.id = ?", [move_id]).fetchone()
    return row[0], row[1], row[2], row[3]


def _move(db: Tx, move_id: str) -> dict[str, Any]:
    found = moves.get(db, move_id)
    assert found is not None
    return found


def _where(db: Tx, vm_id: str) -> tuple[str, str]:
    row = db.execute("SELECT node_id, actual_state FROM vms WHERE id = ?", [vm_id]).fetchone()
    return row[0], row[1]


def _usage(db: Tx, node: str) -> int:
    row = db.execute("SELECT memory_mib FROM node_usage WHERE node_id = ?", [node]).fetchone()
    return int(row[0]) if row else 0


PREPARED: dict[str, Scalar] = {"address": "10.0.0.2", "domain_type": "qemu",
                               "kernel": "/b/k", "initrd": "/b/i", "serial": "/b/s"}
OFFERS: dict[str, Scalar] = {"arch": "x86_64", "machines": "pc pc-i440fx-7.2",
                             "cpu_models": "kvm64 qemu64"}


def _to_migrating(db: Tx, ctx: moves.Context, vm_id: str) -> str:
    move = moves.start(db, ctx, vm_id, "si-b", moves.MoveSettings(), time.time(), "test")
    state, receive, action, node = _step(db, move["move"])
    assert (state, action, node) == ("preparing", "receive", "si-b")
    _report(db, receive, "succeeded", {**PREPARED, **OFFERS, "cores": 4})
    moves.advance(db, ctx, time.time())
    return str(move["move"])


def test_a_live_move_goes_receive_migrate_adopt_and_the_vm_changes_node_once(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "mover", "si-a")
    before_b = _usage(db, "si-b")
    move_id = _to_migrating(db, ctx, vm_id)
    assert _usage(db, "si-b") == before_b + 256  # held at the destination while it moves
    state, migrate, action, node = _step(db, move_id)
    assert (state, action, node) == ("migrating", "migrate", "si-a")
    (payload,) = db.execute("SELECT payload FROM orders WHERE id = ?", [migrate]).fetchone()
    order = decode(bytes(payload))
    assert isinstance(order, Order)
    assert order.params == {"vm_uuid": vm_id, "dest": "si-b", "mode": "live",
                            "dest_country": "SI", "dest_provider": "arnes", **PREPARED,
                            # what the destination offers guests, for the source's check
                            **{f"dest_{k}": v for k, v in OFFERS.items()},
                            "max_downtime_ms": 300, "auto_converge": True, "postcopy": False,
                            "timeout_s": 300.0}
    assert order.expires_at - order.issued_at >= 300 + moves.MIGRATE_TTL_MARGIN_S
    assert _where(db, vm_id) == ("si-a", "running")  # not before the source says so
    _report(db, migrate, "progress", {"data_processed_bytes": 1})  # not taken: not accepted
    assert _move(db, move_id)["progress"] == {}
    _report(db, migrate, "accepted")
    _report(db, migrate, "progress", {"data_processed_bytes": 5, "data_total_bytes": 10})
    assert _move(db, move_id)["progress"] == {"data_processed_bytes": 5,
                                              "data_total_bytes": 10}
    _report(db, migrate, "succeeded", {"downtime_ms": 40, "duration_ms": 2100})
    moves.advance(db, ctx, time.time())
    assert _where(db, vm_id) == ("si-b", "running")
    state, adopt, action, node = _step(db, move_id)
    assert (state, action, node) == ("adopting", "adopt", "si-b")
    _report(db, adopt, "succeeded", {"state": "running"})
    moves.advance(db, ctx, time.time())
    done = _move(db, move_id)
    assert (done["state"], done["result"]["downtime_ms"]) == ("succeeded", 40)
    assert [o["action"] for o in done["orders"]] == ["receive", "migrate", "adopt"]
    assert _usage(db, "si-b") == before_b + 256  # the hold is gone, the VM counts
    stays = db.execute("SELECT event, node_id FROM residency WHERE vm_id = ? ORDER BY seq",
                       [vm_id]).fetchall()
    assert stays == [("arrived", "si-a"), ("left", "si-a"), ("arrived", "si-b")]


def test_a_failed_migrate_asks_the_destination_and_believes_it(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "asked", "si-a")
    move_id = _to_migrating(db, ctx, vm_id)
    _, migrate, _, _ = _step(db, move_id)
    # The source says it failed, but the VM did arrive (e.g. the source failed afterwards).
    _report(db, migrate, "failed", error="connection reset")
    moves.advance(db, ctx, time.time())
    state, release, action, node = _step(db, move_id)
    assert (state, action, node) == ("releasing", "release", "si-b")
    assert _where(db, vm_id)[0] == "si-a"
    _report(db, release, "succeeded", {"present": True, "state": "running"})
    moves.advance(db, ctx, time.time())
    assert _where(db, vm_id)[0] == "si-b"
    assert _step(db, move_id)[2] == "adopt"


def test_a_destination_that_does_not_answer_is_asked_again_then_the_vm_stays(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "unanswered", "si-a")
    move_id = _to_migrating(db, ctx, vm_id)
    _, migrate, _, _ = _step(db, move_id)
    _report(db, migrate, "failed", error="migration aborted after 300 s")
    for _ in range(moves.MAX_ASKS):
        moves.advance(db, ctx, time.time())
        state, release, action, _ = _step(db, move_id)
        assert (state, action) == ("releasing", "release")
        _report(db, release, "failed", error="libvirt is not connected")
    moves.advance(db, ctx, time.time())
    done = _move(db, move_id)
    assert done["state"] == "failed"
    assert "did not say whether the VM arrived" in done["error"]
    assert _where(db, vm_id)[0] == "si-a"
    assert db.execute("SELECT count(*) FROM orders WHERE move_id = ? AND action = 'release'",
                      [move_id]).fetchone()[0] == moves.MAX_ASKS


def test_a_destination_whose_address_is_not_in_its_certificate_is_not_used(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "redirected", "si-a")
    move = moves.start(db, ctx, vm_id, "si-b", moves.MoveSettings(), time.time(), "test")
    _, receive, _, _ = _step(db, move["move"])
    _report(db, receive, "succeeded", {**PREPARED, "address": "10.0.0.3"})  # si-c's
    moves.advance(db, ctx, time.time())
    done = _move(db, move["move"])
    assert done["state"] == "failed"
    assert "10.0.0.3 is not in its certificate" in done["error"]
    assert [o["action"] for o in done["orders"]] == ["receive", "release"]
    assert _where(db, vm_id) == ("si-a", "running")


def test_a_refused_receive_ends_the_move_and_the_vm_stays(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "refused", "si-a")
    before_b = _usage(db, "si-b")
    move = moves.start(db, ctx, vm_id, "si-b", moves.MoveSettings(), time.time(), "test")
    _, receive, _, _ = _step(db, move["move"])
    _report(db, receive, "failed", error="refused: this node is in AT")
    moves.advance(db, ctx, time.time())
    done = _move(db, move["move"])
    assert (done["state"], done["error"]) == (
        "failed", "live move to si-b failed: the destination refused: this node is in AT")
    assert _usage(db, "si-b") == before_b  # nothing held any more
    vm = vms.get(db, vm_id, time.time(), ctx.live)
    assert vm is not None
    assert vm["state_reason"] == done["error"]
    # The VM can be moved again, and acted on, once the move ended.
    assert moves.start(db, ctx, vm_id, "si-c", moves.MoveSettings(mode="cold"),
                       time.time(), "test")["dest"] == "si-c"


def test_a_vm_being_moved_takes_no_other_order(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "busy", "si-a")
    moves.start(db, ctx, vm_id, "si-b", moves.MoveSettings(), time.time(), "test")
    for call in (lambda: vms.act(db, ctx.signer, vm_id, "stop", time.time(), 600, "t"),
                 lambda: moves.start(db, ctx, vm_id, "si-c", moves.MoveSettings(),
                                     time.time(), "t")):
        with pytest.raises(vms.Refused) as err:
            call()
        assert err.value.code == "moving"


def test_a_failed_adopt_is_asked_again(db: Tx,
                                       ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "adopted", "si-a")
    move_id = _to_migrating(db, ctx, vm_id)
    _report(db, _step(db, move_id)[1], "succeeded", {"downtime_ms": 10})
    moves.advance(db, ctx, time.time())
    _report(db, _step(db, move_id)[1], "failed", error="refused: the VM is still arriving")
    moves.advance(db, ctx, time.time())
    state, adopt, action, _ = _step(db, move_id)
    assert (state, action) == ("adopting", "adopt")
    _report(db, adopt, "succeeded", {"state": "running"})
    moves.advance(db, ctx, time.time())
    assert _move(db, move_id)["state"] == "succeeded"


def _lose(db: Tx, node: str, silent_s: float) -> None:
    db.execute("UPDATE nodes SET reported_status = 'offline', last_seen = ? WHERE id = ?",
               [time.time() - silent_s, node])


def test_a_lost_node_s_vm_restarts_elsewhere_only_after_lease_and_grace(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "phoenix", "si-a", on_node_loss="restart")
    stays = _vm(db, ctx, "patient", "si-a")
    long_ago = time.time() - 3600
    _lose(db, "si-a", 80)  # lease 60 + grace 30 not yet passed
    assert moves.restart_lost(db, ctx, time.time(), 30, long_ago) == []
    _lose(db, "si-a", 95)
    # Not while the aggregator itself has heard the broker for less than that.
    assert moves.restart_lost(db, ctx, time.time(), 30, time.time() - 10) == []
    assert moves.restart_lost(db, ctx, time.time(), 30, None) == []
    assert moves.restart_lost(db, ctx, time.time(), 30, long_ago) == [vm_id]
    node, _ = _where(db, vm_id)
    assert node in ("si-b", "si-c")
    assert _where(db, stays)[0] == "si-a"  # it asked to wait for its node
    (move_id,) = db.execute("SELECT id FROM moves WHERE vm_id = ?", [vm_id]).fetchone()
    # No eviction before the VM runs elsewhere.
    assert db.execute("SELECT count(*) FROM evictions").fetchone()[0] == 0
    _report(db, _step(db, move_id)[1], "succeeded", {"state": "running"})
    moves.advance(db, ctx, time.time())
    assert db.execute("SELECT vm_id, node_id FROM evictions").fetchall() == [(vm_id, "si-a")]
    # The node returns: its copy is evicted, and only then does the record say it left.
    db.execute("UPDATE nodes SET reported_status = 'online', last_seen = ? WHERE id = 'si-a'",
               [time.time()])
    assert moves.evict(db, ctx, time.time()) == 1
    assert moves.evict(db, ctx, time.time()) == 0  # one order at a time
    (evict,) = db.execute("SELECT order_id FROM evictions").fetchone()
    _report(db, evict, "succeeded", {"state": "deleted"})
    moves.evict(db, ctx, time.time())
    events = db.execute("SELECT event, node_id FROM residency WHERE vm_id = ? ORDER BY seq",
                        [vm_id]).fetchall()
    assert events == [("arrived", "si-a"), ("arrived", node), ("left", "si-a")]


def _expired_restart(db: Tx, ctx: moves.Context,
                     name: str) -> tuple[str, str, str, float]:
    """A VM restarted off lost si-a whose create expired: (vm, move, its destination, when)."""
    vm_id = _vm(db, ctx, name, "si-a", on_node_loss="restart")
    _lose(db, "si-a", 200)
    assert moves.restart_lost(db, ctx, time.time(), 30, 0.0) == [vm_id]
    (move_id, dest) = db.execute("SELECT id, dest FROM moves WHERE vm_id = ?",
                                 [vm_id]).fetchone()
    later = time.time() + 700
    orders.expire(db, later)
    moves.advance(db, ctx, later)
    state, _, action, node = _step(db, move_id)
    assert (state, action, node) == ("releasing", "release", dest)  # did you make it?
    assert db.execute("SELECT count(*) FROM evictions").fetchone()[0] == 0
    return vm_id, move_id, dest, later


def test_a_restart_whose_create_expired_untaken_is_tried_again(
        db: Tx, ctx: moves.Context) -> None:
    vm_id, move_id, dest, later = _expired_restart(db, ctx, "retry-me")
    _report(db, _step(db, move_id)[1], "succeeded", {"present": False})
    moves.advance(db, ctx, later)
    done = _move(db, move_id)
    assert done["state"] == "failed"
    assert done["error"] == (f"restart on {dest}: its create order expired before {dest} took"
                             " it; the VM is still on si-a")
    assert _where(db, vm_id) == ("si-a", "unknown")
    assert db.execute("SELECT count(*) FROM evictions").fetchone()[0] == 0
    # Not at once; after RESTART_RETRY_S, elsewhere again.
    assert moves.restart_lost(db, ctx, later + 1, 30, 0.0) == []
    retry_at = later + moves.RESTART_RETRY_S + 1
    db.execute("UPDATE nodes SET last_seen = ? WHERE id != 'si-a'", [retry_at])  # still there
    assert moves.restart_lost(db, ctx, retry_at, 30, 0.0) == [vm_id]
    assert _where(db, vm_id)[0] in ("si-b", "si-c")


def test_a_restart_whose_create_expired_but_ran_counts_where_it_runs(
        db: Tx, ctx: moves.Context) -> None:
    vm_id, move_id, dest, later = _expired_restart(db, ctx, "made-late")
    _report(db, _step(db, move_id)[1], "succeeded", {"present": True, "state": "running"})
    moves.advance(db, ctx, later)
    assert _move(db, move_id)["state"] == "succeeded"
    assert _where(db, vm_id) == (dest, "running")
    assert db.execute("SELECT vm_id, node_id FROM evictions").fetchall() == [(vm_id, "si-a")]
    # The create's own report, late, adds no second arrival.
    (create,) = db.execute("SELECT id FROM orders WHERE vm_id = ? AND node_id = ? AND action"
                           " = 'create'", [vm_id, dest]).fetchone()
    _report(db, create, "succeeded", {"state": "running"})
    events = db.execute("SELECT event, node_id FROM residency WHERE vm_id = ? ORDER BY seq",
                        [vm_id]).fetchall()
    assert events == [("arrived", "si-a"), ("arrived", dest)]


def test_a_restart_whose_destination_never_answers_keeps_the_lost_copy(
        db: Tx, ctx: moves.Context) -> None:
    _, move_id, _, later = _expired_restart(db, ctx, "unsure")
    for _ask in range(moves.MAX_ASKS):
        later += 700
        orders.expire(db, later)
        moves.advance(db, ctx, later)
    done = _move(db, move_id)
    assert done["state"] == "failed"
    assert done["error"].endswith("the copy on si-a is kept")
    assert [o["action"] for o in done["orders"]] == ["create"] + ["release"] * moves.MAX_ASKS
    assert db.execute("SELECT count(*) FROM evictions").fetchone()[0] == 0


def test_orders_still_open_for_a_lost_node_are_superseded(
        db: Tx, ctx: moves.Context) -> None:
    vm_id = _vm(db, ctx, "reboot-me", "si-a", on_node_loss="restart")
    stale = vms.act(db, ctx.signer, vm_id, "reboot", time.time(), 600, "t")["order"]
    _lose(db, "si-a", 200)
    assert moves.restart_lost(db, ctx, time.time(), 30, 0.0) == [vm_id]
    (state, error) = db.execute("SELECT state, error FROM orders WHERE id = ?",
                                [stale]).fetchone()
    assert state == "expired"
    assert error.startswith("superseded: the VM was restarted on")
    assert orders.due(db, time.time()) == [d for d in orders.due(db, time.time())
                                                if d.node_id != "si-a"]


def test_anti_affinity_counts_the_vms_on_their_way(db: Tx,
                                                   ctx: moves.Context) -> None:
    conn = db
    made = []
    for name, node in (("db-1", "si-a"), ("db-2", "si-b")):
        conn.execute("UPDATE nodes SET cordoned = (id != ?)", (node,))
        vm = vms.create(conn, ctx.signer, vms.VmRequest.from_json(
            {"name": name, "vcpus": 1, "memory_mib": 256,
             "placement": {"anti_affinity": "db"}}), time.time(), ctx.profiles, ctx.live, 600,
            "test")
        _report(db, vm["order"], "succeeded", {"state": "running"})
        made.append(vm["id"])
    conn.execute("UPDATE nodes SET cordoned = 0")
    first = moves.start(conn, ctx, made[0], "", moves.MoveSettings(), time.time(), "test")
    assert first["dest"] == "si-c"  # not si-b, where db-2 runs
    # db-1 is on its way to si-c and still on si-a: db-2 has nowhere to go.
    with pytest.raises(vms.Refused) as err:
        moves.start(conn, ctx, made[1], "", moves.MoveSettings(), time.time(), "test")
    assert err.value.code == "no_placement"
    with pytest.raises(vms.Refused) as err:
        moves.start(conn, ctx, made[1], "si-c", moves.MoveSettings(), time.time(), "test")
    assert "anti-affinity: already runs a VM of group db" in str(err.value)


def test_an_accepted_order_is_asked_about_again_until_its_end_is_reported(
        db: Tx, ctx: moves.Context) -> None:
    """Its final report may be lost (a broker crash after acknowledging it): the node answers
    a repeat with the outcome it recorded."""
    vm_id = _vm(db, ctx, "quiet", "si-a")
    order = vms.act(db, ctx.signer, vm_id, "stop", time.time(), 600, "t")["order"]
    _report(db, order, "accepted")
    now = time.time()
    assert order not in {d.order_id for d in orders.due(db, now)}
    later = now + orders.ACCEPTED_RECHECK_S + 1
    assert order in {d.order_id for d in orders.due(db, later)}
    orders.mark_sent(db, [order], later)
    (state,) = db.execute("SELECT state FROM orders WHERE id = ?", [order]).fetchone()
    assert state == "accepted"  # still; only asked again
    assert order not in {d.order_id for d in orders.due(db, later + 1)}
    _report(db, order, "succeeded", {"state": "shut off"})
    assert order not in {d.order_id for d in orders.due(db, later + 3600)}


def test_a_vm_moves_only_to_a_node_of_its_own_arch(db: Tx,
                                                   ctx: moves.Context) -> None:
    """A node that runs other guests (its images are for one architecture) is never chosen,
    and refused when named; a node that does not say its arch is not held against."""
    for node, arch in (("si-a", "x86_64"), ("si-b", "aarch64"), ("si-c", "x86_64")):
        db.execute("UPDATE nodes SET inventory = json_set(inventory, '$.arch', ?) WHERE id = ?",
                   [arch, node])
    vm_id = _vm(db, ctx, "x86-only", "si-a")
    with pytest.raises(vms.Refused) as err:
        moves.start(db, ctx, vm_id, "si-b", moves.MoveSettings(), time.time(), "test")
    assert err.value.status == 409
    assert str(err.value) == ("si-b cannot take the VM: it runs aarch64 guests, the VM is"
                              " an x86_64 guest")
    for _ in range(5):  # si-b is the emptiest, and never picked
        move = moves.start(db, ctx, vm_id, "", moves.MoveSettings(), time.time(), "test")
        assert move["dest"] == "si-c"
        _report(db, _step(db, move["move"])[1], "failed", error="refused: test")
        moves.advance(db, ctx, time.time())
    db.execute("UPDATE nodes SET cordoned = 1 WHERE id = 'si-c'")
    with pytest.raises(vms.Refused) as err:
        moves.start(db, ctx, vm_id, "", moves.MoveSettings(), time.time(), "test")
    assert "(it needs an x86_64 node)" in str(err.value)
    db.execute("UPDATE nodes SET inventory = json_remove(inventory, '$.arch')"
               " WHERE id = 'si-b'")
    assert moves.start(db, ctx, vm_id, "", moves.MoveSettings(), time.time(),
                       "test")["dest"] == "si-b"


def test_a_move_whose_row_cannot_be_read_fails_alone_and_is_tried_again(
        db: Tx, ctx: moves.Context, caplog: pytest.LogCaptureFixture) -> None:
    good, bad = _vm(db, ctx, "good", "si-a"), _vm(db, ctx, "bad", "si-a")
    good_move = moves.start(db, ctx, good, "si-b", moves.MoveSettings(), time.time(), "t")
    bad_move = moves.start(db, ctx, bad, "si-c", moves.MoveSettings(), time.time(), "t")
    for move in (good_move, bad_move):
        _report(db, _step(db, move["move"])[1], "succeeded", PREPARED)
    db.execute("UPDATE orders SET result = 'not json' WHERE id = ?",
               [_step(db, bad_move["move"])[1]])
    assert moves.advance(db, ctx, time.time()) == 2
    assert _step(db, good_move["move"])[0] == "migrating"
    assert _step(db, bad_move["move"])[0] == "preparing"  # rolled back, and asked again later
    assert f"move {bad_move['move']} failed; it is tried again at the next turn" in caplog.text
    assert db.execute("SELECT count(*) FROM orders WHERE move_id = ?",
                      [bad_move["move"]]).fetchone()[0] == 1
