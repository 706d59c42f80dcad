"""How a move goes on when the order it waits for has ended: the step table, and pure decisions
over plain data.

A move waits for one order at a time, its *step*. When that order ends, :func:`decide` looks
the move up in :data:`STEPS` by its kind, its state and the step's outcome and returns a
:class:`Next` that names what to do; :mod:`aggregator.workloads.moves_advance` carries it out.
The move's states and the only ways between them are :data:`TRANSITIONS`.

Kinds: ``move`` (a live or cold move: ``receive`` at the destination, ``migrate`` at the
source, ``adopt`` at the destination) and ``restart`` (a ``create`` on another node after the
VM's node was lost; its source is the lost node).

Outcomes (:func:`outcome`) are the step order's own end (``succeeded``, ``failed``,
``expired``), made finer where the step asks for more:

- ``uncertified``: the destination prepared, but the migration address it gave is not in its
  certificate (a live move, or a cold one that copies a disk, connects to that address);
- ``present`` / ``absent``: a ``release`` was answered: the VM is at the destination, or not;
- ``unanswered`` / ``silent``: a ``release`` or ``adopt`` failed or expired, and the
  destination may be asked again (fewer than :data:`MAX_ASKS` so far), or may not.

An outcome nobody reported is never taken for an answer: a migrate (or a restart's create)
that did not succeed is followed by asking the destination whether the VM arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from aggregator.workloads.moves_settings import MAX_ASKS, MoveSettings
from aggregator.workloads.transitions import check
from contract.orders import MigrateParams


class Do(StrEnum):
    """What carrying out a step does."""

    MIGRATE = "migrate"  # the source moves the VM (migrate); what dest prepared is kept
    ABANDON = "abandon"  # the destination drops what it prepared (release); the move fails
    ARRIVE = "arrive"  # the VM left the source: it is dest's, which takes it over (adopt)
    ASK = "ask"  # the destination is asked whether the VM arrived (release)
    ADOPT = "adopt"  # the destination is asked again to take the VM over
    ADOPTED = "adopted"  # the VM is as the destination says; the move succeeded
    FAIL = "fail"  # the move fails; the VM stays where it is recorded
    RESTARTED = "restarted"  # the VM runs at dest; the lost node's copy goes when it returns
    MADE = "made"  # dest made the VM after all: it counts there; then as RESTARTED
    BACK = "back"  # nothing was made at dest: the VM is (paused) on the lost node again


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of :data:`STEPS`: what to do, the move's state after it, the move's error
    (a template over :func:`reason_fields`; "" leaves it as it is while the move goes on), and
    whether the step order's result is kept as the move's result."""

    do: Do
    then: str
    reason: str = ""
    keep_result: bool = False


_PREPARE_FAILED = Rule(Do.ABANDON, "failed", "{mode} move to {dest} failed: the destination {why}")
_MIGRATE_FAILED = Rule(Do.ASK, "releasing", "{mode} move to {dest} failed: {why}")

