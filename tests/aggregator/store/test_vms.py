"""The VMs' repository on a real SQLite file: what is written reads back as plain data."""

from __future__ import annotations

import dataclasses

from aggregator.store import moves as moves_repo
from aggregator.store import vms as repo
from aggregator.store.tx import Tx
from tests.aggregator.store.rows import add_move, add_node, add_order, add_vm


def _new(vm_id: str = "vm-1", name: str = "web", node_id: str = "n1") -> repo.NewVm:
    return repo.NewVm(
        id=vm_id, name=name, node_id=node_id, vcpus=2, memory_mib=1024, disk_gib=10,
        request={"name": name, "placement": {"countries": ["SI"]}},
        spec={"uuid": vm_id, "name": name, "countries": ["SI"]}, anti_affinity="g",
        on_node_loss="restart", desired_state="running", actual_state="pending",
        created_at=5.0)


def test_a_new_vm_reads_back(tx: Tx) -> None:
    add_node(tx, "n1", reported_status="online", last_seen=4.0)
    repo.insert_vm(tx, _new())
    assert repo.name_in_use(tx, "web")
    assert not repo.name_in_use(tx, "db")
    assert repo.vm_state(tx, "vm-1") == repo.VmState("n1", "running")
    row = repo.find_vm(tx, "web")
    assert row == repo.VmRow(
        "vm-1", "web", "n1", 2, 1024, 10, {"name": "web", "placement": {"countries": ["SI"]}},
        "running", "pending", "", 5.0, 5.0, "online", 4.0, 10.0, None)
    assert repo.find_vm(tx, "vm-1") == row
    assert repo.vm_specs(tx, "vm-1") == repo.VmSpecs(
        {"name": "web", "placement": {"countries": ["SI"]}},
        {"uuid": "vm-1", "name": "web", "countries": ["SI"]})
    assert repo.vm_specs(tx, "nope") is None
    assert repo.live_vm_id(tx, "web") == repo.live_vm_id(tx, "vm-1") == "vm-1"


def test_a_vm_of_a_node_that_has_gone_has_no_node_columns(tx: Tx) -> None:
    repo.insert_vm(tx, _new(node_id="gone"))
    row = repo.find_vm(tx, "web")
    assert row is not None
    assert (row.node_reported_status, row.node_last_seen, row.node_interval_s,
            row.node_revoked_at) == (None, None, None, None)


def test_states_change_and_a_deleted_vm_is_found_only_as_history(tx: Tx) -> None:
    repo.insert_vm(tx, _new())
    repo.set_desired_state(tx, "vm-1", "stopped", 7.0)
    row = repo.find_vm(tx, "vm-1")
    assert row is not None
    assert (row.desired_state, row.updated_at) == ("stopped", 7.0)
    repo.mark_deleted(tx, "vm-1", 9.0)
    assert repo.vm_state(tx, "vm-1") is None
    assert repo.find_vm(tx, "web") is None
    assert repo.live_vm_id(tx, "web") is None
    assert not repo.name_in_use(tx, "web")
    assert repo.newest_vm_id(tx, "web") == "vm-1"
    repo.insert_vm(tx, dataclasses.replace(_new("vm-2"), created_at=8.0))  # the name, later
    assert repo.newest_vm_id(tx, "web") == "vm-2"
    assert repo.vm_specs(tx, "vm-1") is not None  # a deleted VM keeps its specs


def test_live_vms_by_name_on_a_node_or_everywhere(tx: Tx) -> None:
    repo.insert_vm(tx, _new("a", "zeta", "n1"))
    repo.insert_vm(tx, _new("b", "alpha", "n2"))
    repo.insert_vm(tx, _new("c", "mid", "n1"))
    repo.mark_deleted(tx, "c", 1.0)
    assert [v.name for v in repo.live_vms(tx)] == ["alpha", "zeta"]
    assert [v.name for v in repo.live_vms(tx, "n1")] == ["zeta"]
    assert repo.live_vms(tx, "n3") == []


def test_open_move_and_last_order(tx: Tx) -> None:
    repo.insert_vm(tx, _new())
    assert moves_repo.open_move(tx, "vm-1") is None
    add_move(tx, "m0", "vm-1", "n1", "n2", finished_at=3.0)
    assert moves_repo.open_move(tx, "vm-1") is None
    add_move(tx, "m1", "vm-1", "n1", "n2")
    assert moves_repo.open_move(tx, "vm-1") == "m1"
    assert repo.last_order(tx, "vm-1", "delete") is None
    add_order(tx, "o1", "n1", 1, "vm-1", "delete", "failed")
    add_order(tx, "o2", "n1", 2, "vm-1", "delete", "sent")
    add_order(tx, "o3", "n1", 3, "vm-1", "start", "pending")
    assert repo.last_order(tx, "vm-1", "delete") == repo.OrderState("o2", "sent")


def test_idle_vms(tx: Tx) -> None:
    add_node(tx, "n1", reported_status="online", last_seen=99.0)
    add_node(tx, "revoked", reported_status="online", last_seen=99.0, revoked_at=50.0)
    states = {"paused": "n1", "crashed": "n1", "running": "n1", "shut off": "revoked",
              "pending": "n1"}
    for i, (actual, node) in enumerate(states.items()):
        add_vm(tx, f"v{i}", node, actual_state=actual)
    add_vm(tx, "stopped", "n1", actual_state="paused", desired_state="stopped")
    add_vm(tx, "deleted", "n1", actual_state="paused", deleted_at=1.0)
    add_vm(tx, "ordered", "n1", actual_state="paused")
    add_order(tx, "o1", "n1", 1, "ordered", "stop", "accepted")
    add_vm(tx, "started", "n1", actual_state="paused")
    add_order(tx, "o2", "n1", 2, "started", "start", "succeeded", created_at=95.0)
    add_vm(tx, "long-ago", "n1", actual_state="paused")
    add_order(tx, "o3", "n1", 3, "long-ago", "start", "succeeded", created_at=10.0)
    add_vm(tx, "moving", "n1", actual_state="paused")
    add_move(tx, "m1", "moving", "n1", "n2")

    idle = repo.idle_vms(tx, actual_states=("paused", "crashed", "shut off"),
                         open_order_states=("pending", "sent", "accepted"), no_start_since=40.0)
    assert sorted(idle) == [repo.IdleVm("long-ago", "n1", "online", 99.0, 10.0),
                            repo.IdleVm("v0", "n1", "online", 99.0, 10.0),
                            repo.IdleVm("v1", "n1", "online", 99.0, 10.0)]
