"""The fleet's figures /metrics reads from the database at each scrape (plain data; the API's
metrics module renders them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# Upper bounds (seconds) of the order latency histogram's buckets: a start takes well under a
# second on a node, a live migration minutes.
LATENCY_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                            300.0, 600.0)
ORDER_STATES: Final = ("pending", "sent", "accepted", "succeeded", "failed", "expired")
MOVE_STATES: Final = ("preparing", "migrating", "adopting", "releasing", "succeeded",
                      "failed")


@dataclass(frozen=True)
class Latency:
    """A histogram read from the database: ``counts[i]`` orders took at most
    ``LATENCY_BUCKETS_S[i]`` seconds (cumulative); ``count`` and ``sum_s`` over all."""

    counts: tuple[int, ...] = (0,) * len(LATENCY_BUCKETS_S)
    count: int = 0
    sum_s: float = 0.0


@dataclass(frozen=True)
class FleetFigures:
    """What /metrics reads from the database at each scrape."""

    nodes: dict[str, int] = field(default_factory=dict)  # status -> count
    orders: dict[str, int] = field(default_factory=dict)  # state -> count
    moves: dict[str, int] = field(default_factory=dict)  # state -> count
    orders_published: int = 0  # every publish of every order, resends included
    orders_retried: int = 0  # publishes after an order's first
    latency: Latency = field(default_factory=Latency)