STEPS: Final[Mapping[tuple[str, str, str], Rule]] = MappingProxyType({
    # kind, state, outcome: rule
    ("move", "preparing", "succeeded"): Rule(Do.MIGRATE, "migrating"),
    ("move", "preparing", "uncertified"): Rule(
        Do.ABANDON, "failed", "{mode} move to {dest} failed: its migration address {address}"
        " is not in its certificate ({names})"),
    ("move", "preparing", "failed"): _PREPARE_FAILED,
    ("move", "preparing", "expired"): _PREPARE_FAILED,
    ("move", "migrating", "succeeded"): Rule(Do.ARRIVE, "adopting", keep_result=True),
    ("move", "migrating", "failed"): _MIGRATE_FAILED,
    ("move", "migrating", "expired"): _MIGRATE_FAILED,
    ("move", "releasing", "present"): Rule(Do.ARRIVE, "adopting"),
    ("move", "releasing", "absent"): Rule(
        Do.FAIL, "failed", "{error}; the VM is still on {source}"),
    ("move", "releasing", "unanswered"): Rule(Do.ASK, "releasing"),
    ("move", "releasing", "silent"): Rule(
        Do.FAIL, "failed", "{error}; {dest} did not say whether the VM arrived ({why}): it is"
        " recorded on {source}"),
    ("move", "adopting", "succeeded"): Rule(Do.ADOPTED, "succeeded"),
    ("move", "adopting", "unanswered"): Rule(Do.ADOPT, "adopting"),
    ("move", "adopting", "silent"): Rule(
        Do.FAIL, "failed", "the VM is on {dest}, which could not take it over: {why}"),
    ("restart", "migrating", "succeeded"): Rule(Do.RESTARTED, "succeeded"),
    ("restart", "migrating", "failed"): Rule(
        Do.BACK, "failed", "restart on {dest} failed: {why}; the VM is still on {source}"),
    ("restart", "migrating", "expired"): Rule(
        Do.ASK, "releasing", "restart on {dest}: its create order expired"),
    ("restart", "releasing", "present"): Rule(Do.MADE, "succeeded"),
    ("restart", "releasing", "absent"): Rule(
        Do.BACK, "failed", "restart on {dest}: its create order expired before {dest} took"
        " it; the VM is still on {source}"),
    ("restart", "releasing", "unanswered"): Rule(Do.ASK, "releasing"),
    ("restart", "releasing", "silent"): Rule(
        Do.FAIL, "failed", "restart on {dest}: its create order expired and {dest} did not"
        " say whether it made the VM ({why}); the copy on {source} is kept"),
})

ENDED: Final = ("succeeded", "failed")
TRANSITIONS: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "preparing": frozenset({"migrating", "failed"}),
    "migrating": frozenset({"adopting", "releasing", "succeeded", "failed"}),
    "releasing": frozenset({"releasing", "adopting", "succeeded", "failed"}),
    "adopting": frozenset({"adopting", "succeeded", "failed"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
})
# The states whose order is asked again when it does not succeed, and that order's action.
ASKED_AGAIN: Final[Mapping[str, str]] = MappingProxyType(
    {"releasing": "release", "adopting": "adopt"})


class NoStep(LookupError):
    """:data:`STEPS` has no row for a move of ``kind`` in ``state`` whose step ended
    ``outcome``: our bug (or a row we did not write)."""

    def __init__(self, kind: str, state: str, outcome: str) -> None:
        super().__init__(f"no step for a {kind} {state} whose order ended {outcome}")
        self.kind = kind
        self.state = state
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class StepFacts:
    """What deciding a move's next step needs: the move and its step order's end."""

    mode: str  # live, cold, restart
    state: str  # preparing, migrating, releasing, adopting
    source: str  # where the VM was (a restart: the lost node)
    dest: str
    error: str  # what the move recorded (why its migrate or create did not succeed)
    order_state: str  # the step order's end: succeeded, failed, expired
    order_error: str
    result: Mapping[str, Any] = field(default_factory=dict)  # the step order's result
    certified: tuple[str, ...] = ()  # dest's certificate names: see checks_certificate
    asks: int = 0  # orders of ASKED_AGAIN[state] the move issued: see counts_asks


@dataclass(frozen=True, slots=True)
class Next:
    """What to do with the move: ``do``, then its state is ``state``. ``reason``: its error
    ("" while it goes on: leave it). ``vm_state``: the VM's actual state after ARRIVE, ADOPTED,
    MADE or BACK. ``result``: what ARRIVE records as the move's result."""

    do: Do
    state: str
    reason: str = ""
    vm_state: str = ""
    result: Mapping[str, Any] = field(default_factory=dict)


def transition(old: str, new: str) -> str:
    """``new``, if a move may go from ``old`` to it; else
    :class:`~aggregator.workloads.transitions.IllegalTransition`."""
    return check("move", TRANSITIONS, old, new)


