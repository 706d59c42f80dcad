"""The table from order action to handler (agent/orders/handlers.py) and what a handler is
handed: every action has one, only a migration runs beside the queue, and an order's action
and parameters are read before anything runs."""

from __future__ import annotations

from typing import Any

import pytest

from agent.orders import incoming, lifecycle, migrate
from agent.orders.errors import Refused
from agent.orders.handlers import HANDLERS, job_of
from contract.orders import PARAMS, AdoptParams, CreateParams, MigrateParams, StartParams
from contract.wire import ORDER_ACTIONS, Order, VmSpec

VM = "6f1c1f0e-8a5b-4c1e-9a57-3b6a2d0f9c11"
SPEC = VmSpec(uuid=VM, name="web-1", vcpus=1, memory_mib=64)


def _order(action: str, params: dict[str, Any], vm: VmSpec | None = None) -> Order:
    return Order(node="si-a", seq=1, order_id="ord-1", issued_at=0.0, expires_at=1.0,
                 action=action, params=params, vm=vm)


def test_every_order_action_has_a_handler_and_parameters() -> None:
    assert set(HANDLERS) == set(ORDER_ACTIONS) == set(PARAMS)


def test_only_a_migration_runs_beside_the_queue() -> None:
    assert [action for action, h in HANDLERS.items() if h.beside] == ["migrate"]


@pytest.mark.parametrize(("action", "run"), [
    ("create", lifecycle.create), ("start", lifecycle.start), ("stop", lifecycle.stop),
    ("reboot", lifecycle.reboot), ("delete", lifecycle.delete), ("evict", lifecycle.delete),
    ("receive", incoming.receive), ("adopt", incoming.adopt), ("release", incoming.release),
    ("migrate", migrate.migrate),
])
def test_each_action_runs_its_handler(action: str, run: object) -> None:
    assert HANDLERS[action].run is run


def test_a_job_holds_the_order_and_its_parameters() -> None:
    job = job_of(_order("adopt", {"vm_uuid": VM, "mode": "live", "start": False, "new": 1}))
    assert job.params == AdoptParams(vm_uuid=VM, mode="live", start=False)
    assert (job.order_id, job.vm_uuid, job.uuid()) == ("ord-1", VM, VM)


def test_the_vm_of_an_order_is_its_spec_s_else_the_one_it_names() -> None:
    created = job_of(_order("create", {}, SPEC))
    assert (created.params, created.vm_uuid, created.spec()) == (CreateParams(), VM, SPEC)
    assert job_of(_order("receive", {"mode": "cold", "source": "si-b"})).vm_uuid == ""
    assert job_of(_order("start", {"vm_uuid": VM})).params == StartParams(vm_uuid=VM)


@pytest.mark.parametrize(("order", "refusal"), [
    (_order("teleport", {"vm_uuid": VM}), "unknown action 'teleport'"),
    (_order("start", {}), "malformed start order: params.vm_uuid: missing"),
    (_order("adopt", {"vm_uuid": VM, "mode": "live", "start": 1}),
     "malformed adopt order: params.start: expected a boolean, got int"),
    (_order("migrate", {"vm_uuid": VM, "mode": "live"}),
     "malformed migrate order: params.dest: missing"),
])
def test_an_unknown_action_or_malformed_parameters_are_refused(order: Order,
                                                              refusal: str) -> None:
    with pytest.raises(Refused) as caught:
        job_of(order)
    assert str(caught.value) == refusal


@pytest.mark.parametrize(("order", "refusal"), [
    (_order("create", {}), "a create order without a VM spec"),
    (_order("receive", {"mode": "live", "source": "si-b"}), "a receive order without a VM spec"),
])
def test_a_create_or_receive_needs_a_vm_spec(order: Order, refusal: str) -> None:
    with pytest.raises(Refused, match=refusal):
        job_of(order).spec()


def test_an_order_naming_no_vm_is_refused_when_it_runs() -> None:
    job = job_of(_order("stop", {"vm_uuid": ""}))
    with pytest.raises(Refused, match="no vm_uuid"):
        job.uuid()


def test_a_migrates_limits_as_libvirt_takes_them() -> None:
    full = MigrateParams(vm_uuid=VM, dest="si-b", mode="live", max_downtime_ms=500,
                         bandwidth_mib_s=100, auto_converge=True, postcopy=True,
                         timeout_s=300.0)
    assert migrate.limits_of(full) == {"max_downtime_ms": 500, "bandwidth_mib_s": 100,
                                       "auto_converge": True, "postcopy": True,
                                       "timeout_s": 300.0}
    bare = MigrateParams(vm_uuid=VM, dest="si-b", mode="live", max_downtime_ms=0,
                         timeout_s=0.5)
    assert migrate.limits_of(bare) == {"max_downtime_ms": None, "bandwidth_mib_s": None,
                                       "auto_converge": False, "postcopy": False,
                                       "timeout_s": migrate.DEFAULT_MIGRATION_TIMEOUT_S}
