"""An order's transition table, row by row, and what a node's report does to an order in each
state: pure functions, no database."""

from __future__ import annotations

import itertools

import pytest

from aggregator.workloads import order_states as states
from aggregator.workloads.order_states import after_report, transition
from aggregator.workloads.transitions import IllegalTransition

STATES = ("pending", "sent", "accepted", "succeeded", "failed", "expired")

# Written out on their own, so that a change to the table shows here.
LEGAL = {
    ("pending", "sent"), ("pending", "accepted"), ("pending", "succeeded"),
    ("pending", "failed"), ("pending", "expired"),
    ("sent", "sent"), ("sent", "accepted"), ("sent", "succeeded"), ("sent", "failed"),
    ("sent", "expired"),
    ("accepted", "succeeded"), ("accepted", "failed"), ("accepted", "expired"),
    ("expired", "succeeded"),
}
ILLEGAL = sorted(set(itertools.product(STATES, STATES)) - LEGAL)


def test_the_table_is_the_legal_transitions_and_knows_every_state() -> None:
    assert set(states.TRANSITIONS) == set(STATES) == {*states.OPEN, *states.FINAL}
    assert {(old, new) for old, news in states.TRANSITIONS.items() for new in news} == LEGAL
    assert states.INITIAL in states.OPEN


@pytest.mark.parametrize(("old", "new"), sorted(LEGAL))
def test_a_legal_transition_gives_the_new_state(old: str, new: str) -> None:
    assert transition(old, new) == new


@pytest.mark.parametrize(("old", "new"), [*ILLEGAL, ("bogus", "sent"), ("sent", "bogus")])
def test_an_illegal_transition_raises_with_its_fields(old: str, new: str) -> None:
    with pytest.raises(IllegalTransition) as caught:
        transition(old, new)
    assert (caught.value.machine, caught.value.old, caught.value.new) == ("order", old, new)
    assert str(caught.value) == f"order: no transition from {old!r} to {new!r}"


@pytest.mark.parametrize(
    ("state", "reported", "expected"),
    [
        # an open order takes what it is told
        ("pending", "accepted", "accepted"),
        ("pending", "succeeded", "succeeded"),
        ("pending", "failed", "failed"),
        ("sent", "accepted", "accepted"),
        ("sent", "succeeded", "succeeded"),
        ("sent", "failed", "failed"),
        ("accepted", "succeeded", "succeeded"),
        ("accepted", "failed", "failed"),
        # anything else a node says counts as failed
        ("sent", "refused", "failed"),
        ("accepted", "", "failed"),
        # stale reports change nothing
        ("accepted", "accepted", None),
        ("succeeded", "succeeded", None),
        ("succeeded", "failed", None),
        ("succeeded", "accepted", None),
        ("failed", "succeeded", None),
        ("failed", "accepted", None),
        ("expired", "failed", None),
        ("expired", "accepted", None),
        ("expired", "refused", None),
        # except that an expired order that ran after all counts where it ran
        ("expired", "succeeded", "succeeded"),
    ],
)
def test_a_report_moves_an_order_or_changes_nothing(state: str, reported: str,
                                                   expected: str | None) -> None:
    assert after_report(state, reported) == expected


def test_a_report_on_a_state_the_table_does_not_know_is_our_bug() -> None:
    with pytest.raises(IllegalTransition):
        after_report("bogus", "succeeded")
