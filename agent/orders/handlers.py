"""Which handler runs each order action: a table. An order's action picks its parameters'
dataclass (``contract/orders.py``) and its handler here; nothing else looks at the action.

A handler ``(Context, Job) -> Outcome`` raises Refused (or a libvirt, image or spec error) for
an order that failed. ``beside``: the order runs beside the orders after it (a migration may
take minutes; runner.py keeps the orders about the same VM waiting for it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from agent.orders import incoming, lifecycle, migrate
from agent.orders.context import Context, Job, Outcome
from agent.orders.errors import Refused
from contract.orders import parse_params
from contract.wire import Order, ProtocolError


@dataclass(frozen=True)
class Handler:
    run: Callable[[Context, Job[Any]], Awaitable[Outcome]]
    beside: bool = False


HANDLERS: Final[Mapping[str, Handler]] = MappingProxyType({
    "create": Handler(lifecycle.create),
    "start": Handler(lifecycle.start),
    "stop": Handler(lifecycle.stop),
    "reboot": Handler(lifecycle.reboot),
    "delete": Handler(lifecycle.delete),
    "receive": Handler(incoming.receive),
    "migrate": Handler(migrate.migrate, beside=True),
    "adopt": Handler(incoming.adopt),
    "release": Handler(incoming.release),
    "evict": Handler(lifecycle.delete),
})


def job_of(order: Order) -> Job[Any]:
    """The order with its parameters read; refused for an action this node does not know or
    parameters that break the contract."""
    if order.action not in HANDLERS:
        raise Refused(f"unknown action {order.action!r}")
    try:
        return Job(order, parse_params(order.action, order.params))
    except ProtocolError as exc:
        raise Refused(f"malformed {order.action} order: params.{exc}") from None


def handler_of(job: Job[Any]) -> Handler:
    return HANDLERS[job.order.action]
