"""Placement: the rules one by one and together, ranking, property tests (never overbook, never
break a policy, every node exactly once), untrusted policies, and the loader on a real SQLite
file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.store.tx import Tx
from aggregator.store.writer import open_tx
from aggregator.workloads.placement import (
    Decision,
    Demand,
    NodeView,
    Policy,
    load_nodes,
    place,
    reasons,
    shortlist,
    sync_reservations,
)
from contract.profiles import Profile

MIB = 1024 * 1024


def node(id: str = "n1", **changes: Any) -> NodeView:
    """An online tower-5g box in SI with room to spare, changed by ``changes``."""
    base = NodeView(
        id=id, status="online", cordoned=False, country="SI", provider="telekom",
        site="lj-1", profile="tower-5g", labels={"class": "tower", "power": "battery-backed"},
        cpus=3, memory_mib=14336, disk_gib=256, used_vcpus=0, used_memory_mib=0,
        used_disk_gib=0, groups=frozenset(),
    )
    return dataclasses.replace(base, **changes)


def demand(vcpus: int = 1, memory_mib: int = 1024, disk_gib: int = 10,
           **policy: Any) -> Demand:
    return Demand(vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib,
                  policy=Policy(**policy))


# --- each rule, alone --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "want", "expected"),
    [
        ({}, {}, ()),
        ({"status": "offline"}, {}, ("offline",)),
        ({"status": "revoked"}, {}, ("revoked",)),
        ({"cordoned": True}, {}, ("cordoned",)),
        ({"country": "AT"}, {"countries": ("SI",)}, ("country AT not in SI",)),
        ({"country": "AT"}, {"countries": ("SI", "HR")}, ("country AT not in SI, HR",)),
        ({"country": "AT"}, {"countries": ("AT", "SI")}, ()),
        ({"provider": "a1"}, {"providers": ("telekom",)}, ("provider a1 not in telekom",)),
        ({"site": "mb-2"}, {"sites": ("lj-1",)}, ("site mb-2 not in lj-1",)),
        ({"profile": "edge-server"}, {"profile": "tower-5g"},
         ("profile edge-server, not tower-5g",)),
        ({"labels": {"class": "rack"}}, {"labels": {"class": "tower"}},
         ("label class=rack, not tower",)),
        ({"labels": {}}, {"labels": {"gpu": "none"}}, ("label gpu unset, not none",)),
        ({}, {"labels": {"class": "tower"}}, ()),
        ({"groups": frozenset({"cams"})}, {"anti_affinity": "cams"},
         ("anti-affinity: already runs a VM of group cams",)),
        ({"groups": frozenset({"dbs"})}, {"anti_affinity": "cams"}, ()),
        ({"groups": frozenset({"cams"})}, {}, ()),  # the demand has no group
        ({"used_memory_mib": 13312}, {"memory_mib": 4096},
         ("memory: needs 4096 MiB, 1024 MiB free of 14336",)),
        ({"used_memory_mib": 13312}, {"memory_mib": 1024}, ()),  # exactly full is allowed
        ({"used_memory_mib": 13313}, {"memory_mib": 1024},
         ("memory: needs 1024 MiB, 1023 MiB free of 14336",)),
        ({"used_disk_gib": 246}, {"disk_gib": 10}, ()),
        ({"used_memory_mib": 20000}, {}, ("memory: needs 1024 MiB, 0 MiB free of 14336",)),
        ({"used_disk_gib": 250}, {"disk_gib": 10}, ("disk: needs 10 GiB, 6 GiB free of 256",)),
        ({"disk_gib": 0, "used_disk_gib": 500}, {"disk_gib": 10}, ()),  # unknown: not checked
        # 3 CPUs x 4.0 = 12 vCPUs
        ({"used_vcpus": 10}, {"vcpus": 2}, ()),
        ({"used_vcpus": 11}, {"vcpus": 2},
         ("vcpus: needs 2, 1 free of 12 (3 CPUs overcommitted)",)),
        ({"cpus": 0, "memory_mib": 0}, {},  # never reported an inventory
         ("vcpus: needs 1, 0 free of 0 (0 CPUs overcommitted)",
          "memory: needs 1024 MiB, 0 MiB free of 0")),
    ],
)
def test_one_rule(changes: dict[str, Any], want: dict[str, Any],
                  expected: tuple[str, ...]) -> None:
    sizing = {k: want.pop(k) for k in ("vcpus", "memory_mib", "disk_gib") if k in want}
    d = demand(**sizing, **want)
    n = node(**changes)
    decision = place(d, [n])
    if expected:
        assert decision == Decision(candidates=(), rejected=(("n1", expected),))
    else:
        assert [c[0] for c in decision.candidates] == ["n1"]
        assert decision.rejected == ()
    assert reasons(d, n) == expected


def test_every_failing_rule_is_listed_in_table_order() -> None:
    n = node(status="revoked", cordoned=True, country="AT", provider="a1", site="vie-1",
             profile="edge-server", labels={"class": "edge"}, groups=frozenset({"cams"}),
             used_vcpus=12, used_memory_mib=14000, used_disk_gib=256)
    d = demand(vcpus=1, memory_mib=512, disk_gib=1, countries=("SI",), providers=("telekom",),
               sites=("lj-1",), profile="tower-5g", labels={"class": "tower", "power": "mains"},
               anti_affinity="cams")
    assert place(d, [n]).rejected == (("n1", (
        "revoked",
        "cordoned",
        "country AT not in SI",
        "provider a1 not in telekom",
        "site vie-1 not in lj-1",
        "profile edge-server, not tower-5g",
        "label class=edge, not tower",
        "label power unset, not mains",
        "anti-affinity: already runs a VM of group cams",
        "vcpus: needs 1, 0 free of 12 (3 CPUs overcommitted)",
        "memory: needs 512 MiB, 336 MiB free of 14336",
        "disk: needs 1 GiB, 0 GiB free of 256",
    )),)


@pytest.mark.parametrize(("ratio", "fits"), [(1.0, False), (1.5, True), (4.0, True)])
def test_cpu_overcommit_ratio(ratio: float, fits: bool) -> None:
    d = demand(vcpus=2)
    n = node(cpus=3, used_vcpus=2)  # floor(3 x 1.5) = 4 = 2 + 2
    assert bool(place(d, [n], cpu_overcommit=ratio).candidates) is fits


@pytest.mark.parametrize("ratio", [0.0, -1.0, math.nan, math.inf])
def test_bad_overcommit_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match="cpu_overcommit"):
        place(demand(), [node()], cpu_overcommit=ratio)


def test_a_node_listed_twice_is_a_bug() -> None:
    with pytest.raises(ValueError, match="n1 is listed twice"):
        place(demand(), [node(), node()])


# --- ranking ---------------------------------------------------------------------------------


def test_candidates_rank_by_headroom_on_the_tightest_resource() -> None:
    d = demand(vcpus=1, memory_mib=1024, disk_gib=16)
    nodes = [
        node("empty"),                                # vCPUs 11/12 left: 0.916667
        node("half-memory", used_memory_mib=7168),    # 6144/14336: 0.428571
        node("disk-tight", used_disk_gib=200),        # disk 40/256: 0.15625
        node("cpu-tight", used_vcpus=9),              # vCPUs 2/12: 0.166667
        node("b-twin"), node("a-twin"),               # ties go to the smaller id
    ]
    decision = place(d, nodes)
    assert decision.candidates == (
        ("a-twin", 0.916667), ("b-twin", 0.916667), ("empty", 0.916667),
        ("half-memory", 0.428571), ("cpu-tight", 0.166667), ("disk-tight", 0.15625),
    )


def test_unknown_disk_is_left_out_of_the_score() -> None:
    decision = place(demand(disk_gib=100), [node(disk_gib=0, cpus=30)])
    assert decision.candidates == (("n1", round(13312 / 14336, 6)),)  # memory is tightest


def test_rejected_are_sorted_by_id_and_json_has_the_documented_shape() -> None:
    decision = place(demand(countries=("SI",)),
                     [node("z", cordoned=True), node("m"), node("a", country="AT")])
    assert decision.to_json() == {
        "candidates": [{"node": "m", "score": 0.916667}],
        "rejected": [{"node": "a", "reasons": ["country AT not in SI"]},
                     {"node": "z", "reasons": ["cordoned"]}],
    }
    assert json.loads(json.dumps(decision.to_json())) == decision.to_json()


def test_an_empty_fleet_has_no_candidates() -> None:
    assert place(demand(), []) == Decision((), ())


# --- properties -----------------------------------------------------------------------------

COUNTRIES = ("SI", "AT", "HR")
PROVIDERS = ("telekom", "a1")
SITES = ("s1", "s2", "s3")
PROFILES = ("tower-5g", "edge-server")
GROUPS = ("cams", "dbs")
LABELS = st.dictionaries(st.sampled_from(("class", "gpu")),
                         st.sampled_from(("tower", "edge", "none")), max_size=2)


@st.composite
def nodes_st(draw: st.DrawFn) -> list[NodeView]:
    count = draw(st.integers(0, 12))
    out = []
    for i in range(count):
        memory = draw(st.integers(0, 16384))
        disk = draw(st.integers(0, 500))
        out.append(NodeView(
            id=f"n{i:02d}", status=draw(st.sampled_from(("online", "online", "offline",
                                                          "revoked"))),
            cordoned=draw(st.booleans()), country=draw(st.sampled_from(COUNTRIES)),
            provider=draw(st.sampled_from(PROVIDERS)), site=draw(st.sampled_from(SITES)),
            profile=draw(st.sampled_from(PROFILES)), labels=draw(LABELS),
            cpus=draw(st.integers(0, 16)), memory_mib=memory, disk_gib=disk,
            used_vcpus=draw(st.integers(0, 40)), used_memory_mib=draw(st.integers(0, memory)),
            used_disk_gib=draw(st.integers(0, disk)),
            groups=frozenset(draw(st.lists(st.sampled_from(GROUPS), max_size=2))),
        ))
    return out


POLICIES = st.builds(
    Policy,
    countries=st.lists(st.sampled_from(COUNTRIES), max_size=2, unique=True).map(tuple),
    providers=st.lists(st.sampled_from(PROVIDERS), max_size=1).map(tuple),
    sites=st.lists(st.sampled_from(SITES), max_size=2, unique=True).map(tuple),
    labels=LABELS,
    profile=st.none() | st.sampled_from(PROFILES),
    anti_affinity=st.none() | st.sampled_from(GROUPS),
)
DEMANDS = st.builds(Demand, vcpus=st.integers(1, 8), memory_mib=st.integers(1, 8192),
                    disk_gib=st.integers(0, 200), policy=POLICIES)
RATIOS = st.sampled_from((1.0, 1.5, 4.0))


def _fits(d: Demand, n: NodeView, ratio: float) -> bool:
    """The rules, written out once more from the issue's words."""
    p = d.policy
    return (n.status == "online" and not n.cordoned
            and n.used_memory_mib + d.memory_mib <= n.memory_mib
            and (n.disk_gib == 0 or n.used_disk_gib + d.disk_gib <= n.disk_gib)
            and n.used_vcpus + d.vcpus <= n.cpus * ratio
            and (not p.countries or n.country in p.countries)
            and (not p.providers or n.provider in p.providers)
            and (not p.sites or n.site in p.sites)
            and (p.profile is None or n.profile == p.profile)
            and all(n.labels.get(k) == v for k, v in p.labels.items())
            and (p.anti_affinity is None or p.anti_affinity not in n.groups))


