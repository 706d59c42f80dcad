"""An order's states and the only ways between them, as a table; and the pure decision of what
a node's report does to an order.

::

    pending → sent → accepted → succeeded | failed
    pending | sent → accepted | succeeded | failed   (a report may overtake the publish's mark)
    pending | sent | accepted → expired              (not finished by its expiry, or superseded)
    sent → sent                                      (published again)
    expired → succeeded                              (it ran after all: what is, counts)

An accepted order asked about again stays ``accepted``: that is no transition. Every change of
an order's state in :mod:`aggregator.workloads.orders` goes through :func:`transition`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from aggregator.workloads.transitions import check

INITIAL: Final = "pending"
OPEN: Final = ("pending", "sent", "accepted")
FINAL: Final = ("succeeded", "failed", "expired")
# What a node may report of an order (besides ``progress``); anything else counts as failed.
REPORTED: Final = ("accepted", "succeeded", "failed")

TRANSITIONS: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "pending": frozenset({"sent", "accepted", "succeeded", "failed", "expired"}),
    "sent": frozenset({"sent", "accepted", "succeeded", "failed", "expired"}),
    "accepted": frozenset({"succeeded", "failed", "expired"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "expired": frozenset({"succeeded"}),
})


def transition(old: str, new: str) -> str:
    """``new``, if an order may go from ``old`` to it; else
    :class:`~aggregator.workloads.transitions.IllegalTransition`."""
    return check("order", TRANSITIONS, old, new)


def after_report(state: str, reported: str) -> str | None:
    """The state an order in ``state`` takes when its node reports ``reported`` (not
    ``progress``); None when the report changes nothing: the order has ended (unless it
    expired and now succeeded: it ran after all), or it says ``accepted`` again."""
    new = reported if reported in REPORTED else "failed"
    late = state == "expired" and new == "succeeded"
    if (state in FINAL and not late) or (new == "accepted" and state == "accepted"):
        return None
    return transition(state, new)
