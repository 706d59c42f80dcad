"""The step table of moves, row by row, and the move's transition table: pure functions over
plain data, no database. The same steps against a real fleet database are in
tests/aggregator/workloads/test_moves_flow.py."""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

import pytest

from aggregator.workloads import moves_steps as steps
from aggregator.workloads.moves_advance import _EFFECTS
from aggregator.workloads.moves_settings import MAX_ASKS, MoveSettings
from aggregator.workloads.moves_steps import Do, Next, StepFacts, decide, outcome, transition
from aggregator.workloads.transitions import IllegalTransition


def facts(state: str, order_state: str, **changes: Any) -> StepFacts:
    fields: dict[str, Any] = {"mode": "live", "state": state, "source": "si-a", "dest": "si-b",
                              "error": "", "order_state": order_state, "order_error": "",
                              "result": {}, "certified": ("10.0.0.2", "node-b.example"),
                              "asks": 0}
    return StepFacts(**{**fields, **changes})


MIGRATE_FAILED = "live move to si-b failed: connection reset"

# One case for every row of the table: (kind, state, outcome), the facts, what to do.
CASES: list[tuple[tuple[str, str, str], StepFacts, Next]] = [
    (("move", "preparing", "succeeded"),
     facts("preparing", "succeeded", result={"address": "10.0.0.2", "disk": "/d"}),
     Next(Do.MIGRATE, "migrating")),
    (("move", "preparing", "uncertified"),
     facts("preparing", "succeeded", result={"address": "10.0.0.3"}),
     Next(Do.ABANDON, "failed", "live move to si-b failed: its migration address 10.0.0.3 is"
          " not in its certificate (10.0.0.2, node-b.example)")),
    (("move", "preparing", "failed"),
     facts("preparing", "failed", order_error="refused: this node is in AT"),
     Next(Do.ABANDON, "failed",
          "live move to si-b failed: the destination refused: this node is in AT")),
    (("move", "preparing", "expired"),
     facts("preparing", "expired", mode="cold"),
     Next(Do.ABANDON, "failed", "cold move to si-b failed: the destination its order expired")),
    (("move", "migrating", "succeeded"),
     facts("migrating", "succeeded", result={"downtime_ms": 40}),
     Next(Do.ARRIVE, "adopting", vm_state="running", result={"downtime_ms": 40})),
    (("move", "migrating", "failed"),
     facts("migrating", "failed", order_error="connection reset"),
     Next(Do.ASK, "releasing", MIGRATE_FAILED)),
    (("move", "migrating", "expired"),
     facts("migrating", "expired"),
     Next(Do.ASK, "releasing", "live move to si-b failed: its order expired")),
    (("move", "releasing", "present"),
     facts("releasing", "succeeded", mode="cold", result={"present": True, "state": "running"}),
     Next(Do.ARRIVE, "adopting", vm_state="pending")),
    (("move", "releasing", "absent"),
     facts("releasing", "succeeded", error=MIGRATE_FAILED, result={"present": False}),
     Next(Do.FAIL, "failed", f"{MIGRATE_FAILED}; the VM is still on si-a")),
    (("move", "releasing", "unanswered"),
     facts("releasing", "failed", error=MIGRATE_FAILED, asks=1),
     Next(Do.ASK, "releasing")),
    (("move", "releasing", "silent"),
     facts("releasing", "failed", error=MIGRATE_FAILED, asks=MAX_ASKS,
           order_error="libvirt is not connected"),
     Next(Do.FAIL, "failed", f"{MIGRATE_FAILED}; si-b did not say whether the VM arrived"
          " (libvirt is not connected): it is recorded on si-a")),
    (("move", "adopting", "succeeded"),
     facts("adopting", "succeeded", result={"state": "running"}),
     Next(Do.ADOPTED, "succeeded", vm_state="running")),
    (("move", "adopting", "unanswered"),
     facts("adopting", "failed", asks=MAX_ASKS - 1, order_error="refused: still arriving"),
     Next(Do.ADOPT, "adopting")),
    (("move", "adopting", "silent"),
     facts("adopting", "expired", asks=MAX_ASKS),
     Next(Do.FAIL, "failed", "the VM is on si-b, which could not take it over: its order"
          " expired")),
    (("restart", "migrating", "succeeded"),
     facts("migrating", "succeeded", mode="restart", result={"state": "running"}),
     Next(Do.RESTARTED, "succeeded")),
    (("restart", "migrating", "failed"),
     facts("migrating", "failed", mode="restart", order_error="no room"),
     Next(Do.BACK, "failed", "restart on si-b failed: no room; the VM is still on si-a",
          vm_state="unknown")),
    (("restart", "migrating", "expired"),
     facts("migrating", "expired", mode="restart"),
     Next(Do.ASK, "releasing", "restart on si-b: its create order expired")),
    (("restart", "releasing", "present"),
     facts("releasing", "succeeded", mode="restart", result={"present": True, "state": "paused"}),
     Next(Do.MADE, "succeeded", vm_state="paused")),
    (("restart", "releasing", "absent"),
     facts("releasing", "succeeded", mode="restart", result={"present": False}),
     Next(Do.BACK, "failed", "restart on si-b: its create order expired before si-b took it;"
          " the VM is still on si-a", vm_state="unknown")),
    (("restart", "releasing", "unanswered"),
     facts("releasing", "expired", mode="restart", asks=1),
     Next(Do.ASK, "releasing")),
    (("restart", "releasing", "silent"),
     facts("releasing", "expired", mode="restart", asks=MAX_ASKS),
     Next(Do.FAIL, "failed", "restart on si-b: its create order expired and si-b did not say"
          " whether it made the VM (its order expired); the copy on si-a is kept")),
]


