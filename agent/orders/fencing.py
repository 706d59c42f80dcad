"""Self-fencing, decided over plain data: a node cut off from the aggregator past its lease
pauses every guest it runs by order and marks those it should run ``fenced``, so that nothing
but an order issued after the fence starts them again (the aggregator may have started them
elsewhere). Pure: no I/O, no clock (``now`` is passed in); the runner carries the actions out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from agent.orders.journal import Desired
from agent.orders.recovery import Observed

# The desired states of guests this node may be running: "incoming" ones too (one arriving
# by a move pauses; it is not this node's to mark).
FENCED_FROM: Final = frozenset({"running", "incoming"})


@dataclass(frozen=True, slots=True)
class RecordFence:
    """Remember when the node fenced: an order issued before does not resume a VM."""

    at: float


@dataclass(frozen=True, slots=True)
class PauseVm:
    vm_uuid: str


@dataclass(frozen=True, slots=True)
class MarkFenced:
    """The VM's desired state from ``running`` to ``fenced``."""

    vm_uuid: str


@dataclass(frozen=True, slots=True)
class NotReached:
    """The VM's state could not be read (libvirt away): counted as not paused; the caller
    fences again."""

    vm_uuid: str


FenceAction: TypeAlias = RecordFence | PauseVm | MarkFenced | NotReached


def to_fence(desired: Sequence[Desired]) -> list[str]:
    """The VMs whose state :func:`plan_fence` needs."""
    return [want.vm_uuid for want in desired if want.state in FENCED_FROM]


def plan_fence(desired: Sequence[Desired], observed: Observed, now: float
               ) -> list[FenceAction]:
    """The fence at ``now``: each VM that should run (or is arriving) and runs is paused; each
    that should run is marked fenced, whatever it does (after its pause: a VM whose pause
    fails is not marked). The actions of one VM come in order: after one fails, skip that
    VM's others."""
    actions: list[FenceAction] = [RecordFence(now)]
    for want in desired:
        if want.state not in FENCED_FROM:
            continue
        if want.vm_uuid not in observed:
            actions.append(NotReached(want.vm_uuid))
            continue
        if observed[want.vm_uuid] == "running":
            actions.append(PauseVm(want.vm_uuid))
        if want.state == "running":
            actions.append(MarkFenced(want.vm_uuid))
    return actions