@given(DEMANDS, nodes_st(), RATIOS)
@settings(max_examples=400, deadline=None)
def test_candidates_are_exactly_the_nodes_that_fit(d: Demand, nodes: list[NodeView],
                                                   ratio: float) -> None:
    decision = place(d, nodes, cpu_overcommit=ratio)
    by_id = {n.id: n for n in nodes}
    chosen = [c for c, _ in decision.candidates]
    ruled_out = [r for r, _ in decision.rejected]
    assert sorted(chosen + ruled_out) == sorted(by_id)  # every node exactly once
    for node_id, score in decision.candidates:
        assert _fits(d, by_id[node_id], ratio)
        assert 0.0 <= score <= 1.0
        assert reasons(d, by_id[node_id], cpu_overcommit=ratio) == ()
    for node_id, why in decision.rejected:
        assert not _fits(d, by_id[node_id], ratio)
        assert why
        assert why == reasons(d, by_id[node_id], cpu_overcommit=ratio)
    assert list(decision.candidates) == sorted(decision.candidates, key=lambda c: (-c[1], c[0]))
    assert ruled_out == sorted(ruled_out)


@given(st.lists(DEMANDS, min_size=1, max_size=30), nodes_st(), RATIOS)
@settings(max_examples=200, deadline=None)
def test_placing_one_after_another_never_overbooks(demands: list[Demand],
                                                   nodes: list[NodeView],
                                                   ratio: float) -> None:
    # Start from nodes that are not overbooked already (overcommitted vCPUs included).
    fleet = {n.id: dataclasses.replace(n, used_vcpus=min(n.used_vcpus,
                                                         math.floor(n.cpus * ratio)))
             for n in nodes}
    for d in demands:
        decision = place(d, fleet.values(), cpu_overcommit=ratio)
        if not decision.candidates:
            continue
        n = fleet[decision.candidates[0][0]]
        if d.policy.anti_affinity is not None:
            assert d.policy.anti_affinity not in n.groups
        fleet[n.id] = n = dataclasses.replace(
            n, used_vcpus=n.used_vcpus + d.vcpus,
            used_memory_mib=n.used_memory_mib + d.memory_mib,
            used_disk_gib=n.used_disk_gib + d.disk_gib,
            groups=n.groups | ({d.policy.anti_affinity} if d.policy.anti_affinity else set()))
        assert n.used_memory_mib <= n.memory_mib
        assert n.used_vcpus <= n.cpus * ratio
        assert n.disk_gib == 0 or n.used_disk_gib <= n.disk_gib