def test_the_cases_cover_every_row_of_the_table() -> None:
    assert sorted(key for key, _, _ in CASES) == sorted(steps.STEPS)


@pytest.mark.parametrize(("key", "given", "expected"), CASES,
                         ids=["/".join(key) for key, _, _ in CASES])
def test_each_row_of_the_step_table(key: tuple[str, str, str], given: StepFacts,
                                    expected: Next) -> None:
    assert (steps.kind(given.mode), given.state, outcome(given)) == key
    assert decide(given) == expected


def test_every_row_is_a_transition_of_the_move_table_and_every_transition_a_row() -> None:
    rows = {(state, rule.then) for (_, state, _), rule in steps.STEPS.items()}
    table = {(old, new) for old, news in steps.TRANSITIONS.items() for new in news}
    assert rows == table
    assert {new for _, new in table} - set(steps.TRANSITIONS) == set()


MOVE_STATES = ("preparing", "migrating", "releasing", "adopting", "succeeded", "failed")
MOVE_LEGAL = {
    ("preparing", "migrating"), ("preparing", "failed"),
    ("migrating", "adopting"), ("migrating", "releasing"), ("migrating", "succeeded"),
    ("migrating", "failed"),
    ("releasing", "releasing"), ("releasing", "adopting"), ("releasing", "succeeded"),
    ("releasing", "failed"),
    ("adopting", "adopting"), ("adopting", "succeeded"), ("adopting", "failed"),
}


@pytest.mark.parametrize(("old", "new"), sorted(MOVE_LEGAL))
def test_a_legal_move_transition_gives_the_new_state(old: str, new: str) -> None:
    assert transition(old, new) == new


@pytest.mark.parametrize(("old", "new"),
                         sorted(set(itertools.product(MOVE_STATES, MOVE_STATES)) - MOVE_LEGAL))
def test_an_illegal_move_transition_raises_with_its_fields(old: str, new: str) -> None:
    with pytest.raises(IllegalTransition) as caught:
        transition(old, new)
    assert (caught.value.machine, caught.value.old, caught.value.new) == ("move", old, new)


@pytest.mark.parametrize(
    "given",
    [facts("preparing", "succeeded", mode="restart"),
     facts("adopting", "failed", mode="restart"),
     facts("preparing", "accepted"),
     facts("succeeded", "succeeded")],
    ids=["restart-preparing", "restart-adopting", "open-order", "ended-move"],
)
def test_a_step_the_table_has_no_row_for_raises(given: StepFacts) -> None:
    with pytest.raises(steps.NoStep) as caught:
        decide(given)
    assert (caught.value.kind, caught.value.state) == (steps.kind(given.mode), given.state)


@pytest.mark.parametrize(
    ("mode", "result", "expected"),
    [
        ("live", {"address": "10.0.0.2"}, "succeeded"),
        ("live", {"address": "NODE-B.example"}, "succeeded"),  # names are not case-sensitive
        ("live", {}, "uncertified"),  # a live move must connect somewhere
        ("live", {"address": "10.0.0.9"}, "uncertified"),
        ("cold", {}, "succeeded"),  # nothing to copy: no connection
        ("cold", {"address": "10.0.0.9"}, "succeeded"),
        ("cold", {"address": "10.0.0.9", "disk": "/d"}, "uncertified"),  # it copies a disk
        ("cold", {"address": "10.0.0.2", "disk": "/d"}, "succeeded"),
    ],
)
def test_a_prepared_destination_is_used_only_at_an_address_its_certificate_names(
        mode: str, result: dict[str, Any], expected: str) -> None:
    assert outcome(facts("preparing", "succeeded", mode=mode, result=result)) == expected


