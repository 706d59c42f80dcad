"""How long to wait before trying again: exponential backoff, capped, with jitter.

Pure: the attempt number and the jitter come in as numbers (``random.random()`` for full
jitter, ``1.0`` for none) and the delay goes out; the caller does the waiting. Used by every
loop that reconnects or restarts something: the agent's uplink, the aggregator's ingest and
control sessions, the managed broker's supervisor.
"""

from __future__ import annotations

from dataclasses import dataclass

# 2**32 times any sensible initial delay is past any cap; it also keeps the float finite.
_MAX_DOUBLINGS = 32


def backoff_delay(attempt: int, initial: float, maximum: float, rand: float) -> float:
    """Exponential backoff with full jitter: ``rand * min(maximum, initial * 2**attempt)``,
    so uniform in [0, that cap] for ``rand`` uniform in [0, 1)."""
    return float(rand * min(maximum, initial * (2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS))))


@dataclass(frozen=True, slots=True)
class Backoff:
    """A retry policy: the delay before attempt ``n`` (0 is the first retry) is
    :func:`backoff_delay`, and never less than ``floor_s`` however small the jitter."""

    initial_s: float
    max_s: float
    floor_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.floor_s < 0:
            raise ValueError(
                f"backoff: need 0 < initial_s <= max_s and floor_s >= 0, not {self}"
            )

    def delay(self, attempt: int, jitter: float = 1.0) -> float:
        """Seconds to wait before retry ``attempt``; ``jitter`` in [0, 1] scales the cap
        (1.0: no jitter)."""
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"backoff: jitter must be in [0, 1], not {jitter}")
        return max(self.floor_s, backoff_delay(attempt, self.initial_s, self.max_s, jitter))
