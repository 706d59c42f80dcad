"""The agent's recovery decisions (agent/orders/recovery.py) over plain data, without libvirt:
whether the node was cut off before its start, what becomes of an order the agent was killed
in the middle of, and what brings the VMs back to what the journal wants."""

from __future__ import annotations

from typing import Any

import pytest

from agent.orders.journal import Desired
from agent.orders.recovery import (
    Abandon,
    DefineVm,
    Leave,
    Resume,
    Settlement,
    StartVm,
    Unfinished,
    cut_off_at_start,
    plan_restore,
    settle,
    to_restore,
)

NOW = 1_800_000_000.0
SPEC: dict[str, Any] = {"uuid": "vm-a", "name": "a", "vcpus": 1, "memory_mib": 64}


@pytest.mark.parametrize(("lease_s", "contact_at_start", "judged", "cut_off"), [
    (60.0, NOW - 61, False, True),  # out of touch past the lease
    (60.0, NOW - 60, False, False),  # exactly the lease: not past it
    (60.0, NOW - 5, False, False),
    (60.0, None, False, False),  # never in touch (a fresh node): nothing to judge
    (0.0, NOW - 3600, False, False),  # no lease: never cut off
    (60.0, NOW - 3600, True, False),  # judged at an earlier recovery: libvirt came back
])
def test_cut_off_at_start(lease_s: float, contact_at_start: float | None, judged: bool,
                          cut_off: bool) -> None:
    assert cut_off_at_start(lease_s=lease_s, contact_at_start=contact_at_start, judged=judged,
                            now=NOW) is cut_off


def _order(action: str = "start", *, expires_at: float = NOW + 60,
           state: str | None = "accepted", beside: bool = False) -> Unfinished:
    return Unfinished("ord-1", action, expires_at, state, beside)


EXPIRED = "not finished: the agent stopped while it ran, and it is expired now"
CUT_OFF = "not finished: the agent stopped while it ran, and it is cut off past the lease now"


@pytest.mark.parametrize(("order", "cut_off", "settled"), [
    (_order("start"), False, Resume("ord-1")),
    (_order("stop"), True, Resume("ord-1")),  # stopping a guest is fine cut off
    (_order("delete"), True, Resume("ord-1")),
    (_order("migrate"), True, Resume("ord-1")),
    (_order("start"), True, Abandon("ord-1", CUT_OFF, undo_create=False)),
    (_order("create"), True, Abandon("ord-1", CUT_OFF, undo_create=True)),
    (_order("stop", expires_at=NOW - 1), False, Abandon("ord-1", EXPIRED, undo_create=False)),
    (_order("create", expires_at=NOW - 1), False, Abandon("ord-1", EXPIRED, undo_create=True)),
    # Expired and cut off: expiry is the reason given.
    (_order("create", expires_at=NOW - 1), True, Abandon("ord-1", EXPIRED, undo_create=True)),
    (_order("stop", expires_at=NOW), False, Resume("ord-1")),  # expires at, not before, now
    (_order("start", state="succeeded"), False, Leave("ord-1")),  # ended meanwhile
    (_order("start", state="failed", expires_at=NOW - 1), False, Leave("ord-1")),
    (_order("start", state=None), False, Leave("ord-1")),
    (_order("migrate", beside=True), False, Leave("ord-1")),  # runs beside the queue
    (_order("migrate", beside=True, expires_at=NOW - 1), True, Leave("ord-1")),
])
def test_settle_an_unfinished_order(order: Unfinished, cut_off: bool,
                                    settled: Settlement) -> None:
    assert settle(order, NOW, cut_off=cut_off) == settled


def _want(uuid: str, state: str, spec: dict[str, Any] | None = None) -> Desired:
    return Desired(uuid, spec if spec is not None else {}, state)


@pytest.mark.parametrize(("want", "observed", "actions"), [
    (_want("vm-a", "running"), {"vm-a": "running"}, []),
    (_want("vm-a", "running"), {"vm-a": "shut off"}, [StartVm("vm-a")]),
    (_want("vm-a", "running"), {"vm-a": "crashed"}, [StartVm("vm-a")]),
    (_want("vm-a", "running"), {"vm-a": "paused"}, []),  # paused by someone: left so
    (_want("vm-a", "running", SPEC), {"vm-a": None}, [DefineVm("vm-a", SPEC), StartVm("vm-a")]),
    (_want("vm-a", "running"), {"vm-a": None}, []),  # no spec to define it from
    (_want("vm-a", "stopped", SPEC), {"vm-a": None}, [DefineVm("vm-a", SPEC)]),
    (_want("vm-a", "stopped"), {"vm-a": "shut off"}, []),
    (_want("vm-a", "stopped"), {"vm-a": "running"}, []),  # not stopped by recovery
    (_want("vm-a", "running", SPEC), {}, []),  # its state could not be read
    (_want("vm-a", "incoming", SPEC), {"vm-a": None}, []),  # not this node's yet
    (_want("vm-a", "leaving", SPEC), {"vm-a": "shut off"}, []),  # maybe no more
    (_want("vm-a", "fenced", SPEC), {"vm-a": "paused"}, []),  # only an order resumes it
])
def test_plan_restore(want: Desired, observed: dict[str, str | None],
                      actions: list[Any]) -> None:
    assert plan_restore([want], observed, cut_off=False) == actions


def test_a_node_cut_off_restores_nothing_and_looks_at_nothing() -> None:
    wants = [_want("vm-a", "running", SPEC), _want("vm-b", "stopped")]
    assert to_restore(wants, cut_off=True) == []
    assert plan_restore(wants, {"vm-a": None, "vm-b": None}, cut_off=True) == []


def test_restore_looks_at_the_vms_that_should_run_or_be_stopped_in_journal_order() -> None:
    wants = [_want(u, s) for u, s in (("a", "running"), ("b", "incoming"), ("c", "stopped"),
                                       ("d", "leaving"), ("e", "fenced"), ("f", "running"))]
    assert to_restore(wants, cut_off=False) == ["a", "c", "f"]
    observed = {"a": "shut off", "c": "shut off", "f": "crashed"}
    assert plan_restore(wants, observed, cut_off=False) == [StartVm("a"), StartVm("f")]