def test_an_uncertified_destination_without_names_says_so() -> None:
    found = decide(facts("preparing", "succeeded", certified=()))
    assert found.reason == ("live move to si-b failed: its migration address (none) is not in"
                            " its certificate (no names)")


@pytest.mark.parametrize(("present", "expected"),
                         [(True, "present"), (False, "absent"), ("yes", "absent"),
                          (1, "absent"), (None, "absent")])
def test_only_a_plain_true_says_the_vm_arrived(present: Any, expected: str) -> None:
    assert outcome(facts("releasing", "succeeded", result={"present": present})) == expected


@pytest.mark.parametrize(("asks", "expected"),
                         [(0, "unanswered"), (MAX_ASKS - 1, "unanswered"),
                          (MAX_ASKS, "silent"), (MAX_ASKS + 3, "silent")])
@pytest.mark.parametrize("state", ["releasing", "adopting"])
def test_a_destination_is_asked_at_most_max_asks_times(state: str, asks: int,
                                                       expected: str) -> None:
    assert outcome(facts(state, "failed", asks=asks)) == expected


@pytest.mark.parametrize(
    ("state", "order_state", "certificate", "asks"),
    [
        ("preparing", "succeeded", True, False),
        ("preparing", "failed", False, False),
        ("migrating", "succeeded", False, False),
        ("migrating", "expired", False, False),
        ("releasing", "succeeded", False, False),
        ("releasing", "failed", False, True),
        ("releasing", "expired", False, True),
        ("adopting", "succeeded", False, False),
        ("adopting", "failed", False, True),
    ],
)
def test_deciding_reads_names_and_counts_asks_only_where_it_looks_at_them(
        state: str, order_state: str, certificate: bool, asks: bool) -> None:
    assert steps.checks_certificate(state, order_state) is certificate
    assert steps.counts_asks(state, order_state) is asks


def test_an_adopted_vm_whose_state_was_not_said_is_unknown() -> None:
    assert decide(facts("adopting", "succeeded")).vm_state == "unknown"


def test_migrate_params_carry_the_destination_what_it_prepared_and_the_settings() -> None:
    prepared = {"address": "10.0.0.2", "domain_type": "qemu", "kernel": "/b/k", "cores": 4,
                "arch": "x86_64", "machines": "pc", "cpu_models": "kvm64", "disk": 7}
    settings = asdict(MoveSettings(bandwidth_mib_s=50))
    assert steps.migrate_params("vm-1", "si-b", "live", "SI", "arnes", prepared,
                                settings).to_params() == {
        "vm_uuid": "vm-1", "dest": "si-b", "mode": "live", "dest_country": "SI",
        "dest_provider": "arnes", "address": "10.0.0.2", "domain_type": "qemu",
        "kernel": "/b/k", "dest_arch": "x86_64", "dest_machines": "pc",
        "dest_cpu_models": "kvm64", "max_downtime_ms": 300, "bandwidth_mib_s": 50,
        "auto_converge": True, "postcopy": False, "timeout_s": 300.0}
    unlimited = steps.migrate_params("vm-1", "si-b", "cold", "SI", "arnes", {},
                                     asdict(MoveSettings())).to_params()
    assert "bandwidth_mib_s" not in unlimited  # 0 is no limit: not sent, as ever
    assert "address" not in unlimited


@pytest.mark.parametrize(("ttl_s", "settings", "expected"),
                         [(600.0, {"timeout_s": 300.0}, 600.0),
                          (60.0, {"timeout_s": 300.0}, 420.0),
                          (60.0, {}, 420.0)])
def test_a_migrate_order_lives_its_timeout_plus_a_margin(
        ttl_s: float, settings: dict[str, Any], expected: float) -> None:
    assert steps.migrate_ttl_s(ttl_s, settings, 120.0) == expected


def test_every_step_the_table_names_is_carried_out() -> None:
    assert set(_EFFECTS) == set(Do) == {rule.do for rule in steps.STEPS.values()}