# --- untrusted policies and sizes --------------------------------------------------------------


def test_policy_from_json_reads_the_issue_example() -> None:
    policy = Policy.from_json({"countries": ["SI"], "providers": [], "sites": [], "labels": {},
                               "profile": None, "anti_affinity": None})
    assert policy == Policy(countries=("SI",))
    assert Policy.from_json(None) == Policy()
    assert Policy.from_json({}) == Policy()
    full = {"countries": ["SI", "HR", "SI"], "providers": ["telekom"], "sites": ["lj 1"],
            "labels": {"class": "tower"}, "profile": "tower-5g", "anti_affinity": "cams"}
    policy = Policy.from_json(full)
    assert policy.countries == ("SI", "HR")  # repeats dropped, order kept
    assert policy.to_json() == {**full, "countries": ["SI", "HR"]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "placement: expected an object, got list"),
        ({"country": ["SI"]}, "unknown key 'country'"),
        ({"countries": "SI"}, "placement.countries: expected a list of strings or null"),
        ({"countries": ["si"]}, r"placement.countries\[0\]: 'si' is not an ISO 3166"),
        ({"countries": ["SI", 7]}, r"placement.countries\[1\]: expected a string, got int"),
        ({"countries": [True]}, r"placement.countries\[0\]: expected a string, got bool"),
        ({"countries": ["SI"] * 65}, "more than 64 entries"),
        ({"providers": ["x" * 65]}, r"placement.providers\[0\]: longer than 64"),
        ({"sites": [""]}, r"placement.sites\[0\]: '' is not a site name"),
        ({"labels": ["class"]}, "placement.labels: expected an object"),
        ({"labels": {"class": 1}}, "placement.labels.class: expected a string, got int"),
        ({"labels": {"": "x"}}, "placement.labels: '' is not a label name"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "more than 32 labels"),
        ({"profile": "Tower"}, "placement.profile: 'Tower' is not a profile name"),
        ({"profile": False}, "placement.profile: expected a string, got bool"),
        ({"anti_affinity": ""}, "placement.anti_affinity: '' is not a group name"),
        ({"anti_affinity": ["cams"]}, "placement.anti_affinity: expected a string, got list"),
    ],
)
def test_policy_from_json_refuses_bad_input(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Policy.from_json(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=70) | st.dictionaries(st.text(max_size=20), inner,
                                                                max_size=5),
    max_leaves=80,
)
POLICY_LIKE = st.fixed_dictionaries({}, optional={
    "countries": JSON | st.lists(st.sampled_from(["SI", "AT", "si", ""]), max_size=3),
    "providers": JSON | st.lists(st.text(max_size=66), max_size=3),
    "sites": JSON,
    "labels": JSON | st.dictionaries(st.text(max_size=66), st.text(max_size=66), max_size=3),
    "profile": JSON | st.sampled_from(["tower-5g", "Tower"]),
    "anti_affinity": JSON | st.text(max_size=66),
})