def kind(mode: str) -> str:
    return "restart" if mode == "restart" else "move"


def checks_certificate(state: str, order_state: str) -> bool:
    """Whether deciding needs the destination's certificate names."""
    return state == "preparing" and order_state == "succeeded"


def counts_asks(state: str, order_state: str) -> bool:
    """Whether deciding needs how often the destination was asked (``asks``)."""
    return state in ASKED_AGAIN and order_state != "succeeded"


def _address(facts: StepFacts) -> str:
    return str(facts.result.get("address", "")).lower()


def outcome(facts: StepFacts) -> str:
    """The step's outcome, as :data:`STEPS` is keyed."""
    ended = facts.order_state
    if checks_certificate(facts.state, ended) and (
            facts.mode == "live" or facts.result.get("disk")) and (
            _address(facts) not in facts.certified):
        return "uncertified"
    if facts.state == "releasing" and ended == "succeeded":
        return "present" if facts.result.get("present") is True else "absent"
    if counts_asks(facts.state, ended):
        return "unanswered" if facts.asks < MAX_ASKS else "silent"
    return ended


def reason_fields(facts: StepFacts) -> dict[str, str]:
    """What the reasons of :data:`STEPS` may say."""
    why = facts.order_error or (
        "its order expired" if facts.order_state == "expired" else facts.order_state)
    return {"mode": facts.mode, "source": facts.source, "dest": facts.dest,
            "error": facts.error, "why": why, "address": _address(facts) or "(none)",
            "names": ", ".join(facts.certified) or "no names"}


def _vm_state(do: Do, facts: StepFacts) -> str:
    if do is Do.ARRIVE:
        return "running" if facts.mode == "live" else "pending"
    if do in (Do.ADOPTED, Do.MADE):
        return str(facts.result.get("state", "unknown"))
    return "unknown" if do is Do.BACK else ""


def decide(facts: StepFacts) -> Next:
    """The move's next step, by :data:`STEPS`; :class:`NoStep` if it has no row."""
    key = (kind(facts.mode), facts.state, outcome(facts))
    rule = STEPS.get(key)
    if rule is None:
        raise NoStep(*key)
    return Next(rule.do, rule.then, rule.reason.format(**reason_fields(facts)),
                _vm_state(rule.do, facts), facts.result if rule.keep_result else {})


_PREPARED_FILES: Final = ("address", "domain_type", "disk", "kernel", "initrd", "serial")
_OFFERS: Final = ("arch", "machines", "cpu_models")


def migrate_params(vm_id: str, dest: str, mode: str, dest_country: str, dest_provider: str,
                   prepared: Mapping[str, Any], settings: Mapping[str, Any]) -> MigrateParams:
    """What the source's ``migrate`` order says: where to, what the destination prepared and
    offers guests (the source holds the VM against it), and how (``settings``: the move's
    :class:`~aggregator.workloads.moves_settings.MoveSettings` as stored)."""
    how = MoveSettings(**settings)
    return MigrateParams(
        vm_uuid=vm_id, dest=dest, mode=mode, dest_country=dest_country,
        dest_provider=dest_provider,
        **{k: v for k, v in prepared.items() if k in _PREPARED_FILES and isinstance(v, str)},
        **{f"dest_{k}": v for k, v in prepared.items() if k in _OFFERS and isinstance(v, str)},
        max_downtime_ms=how.max_downtime_ms, auto_converge=how.auto_converge,
        postcopy=how.postcopy, timeout_s=how.timeout_s,
        bandwidth_mib_s=how.bandwidth_mib_s or None)  # 0: no limit, not sent


def migrate_ttl_s(ttl_s: float, settings: Mapping[str, Any], margin_s: float) -> float:
    """How long a migrate order lives: the move's timeout plus ``margin_s``, at least
    ``ttl_s``."""
    return max(ttl_s, float(settings.get("timeout_s", 300)) + margin_s)
