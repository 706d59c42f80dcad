"""Liveness as a pure function over plain data; the current time is always passed in. (How the
store numbers, gaps and rolls telemetry up: :mod:`aggregator.store.sequences`.)"""

from __future__ import annotations

# The host figures kept as roll-ups once raw telemetry ages out (the queries offer them).
from aggregator.store.sequences import ROLLUP_METRICS as ROLLUP_METRICS


def node_status(
    reported: str, last_seen: float | None, interval_s: float, now: float,
    heartbeat_factor: float, min_timeout_s: float,
) -> str:
    """``online`` when the node said so and has been heard within its heartbeat timeout."""
    if reported != "online" or last_seen is None:
        return "offline"
    timeout = max(interval_s * heartbeat_factor, min_timeout_s)
    return "online" if now - last_seen <= timeout else "offline"
