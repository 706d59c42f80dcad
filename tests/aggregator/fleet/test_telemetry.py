"""Fleet decisions: liveness, sequence tracking, gap arithmetic, roll-ups (pure functions)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.fleet import telemetry as fleet
from aggregator.store import sequences


@pytest.mark.parametrize(
    ("reported", "last_seen", "interval", "now", "expected"),
    [
        ("online", 100.0, 10.0, 129.0, "online"),   # within 3 intervals
        ("online", 100.0, 10.0, 131.0, "offline"),  # three intervals missed
        ("online", 100.0, 0.5, 104.0, "online"),    # the minimum timeout (5 s) applies
        ("online", 100.0, 0.5, 106.0, "offline"),
        ("offline", 100.0, 10.0, 101.0, "offline"), # said goodbye (or its last will did)
        ("online", None, 10.0, 101.0, "offline"),   # never heard directly
        ("unknown", 100.0, 10.0, 101.0, "offline"),
    ],
)
def test_node_status(reported: str, last_seen: float | None, interval: float, now: float,
                     expected: str) -> None:
    assert fleet.node_status(reported, last_seen, interval, now, 3.0, 5.0) == expected


def test_next_seq_in_order_gap_and_late() -> None:
    assert sequences.next_seq(0, 1) == sequences.SeqStep(1, None, False)
    assert sequences.next_seq(4, 5) == sequences.SeqStep(5, None, False)
    assert sequences.next_seq(4, 9) == sequences.SeqStep(9, (5, 8), False)
    assert sequences.next_seq(0, 3) == sequences.SeqStep(3, (1, 2), False)
    assert sequences.next_seq(9, 6) == sequences.SeqStep(9, None, True)
    assert sequences.next_seq(9, 9) == sequences.SeqStep(9, None, True)


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=100))
@settings(max_examples=200, deadline=None)
def test_gaps_plus_received_cover_every_number(seqs: list[int]) -> None:
    """Whatever order numbers arrive in, recorded gaps (minus late fillers) plus received
    numbers are exactly 1..highest, with no overlap."""
    last, gaps, received = 0, [], set()
    for seq in seqs:
        step = sequences.next_seq(last, seq)
        last = step.last
        if step.gap:
            gaps.append(step.gap)
        if step.late and seq not in received:
            for i, (a, b) in enumerate(gaps):
                if a <= seq <= b:
                    gaps[i:i + 1] = sequences.split_gap(a, b, seq)
                    break
        received.add(seq)
    missing = [s for a, b in gaps for s in range(a, b + 1)]
    assert len(missing) == len(set(missing))
    assert not set(missing) & received
    assert set(missing) | received == set(range(1, last + 1))


def test_subtract() -> None:
    assert sequences.subtract(1, 10, []) == [(1, 10)]
    assert sequences.subtract(1, 10, [(3, 4)]) == [(1, 2), (5, 10)]
    assert sequences.subtract(1, 10, [(0, 20)]) == []
    assert sequences.subtract(5, 10, [(1, 6), (9, 12)]) == [(7, 8)]


def test_rollup_buckets_and_statistics() -> None:
    samples = [
        ("n1", 1000.0, {"cpu_percent": 10.0, "load1": 1.0, "filesystems": []}),
        ("n1", 1100.0, {"cpu_percent": 30.0, "load1": 3.0}),
        ("n1", 1300.0, {"cpu_percent": 50.0}),  # the next 300 s bucket
        ("n2", 1000.0, {"cpu_percent": 5.0, "mem_used_bytes": 7}),
        ("n2", 1000.0, {"cpu_percent": True}),  # not a number: ignored
    ]
    rows = {(r.node_id, r.bucket_start, r.metric): r for r in sequences.rollup(samples, 300)}
    cpu = rows[("n1", 900.0, "cpu_percent")]
    assert (cpu.count, cpu.min, cpu.max, cpu.sum) == (2, 10.0, 30.0, 40.0)
    assert rows[("n1", 1200.0, "cpu_percent")].count == 1
    assert rows[("n2", 900.0, "cpu_percent")].count == 1
    assert rows[("n2", 900.0, "mem_used_bytes")].sum == 7.0
