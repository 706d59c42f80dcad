"""What an order's handler is given, and what it gives back.

A handler (``handlers.py``) runs one accepted order: it gets a :class:`Context` (libvirt, the
journal, the node's settings) and a :class:`Job` (the order and its parameters as
``contract/orders.py`` read them), and returns an :class:`Outcome` (the result to report and
what the journal wants of the VM from then on), or raises ``Refused`` (or a libvirt, image or
domain spec error): the order failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from agent.host.hypervisor import Hypervisor, MigrationProgress
from agent.orders.errors import Refused
from agent.orders.journal import Desired, Journal
from agent.orders.settings import Settings
from contract.orders import CreateParams, OrderParams, ReceiveParams
from contract.wire import Order, VmSpec

P = TypeVar("P", bound=OrderParams)


@dataclass(frozen=True)
class Context:
    hv: Hypervisor
    journal: Journal
    settings: Settings
    tls: Callable[[], Any]  # the node's TLS context for the image service
    progress: Callable[[str, MigrationProgress], None]  # a migration's figures, by order id


@dataclass(frozen=True)
class Job(Generic[P]):
    """A verified order with its parameters."""

    order: Order
    params: P

    @property
    def order_id(self) -> str:
        return self.order.order_id

    @property
    def vm_uuid(self) -> str:
        """The VM the order is about: its spec's, else the one its parameters name ("")."""
        if self.order.vm is not None:
            return self.order.vm.uuid
        params: OrderParams = self.params
        if isinstance(params, CreateParams | ReceiveParams):
            return ""
        return params.vm_uuid

    def spec(self) -> VmSpec:
        """The VM spec the order carries (create, receive); refused without one."""
        if self.order.vm is None:
            raise Refused(f"a {self.order.action} order without a VM spec")
        return self.order.vm

    def uuid(self) -> str:
        """The VM the order names; refused without one."""
        if not self.vm_uuid:
            raise Refused("no vm_uuid")
        return self.vm_uuid


@dataclass(frozen=True)
class Outcome:
    """A handler's result: reported as it is (its scalars), and journaled with the order, in
    the same transaction as the VM's new desired state (``desired``) or forgetting it
    (``forget``: the VM's uuid)."""

    result: dict[str, Any]
    desired: Desired | None = None
    forget: str = ""
