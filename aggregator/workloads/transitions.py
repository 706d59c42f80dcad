"""What a state machine's table refuses: :class:`IllegalTransition`.

The orders' table is :data:`aggregator.workloads.order_states.TRANSITIONS`, the moves'
:data:`aggregator.workloads.moves_steps.TRANSITIONS`. Whatever a caller means to ignore (a
stale report, say) it decides before it asks for a transition; a transition the table does not
have is our own bug, so it raises.
"""

from __future__ import annotations

from collections.abc import Mapping


class IllegalTransition(Exception):
    """``machine`` (``order``, ``move``) was asked to go from ``old`` to ``new``, which its
    table does not allow."""

    def __init__(self, machine: str, old: str, new: str) -> None:
        super().__init__(f"{machine}: no transition from {old!r} to {new!r}")
        self.machine = machine
        self.old = old
        self.new = new


def check(machine: str, table: Mapping[str, frozenset[str]], old: str, new: str) -> str:
    """``new``, if ``table`` allows ``old`` → ``new``; else :class:`IllegalTransition`."""
    if new not in table.get(old, frozenset()):
        raise IllegalTransition(machine, old, new)
    return new
