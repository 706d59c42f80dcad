"""Placement's repository on a real SQLite file: scopes, committed figures, anti-affinity
holders, reservations and the create's shortlist (the rules themselves are tested with the
domain, tests/aggregator/workloads/test_placement.py)."""

from __future__ import annotations

import pytest

from aggregator.store import placement as repo
from aggregator.store.tx import Tx
from tests.aggregator.store.rows import add_move, add_node, add_vm

NOW = 1_000_000.0
MIB = 1024 * 1024


@pytest.fixture
def fleet(tx: Tx) -> Tx:
    def inv(cpus: int, memory_mib: int) -> dict[str, int]:
        return {"cpus": cpus, "memory_bytes": memory_mib * MIB}

    add_node(tx, "si-1", site="lj-1", country="SI", provider="a1", profile="tower-5g",
             reported_status="online", last_seen=NOW - 1, inventory=inv(4, 16384),
             facts={"disk_gib": 100})
    add_node(tx, "si-2", site="lj-2", country="SI", provider="t", profile="edge-server",
             reported_status="online", last_seen=NOW - 1, inventory=inv(16, 65536))
    add_node(tx, "at-1", site="vie", country="AT", provider="a1", profile="rack-server",
             reported_status="online", last_seen=NOW - 600, inventory=inv(64, 262144))
    add_vm(tx, "v1", "si-1", vcpus=2, memory_mib=4096, disk_gib=10, anti_affinity="web")
    add_vm(tx, "v2", "si-1", vcpus=1, memory_mib=1024, disk_gib=5)
    add_vm(tx, "v3", "at-1", vcpus=1, memory_mib=1024, disk_gib=5, anti_affinity="web",
           deleted_at=NOW)
    return tx


@pytest.mark.parametrize(("scope", "expected"), [
    (repo.EVERY_NODE, ["at-1", "si-1", "si-2"]),
    (repo.Scope(countries=("SI",)), ["si-1", "si-2"]),
    (repo.Scope(countries=("SI", "AT"), providers=("a1",)), ["at-1", "si-1"]),
    (repo.Scope(sites=("vie",)), ["at-1"]),
    (repo.Scope(profiles=("edge-server", "rack-server")), ["at-1", "si-2"]),
    (repo.Scope(profiles=()), []),  # no profile allowed: no node
    (repo.Scope(countries=("DE",)), []),
])
def test_nodes_in_a_scope(fleet: Tx, scope: repo.Scope, expected: list[str]) -> None:
    assert sorted(n.id for n in repo.nodes(fleet, scope)) == expected


def test_a_node_row_holds_the_stored_columns(fleet: Tx) -> None:
    (row,) = repo.nodes(fleet, repo.Scope(sites=("lj-1",)))
    assert row == repo.NodeRow(
        "si-1", "lj-1", "SI", "a1", "tower-5g", "online", NOW - 1, 10.0, None, 0,
        '{"cpus": 4, "memory_bytes": 17179869184}', '{"disk_gib": 100}')


def test_usage_counts_live_vms_and_what_open_moves_hold(fleet: Tx) -> None:
    assert repo.usage(fleet, repo.EVERY_NODE) == {"si-1": (3, 5120, 15)}
    add_move(fleet, "m1", "v2", "si-1", "si-2", held=(1, 1024, 5))
    assert repo.usage(fleet, repo.EVERY_NODE) == {"si-1": (3, 5120, 15),
                                                  "si-2": (1, 1024, 5)}
    assert repo.usage(fleet, repo.Scope(providers=("t",))) == {"si-2": (1, 1024, 5)}
    assert repo.usage(fleet, repo.Scope(profiles=())) == {}


def test_group_nodes_are_where_a_live_vm_of_the_group_is_or_is_going(fleet: Tx) -> None:
    assert repo.group_nodes(fleet, "web") == {"si-1"}  # v3 on at-1 is deleted
    add_move(fleet, "m1", "v1", "si-1", "si-2")
    add_move(fleet, "m2", "v3", "at-1", "si-2", finished_at=NOW)  # finished: not going
    assert repo.group_nodes(fleet, "web") == {"si-1", "si-2"}
    assert repo.group_nodes(fleet, "db") == frozenset()
    fleet.execute("UPDATE moves SET dest = '' WHERE id = 'm1'")  # no destination found
    assert repo.group_nodes(fleet, "web") == {"si-1"}


def test_reservations_are_saved_and_changed(fleet: Tx) -> None:
    def saved() -> dict[str, tuple[int, int]]:
        return {p: (c, m) for p, c, m in fleet.execute(
            "SELECT profile, cpus, memory_mib FROM profile_reservations")}

    repo.save_reservations(fleet, [repo.Reservation("tower-5g", 1, 2048),
                                   repo.Reservation("edge-server", 2, 4096)])
    repo.save_reservations(fleet, [repo.Reservation("tower-5g", 1, 3072)])
    assert saved() == {"tower-5g": (1, 3072), "edge-server": (2, 4096)}


def _roomiest(tx: Tx, scope: repo.Scope = repo.EVERY_NODE, limit: int = 10,
              **need: int) -> list[repo.RoomyNode]:
    sizes = {"vcpus": 1, "memory_mib": 1024, "disk_gib": 1, **need}
    return repo.roomiest(
        tx, scope, [repo.Reservation("tower-5g", 1, 2048)], cpu_overcommit=4.0, now=NOW,
        heartbeat_factor=3.0, min_timeout_s=5.0, limit=limit, **sizes)


def test_roomiest_keeps_online_nodes_with_room_by_headroom(fleet: Tx) -> None:
    repo.save_reservations(fleet, [repo.Reservation("tower-5g", 1, 2048)])
    rows = _roomiest(fleet)
    assert [r.id for r in rows] == ["si-2", "si-1"]  # at-1 is silent; si-2 is the emptiest
    assert rows[1] == repo.RoomyNode("si-1", "lj-1", "SI", "a1", "tower-5g", 3, 14336, 100,
                                     3, 5120, 15)
    assert [r.id for r in _roomiest(fleet, limit=1)] == ["si-2"]
    assert [r.id for r in _roomiest(fleet, repo.Scope(providers=("a1",)))] == ["si-1"]
    assert _roomiest(fleet, repo.Scope(profiles=())) == []
    # si-1: 9216 MiB free, 12 - 3 vCPUs, 85 GiB; si-2 has no known disk (not checked)
    assert [r.id for r in _roomiest(fleet, memory_mib=9217)] == ["si-2"]
    assert [r.id for r in _roomiest(fleet, vcpus=10)] == ["si-2"]
    assert [r.id for r in _roomiest(fleet, disk_gib=86)] == ["si-2"]
    fleet.execute("UPDATE nodes SET cordoned = 1 WHERE id = 'si-2'")
    assert [r.id for r in _roomiest(fleet, memory_mib=9216)] == ["si-1"]