@given(JSON | POLICY_LIKE)
@settings(max_examples=500, deadline=None)
def test_policy_from_json_refuses_only_with_value_error(data: object) -> None:
    try:
        policy = Policy.from_json(data)
    except ValueError as exc:
        message = str(exc)
    else:
        assert Policy.from_json(policy.to_json()) == policy  # what it reads, it writes
        return
    assert message.startswith("placement")  # names the field


@pytest.mark.parametrize(
    ("sizing", "message"),
    [
        ({"vcpus": 0}, "vcpus: 0 is outside 1"),
        ({"vcpus": True}, "vcpus: expected an integer, got bool"),
        ({"memory_mib": 0}, "memory_mib: 0 is outside 1"),
        ({"memory_mib": 1.5}, "memory_mib: expected an integer, got float"),
        ({"disk_gib": -1}, "disk_gib: -1 is outside 0"),
        ({"disk_gib": 1 << 40}, "disk_gib: .* is outside 0"),
    ],
)
def test_demand_refuses_bad_sizing(sizing: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Demand(**{"vcpus": 1, "memory_mib": 256, "disk_gib": 1, "policy": Policy(), **sizing})


def test_policy_is_frozen_and_its_labels_cannot_be_changed() -> None:
    labels = {"class": "tower"}
    policy = Policy(labels=labels)
    labels["class"] = "rack"
    assert policy.labels == {"class": "tower"}
    with pytest.raises(TypeError):
        policy.labels["class"] = "rack"  # type: ignore[index]


# --- the loader, on a real SQLite file -----------------------------------------------------------

NOW = 1_000_000.0


def _inventory(cpus: object, memory_mib: int) -> str:
    return json.dumps({"hostname": "h", "cpus": cpus, "memory_bytes": memory_mib * MIB})


@pytest.fixture
def fleet_db(tmp_path: Path) -> Tx:
    db = open_tx(tmp_path / "fleet.sqlite")
    nodes = [
        # id, site, country, provider, profile, reported, last_seen, inventory, facts,
        # revoked_at, cordoned
        ("si-tower", "lj-1", "SI", "telekom", "tower-5g", "online", NOW - 5,
         _inventory(4, 16384), json.dumps({"disk_gib": 256}), None, 0),
        ("si-edge", "lj-2", "SI", "a1", "edge-server", "online", NOW - 5,
         _inventory(16, 65536), None, None, 1),
        ("si-silent", "lj-1", "SI", "telekom", "tower-5g", "online", NOW - 600,
         _inventory(4, 16384), json.dumps({"disk_gib": 256}), None, 0),
        ("at-rack", "vie-1", "AT", "a1", "rack-server", "online", NOW - 1,
         _inventory(128, 524288), json.dumps({"disk_gib": 7680}), None, 0),
        ("hr-revoked", "zg-1", "HR", "telekom", "tower-5g", "online", NOW - 1,
         _inventory(4, 16384), None, NOW - 100, 0),
        ("hr-new", "zg-1", "HR", "telekom", "tower-5g", "unknown", None, None, None, None, 0),
        ("hr-odd", "zg-2", "HR", "telekom", "custom-box", "online", NOW - 1,
         _inventory(True, 4096), "not json", None, 0),
    ]
    db.executemany(
        "INSERT INTO nodes (id, site, country, provider, profile, reported_status, last_seen,"
        " interval_s, inventory, facts, revoked_at, cordoned)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 10, ?, ?, ?, ?)", nodes)
    vms = [
        # id, node_id, vcpus, memory_mib, disk_gib, anti_affinity, deleted_at
        ("v1", "si-tower", 2, 4096, 20, "cams", None),
        ("v2", "si-tower", 1, 1024, 10, None, None),
        ("v3", "si-tower", 8, 8192, 100, "cams", NOW - 10),  # deleted: not counted
        ("v4", "gone-node", 4, 4096, 10, "cams", None),      # its node has gone
        ("v5", None, 1, 512, 1, None, None),                 # not placed yet
        ("v6", "at-rack", 4, 32768, 200, "dbs", None),
    ]
    db.executemany(
        "INSERT INTO vms (id, name, node_id, vcpus, memory_mib, disk_gib, spec, anti_affinity,"
        " desired_state, created_at, updated_at, deleted_at)"
        " VALUES (?, ?, ?, ?, ?, ?, '{}', ?, 'running', 0, 0, ?)",
        [(v[0], v[0], *v[1:]) for v in vms])
    return db


def _load(db: Tx, profiles: dict[str, Profile], d: Demand,
          **kwargs: Any) -> dict[str, NodeView]:
    views = load_nodes(db, d, now=NOW, profiles=profiles, heartbeat_factor=3.0,
                       min_timeout_s=5.0, **kwargs)
    return {v.id: v for v in views}


def test_load_nodes_reads_status_capacity_and_commitments(
        fleet_db: Tx, profiles: dict[str, Profile]) -> None:
    views = _load(fleet_db, profiles, demand(anti_affinity="cams"))
    assert sorted(views) == ["at-rack", "hr-new", "hr-odd", "hr-revoked", "si-edge",
                             "si-silent", "si-tower"]
    assert views["si-tower"] == NodeView(
        id="si-tower", status="online", cordoned=False, country="SI", provider="telekom",
        site="lj-1", profile="tower-5g", labels={"class": "tower", "power": "battery-backed"},
        cpus=3, memory_mib=16384 - 2048, disk_gib=256,   # minus the profile's reservations
        used_vcpus=3, used_memory_mib=5120, used_disk_gib=30, groups=frozenset({"cams"}))
    edge = views["si-edge"]  # cordoned, no facts, no VMs
    assert (edge.cordoned, edge.disk_gib, edge.used_memory_mib, edge.groups) == (
        True, 0, 0, frozenset())
    assert views["si-silent"].status == "offline"
    assert views["hr-revoked"].status == "revoked"
    assert (views["hr-new"].status, views["hr-new"].cpus, views["hr-new"].memory_mib) == (
        "offline", 0, 0)
    # an unknown profile: no reservations, no labels; a boolean cpus and bad facts: 0
    odd = views["hr-odd"]
    assert (odd.labels, odd.cpus, odd.memory_mib, odd.disk_gib) == ({}, 0, 0, 0)
    assert (views["at-rack"].cpus, views["at-rack"].groups) == (124, frozenset())

    decision = place(demand(memory_mib=12288, anti_affinity="cams"), views.values())
    assert [c for c, _ in decision.candidates] == ["at-rack"]
    assert dict(decision.rejected)["si-tower"] == (
        "anti-affinity: already runs a VM of group cams",
        "memory: needs 12288 MiB, 9216 MiB free of 14336")


def test_load_nodes_pushes_the_location_policy_into_sql(
        fleet_db: Tx, profiles: dict[str, Profile]) -> None:
    in_si = demand(countries=("SI",))
    assert sorted(_load(fleet_db, profiles, in_si)) == ["si-edge", "si-silent", "si-tower"]
    assert len(_load(fleet_db, profiles, in_si, push_down=False)) == 7
    assert sorted(_load(fleet_db, profiles, demand(countries=("SI", "AT"), providers=("a1",)))
                  ) == ["at-rack", "si-edge"]
    assert sorted(_load(fleet_db, profiles, demand(sites=("zg-1",)))) == [
        "hr-new", "hr-revoked"]
    assert sorted(_load(fleet_db, profiles, demand(labels={"class": "tower"}))) == [
        "hr-new", "hr-revoked", "si-silent", "si-tower"]
    assert _load(fleet_db, profiles, demand(labels={"class": "tower"},
                                             profile="edge-server")) == {}
    assert sorted(_load(fleet_db, profiles, demand(profile="custom-box"))) == ["hr-odd"]
    assert _load(fleet_db, profiles, demand(countries=("DE",))) == {}
    # The same figures whether loaded in scope or fleet-wide.
    scoped = _load(fleet_db, profiles, demand(countries=("SI",)))
    everything = _load(fleet_db, profiles, demand())
    assert all(everything[k] == v for k, v in scoped.items())


def test_a_decision_on_loaded_nodes_explains_every_node_fleet_wide(
        fleet_db: Tx, profiles: dict[str, Profile]) -> None:
    d = demand(vcpus=2, memory_mib=2048, disk_gib=10, countries=("SI", "AT"))
    decision = place(d, _load(fleet_db, profiles, d, push_down=False).values())
    assert [c for c, _ in decision.candidates] == ["at-rack", "si-tower"]
    assert dict(decision.rejected) == {
        "hr-new": ("offline", "country HR not in SI, AT",
                   "vcpus: needs 2, 0 free of 0 (0 CPUs overcommitted)",
                   "memory: needs 2048 MiB, 0 MiB free of 0"),
        "hr-odd": ("country HR not in SI, AT",
                   "vcpus: needs 2, 0 free of 0 (0 CPUs overcommitted)",
                   "memory: needs 2048 MiB, 0 MiB free of 0"),
        "hr-revoked": ("revoked", "country HR not in SI, AT"),
        "si-edge": ("cordoned",),
        "si-silent": ("offline",),
    }


@pytest.mark.parametrize("d", [
    demand(),
    demand(vcpus=2, memory_mib=2048, disk_gib=10, countries=("SI", "AT")),
    demand(memory_mib=12288, anti_affinity="cams"),
    demand(memory_mib=9216),
    demand(memory_mib=9217),
    demand(vcpus=12, disk_gib=226),
    demand(vcpus=13),
    demand(labels={"class": "tower"}),
    demand(profile="rack-server", providers=("a1",)),
    demand(sites=("lj-1",), anti_affinity="web"),
    demand(countries=("DE",)),
], ids=str)
def test_the_create_shortlist_agrees_with_the_full_decision(
        fleet_db: Tx, profiles: dict[str, Profile], d: Demand) -> None:
    """The SQL fast path finds exactly the nodes the rules accept, with the same figures."""
    sync_reservations(fleet_db, profiles)
    full = place(d, _load(fleet_db, profiles, d, push_down=False).values())
    short = shortlist(fleet_db, d, now=NOW, profiles=profiles, heartbeat_factor=3.0,
                      min_timeout_s=5.0, limit=100)
    assert sorted(n.id for n in short) == sorted(node for node, _ in full.candidates)
    assert place(d, short).candidates == full.candidates
    # A short list holds the emptiest nodes that fit: by headroom, as the triggers keep it.
    if len(full.candidates) > 1:
        first = shortlist(fleet_db, d, now=NOW, profiles=profiles, heartbeat_factor=3.0,
                          min_timeout_s=5.0, limit=1)
        headroom = dict(fleet_db.execute("SELECT id, headroom FROM nodes").fetchall())
        assert headroom[first[0].id] == max(headroom[n.id] for n in short)


def test_usage_follows_every_change_to_vms(fleet_db: Tx) -> None:
    """node_usage (kept by triggers) equals the sum over vms after creates, moves, deletes."""
    db = fleet_db

    def by_sum() -> dict[str, tuple[int, int, int, int]]:
        return {n: (c, m, dk, k) for n, c, m, dk, k in db.execute(
            "SELECT node_id, sum(vcpus), sum(memory_mib), sum(disk_gib), count(*) FROM vms"
            " WHERE deleted_at IS NULL AND node_id IS NOT NULL GROUP BY node_id")}

    def by_usage() -> dict[str, tuple[int, int, int, int]]:
        return {n: (c, m, dk, k) for n, c, m, dk, k in db.execute(
            "SELECT node_id, vcpus, memory_mib, disk_gib, vms FROM node_usage WHERE vms > 0")}

    assert by_usage() == by_sum()
    db.execute("INSERT INTO vms (id, name, node_id, vcpus, memory_mib, disk_gib, spec,"
               " desired_state, created_at, updated_at) VALUES ('n1', 'n1', 'at-rack', 3, 300,"
               " 30, '{}', 'running', 0, 0)")
    assert by_usage() == by_sum()
    db.execute("UPDATE vms SET node_id = 'si-edge' WHERE id = 'n1'")  # moved
    assert by_usage() == by_sum()
    db.execute("UPDATE vms SET node_id = NULL WHERE id = 'n1'")  # its create failed
    assert by_usage() == by_sum()
    db.execute("UPDATE vms SET node_id = 'at-rack', memory_mib = 512 WHERE id = 'n1'")
    db.execute("UPDATE vms SET deleted_at = 1 WHERE node_id = 'si-tower'")  # deleted
    assert by_usage() == by_sum()
    db.execute("DELETE FROM vms WHERE id = 'n1'")
    assert by_usage() == by_sum()
