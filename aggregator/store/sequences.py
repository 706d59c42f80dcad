"""How the store keeps each node's numbered messages and rolls telemetry up: pure functions
over plain data (sequence steps and gaps, covered ranges, roll-up buckets), used by the
writer as it stores a batch and by the retention sweep."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

# Host figures that are rolled up when raw telemetry ages out.
ROLLUP_METRICS: Final = (
    "cpu_percent",
    "load1",
    "load5",
    "load15",
    "mem_available_bytes",
    "mem_used_bytes",
    "swap_used_bytes",
)


class SeqStep(NamedTuple):  # made once per message on the ingest path: a cheap record
    last: int                      # the highest sequence number seen after this one
    gap: tuple[int, int] | None    # numbers skipped by this one, if any
    late: bool                     # at or below the highest seen: a replay or a gap filler


def next_seq(last: int, seq: int) -> SeqStep:
    """What receiving ``seq`` after ``last`` means (numbers start at 1)."""
    if seq <= last:
        return SeqStep(last, None, True)
    return SeqStep(seq, (last + 1, seq - 1) if seq > last + 1 else None, False)


def split_gap(first: int, last: int, seq: int) -> list[tuple[int, int]]:
    """The parts of gap ``first..last`` left once ``seq`` (inside it) has arrived."""
    parts = []
    if first <= seq - 1:
        parts.append((first, seq - 1))
    if seq + 1 <= last:
        parts.append((seq + 1, last))
    return parts


def runs(ordered: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending numbers as ``(first, last)`` runs of consecutive numbers."""
    out: list[tuple[int, int]] = []
    for n in ordered:
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def subtract(first: int, last: int, covered: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``first..last`` outside every range in ``covered``."""
    parts = [(first, last)]
    for a, b in covered:
        nxt = []
        for x, y in parts:
            if b < x or a > y:
                nxt.append((x, y))
                continue
            if x < a:
                nxt.append((x, a - 1))
            if b < y:
                nxt.append((b + 1, y))
        parts = nxt
    return parts


@dataclass(frozen=True, slots=True)
class Rollup:
    node_id: str
    bucket_start: float
    metric: str
    count: int
    min: float
    max: float
    sum: float


def rollup(samples: Iterable[tuple[str, float, dict[str, Any]]], bucket_s: int) -> list[Rollup]:
    """Per node, bucket and metric: count, min, max and sum of ``(node, ts, host)`` samples."""
    acc: dict[tuple[str, float, str], list[float]] = {}
    for node_id, ts, host in samples:
        bucket = math.floor(ts / bucket_s) * bucket_s
        for metric in ROLLUP_METRICS:
            value = host.get(metric)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            a = acc.get((node_id, bucket, metric))
            v = float(value)
            if a is None:
                acc[(node_id, bucket, metric)] = [1, v, v, v]
            else:
                a[0] += 1
                a[1] = min(a[1], v)
                a[2] = max(a[2], v)
                a[3] += v
    return [
        Rollup(node, bucket, metric, int(a[0]), a[1], a[2], a[3])
        for (node, bucket, metric), a in sorted(acc.items())
    ]
