"""Backoff: the delay grows by doubling from the initial one, stops at the cap, is scaled by the
jitter it is given and never drops below the floor; every reconnecting loop uses it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.fleet import broker, control, ingest
from plumbing.backoff import Backoff, backoff_delay


def test_the_delay_doubles_from_the_initial_one_up_to_the_cap() -> None:
    policy = Backoff(initial_s=0.5, max_s=30.0)
    assert [policy.delay(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_the_jitter_scales_the_delay_and_the_floor_bounds_it_below() -> None:
    policy = Backoff(initial_s=1.0, max_s=60.0, floor_s=0.1)
    assert policy.delay(3, jitter=0.5) == 4.0
    assert policy.delay(3, jitter=0.0) == 0.1
    assert policy.delay(10, jitter=0.25) == 15.0


def test_full_jitter_as_a_function() -> None:
    assert backoff_delay(0, 1.0, 60.0, 1.0) == 1.0
    assert backoff_delay(3, 1.0, 60.0, 1.0) == 8.0
    assert backoff_delay(10, 1.0, 60.0, 1.0) == 60.0
    assert backoff_delay(500, 1.0, 60.0, 0.5) == 30.0
    assert backoff_delay(3, 1.0, 60.0, 0.0) == 0.0


def test_an_attempt_count_of_days_of_outage_stays_at_the_cap() -> None:
    """2.0 ** 1100 would overflow a float; the count is clamped long before it matters."""
    assert Backoff(initial_s=0.5, max_s=30.0).delay(100_000) == 30.0
    assert backoff_delay(-1, 0.5, 30.0, 1.0) == 0.5


@pytest.mark.parametrize(("initial", "maximum", "floor"), [
    (0.0, 1.0, 0.0), (-1.0, 1.0, 0.0), (2.0, 1.0, 0.0), (1.0, 2.0, -0.1),
])
def test_a_policy_that_makes_no_sense_is_refused(initial: float, maximum: float,
                                                 floor: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial_s=initial, max_s=maximum, floor_s=floor)


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_a_jitter_outside_zero_to_one_is_our_bug(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        Backoff(initial_s=1.0, max_s=2.0).delay(0, jitter)


@given(attempt=st.integers(min_value=0, max_value=10_000),
       jitter=st.floats(min_value=0.0, max_value=1.0),
       initial=st.floats(min_value=0.001, max_value=10.0),
       extra=st.floats(min_value=0.0, max_value=100.0))
def test_the_delay_stays_between_the_floor_and_the_cap(attempt: int, jitter: float,
                                                        initial: float, extra: float) -> None:
    policy = Backoff(initial_s=initial, max_s=initial + extra, floor_s=initial / 10)
    delay = policy.delay(attempt, jitter)
    assert policy.floor_s <= delay <= policy.max_s
    assert delay <= policy.delay(attempt + 1, jitter)


def test_the_reconnecting_loops_share_the_aggregators_policies() -> None:
    """What the loops waited before this module existed: 0.5 s doubling to 30 s; sessions with
    full jitter and at least 0.1 s, restarts without jitter."""
    for session in (control.RECONNECT, ingest.RECONNECT):
        assert session == Backoff(initial_s=0.5, max_s=30.0, floor_s=0.1)
    for restart in (ingest.RESTART, broker.RESTART):
        assert restart == Backoff(initial_s=0.5, max_s=30.0)
