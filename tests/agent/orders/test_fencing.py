"""The fence (agent/orders/fencing.py) over plain data, without libvirt: what is paused, what is
marked fenced, what could not be reached."""

from __future__ import annotations

from typing import Any

import pytest

from agent.orders.fencing import (
    MarkFenced,
    NotReached,
    PauseVm,
    RecordFence,
    plan_fence,
    to_fence,
)
from agent.orders.journal import Desired

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("state", "observed", "actions"), [
    ("running", "running", [PauseVm("vm-a"), MarkFenced("vm-a")]),
    ("running", "paused", [MarkFenced("vm-a")]),  # already paused: marked all the same
    ("running", "shut off", [MarkFenced("vm-a")]),  # off: must not start on its own either
    ("running", None, [MarkFenced("vm-a")]),  # not defined here
    ("incoming", "running", [PauseVm("vm-a")]),  # arriving: paused, not this node's to mark
    ("incoming", None, []),
    ("stopped", "running", []),  # not run by order
    ("leaving", "running", []),
    ("fenced", "running", []),  # fenced before (resumed by hand?): the order decides
])
def test_plan_fence(state: str, observed: str | None, actions: list[Any]) -> None:
    want = Desired("vm-a", {}, state)
    assert plan_fence([want], {"vm-a": observed}, NOW) == [RecordFence(NOW), *actions]


def test_a_vm_whose_state_cannot_be_read_is_not_reached_nor_marked() -> None:
    wants = [Desired("vm-a", {}, "running"), Desired("vm-b", {}, "incoming")]
    assert plan_fence(wants, {}, NOW) == [RecordFence(NOW), NotReached("vm-a"),
                                          NotReached("vm-b")]


def test_the_fence_is_recorded_first_even_with_nothing_to_pause() -> None:
    assert plan_fence([], {}, NOW) == [RecordFence(NOW)]
    assert plan_fence([Desired("vm-a", {}, "stopped")], {}, NOW) == [RecordFence(NOW)]


def test_a_fence_looks_at_the_vms_run_or_arriving_by_order() -> None:
    wants = [Desired(u, {}, s) for u, s in (("a", "running"), ("b", "stopped"),
                                             ("c", "incoming"), ("d", "fenced"))]
    assert to_fence(wants) == ["a", "c"]
    observed = {"a": "running", "c": "running"}
    assert plan_fence(wants, observed, NOW) == [
        RecordFence(NOW), PauseVm("a"), MarkFenced("a"), PauseVm("c")]
