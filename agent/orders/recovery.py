"""What the agent does after a start (or once libvirt is back), decided over plain data.

Pure functions: no I/O, no clock (``now`` is passed in). The runner gathers the facts (the
journal, libvirt's view of each VM), asks these functions, and carries out what they return:

- :func:`cut_off_at_start`: was the node cut off from the aggregator past its lease before this
  start? Then it fences (``fencing.py``) and starts nothing on its own: its VMs may run
  elsewhere by now.
- :func:`settle`: an order the agent was killed in the middle of is finished (``Resume``), or
  ended as failed (``Abandon``: expired, or it would start a guest of a node cut off), or left
  alone (``Leave``: it ended meanwhile, or a migration of it still runs beside the queue).
- :func:`plan_restore`: bring the VMs that should run back up (after a host reboot, with or
  without an uplink): define what the host lost, start what should run and does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from agent.orders.journal import Desired

# Orders that would start a guest: a node cut off past its lease finishes none of them.
STARTS_GUESTS: Final = frozenset({"create", "start"})
# Orders that leave a half-made VM behind when they are not finished.
LEAVES_HALF_MADE: Final = frozenset({"create"})
# The desired states recovery restores; "incoming", "leaving" and "fenced" VMs are not this
# node's to start (not yet, maybe no more, not before an order says so).
RESTORED: Final = frozenset({"running", "stopped"})


def cut_off_at_start(*, lease_s: float, contact_at_start: float | None, judged: bool,
                     now: float) -> bool:
    """Whether the node was out of touch with the aggregator longer than its lease before
    the agent started (``contact_at_start``: the last contact the journal had then; None:
    never). Judged once per start (``judged``: a recovery did already): a later recovery
    (libvirt was away for a moment) is no outage of the uplink's. No lease: never."""
    return bool(lease_s and contact_at_start is not None and not judged
                and now - contact_at_start > lease_s)


# --- unfinished orders -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unfinished:
    """An order the journal held as accepted at the start, as it stands now."""

    order_id: str
    action: str
    expires_at: float
    state: str | None  # its state in the journal, read again just now (None: not there)
    beside: bool  # it runs beside the queue (a migration), so not unfinished at all


@dataclass(frozen=True, slots=True)
class Leave:
    order_id: str


@dataclass(frozen=True, slots=True)
class Resume:
    order_id: str


@dataclass(frozen=True, slots=True)
class Abandon:
    """Report the order failed with ``error``; ``undo_create``: remove what it half made
    (unless the journal wants that VM: it was this node's before)."""

    order_id: str
    error: str
    undo_create: bool


Settlement: TypeAlias = Leave | Resume | Abandon


def settle(order: Unfinished, now: float, *, cut_off: bool) -> Settlement:
    """What to do with an order the agent was killed in the middle of."""
    if order.state != "accepted" or order.beside:
        return Leave(order.order_id)
    expired = order.expires_at < now
    if expired or (cut_off and order.action in STARTS_GUESTS):
        why = "expired" if expired else "cut off past the lease"
        return Abandon(order.order_id,
                       f"not finished: the agent stopped while it ran, and it is {why} now",
                       undo_create=order.action in LEAVES_HALF_MADE)
    return Resume(order.order_id)


# --- the desired state -------------------------------------------------------------------------

# What libvirt says of each VM: its state, None if it is not defined here. A VM whose state
# could not be read is not in the map.
Observed: TypeAlias = Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class DefineVm:
    """Define the VM again from its spec (the host lost it: e.g. a fresh host)."""

    vm_uuid: str
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StartVm:
    vm_uuid: str


RestoreAction: TypeAlias = DefineVm | StartVm


def to_restore(desired: Sequence[Desired], *, cut_off: bool) -> list[str]:
    """The VMs whose state :func:`plan_restore` needs (none for a node cut off)."""
    if cut_off:
        return []
    return [want.vm_uuid for want in desired if want.state in RESTORED]


def plan_restore(desired: Sequence[Desired], observed: Observed, *,
                 cut_off: bool) -> list[RestoreAction]:
    """Bring back what the journal wants: each VM that should run or be stopped and is not
    defined is defined from its spec; each that should run and is off is started. A node cut
    off past its lease starts nothing. The actions of one VM come in order: after one
    fails, skip that VM's others."""
    if cut_off:
        return []
    actions: list[RestoreAction] = []
    for want in desired:
        if want.state not in RESTORED or want.vm_uuid not in observed:
            continue
        state = observed[want.vm_uuid]
        if state is None and want.spec:  # the host lost it (e.g. a fresh host)
            actions.append(DefineVm(want.vm_uuid, want.spec))
            state = "shut off"  # as a defined domain is
        if want.state == "running" and state in ("shut off", "crashed"):
            actions.append(StartVm(want.vm_uuid))
    return actions
