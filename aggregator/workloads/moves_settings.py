"""What every part of moving VMs shares: the settings a VM moves with (:class:`MoveSettings`),
what a move needs besides the database (:class:`Context`), the limits, and how the work on one
move, drain or lost VM that fails is kept from the others (:func:`on_row_error`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from aggregator.errors import body_of
from contract.wire import Scalar
from plumbing.shapes import Rule

if TYPE_CHECKING:  # only the types: the pure modules of moves import this one
    from aggregator.trust.pki import OrderSigner
    from aggregator.workloads import vms
    from contract.profiles import Profile

log = logging.getLogger("virt8ra.aggregator.moves")
MODES: Final = ("live", "cold")
OPEN_STATES: Final = ("preparing", "migrating", "adopting", "releasing")
MIGRATE_TTL_MARGIN_S: Final = 120.0  # a migrate order lives its timeout plus this
DRAIN_PARALLEL_MAX: Final = 32
RESTART_RETRY_S: Final = 60.0  # a restart elsewhere that failed is tried again after this
MAX_ASKS: Final = 5  # a destination is asked this often to take a VM over or say where it is
EVICT_RETRY_S: Final = 60.0


@dataclass(frozen=True)
class _How:
    """How a VM moves, as a request says it: the shape both bodies below share (their JSON
    schema in openapi.json comes from these definitions)."""

    max_downtime_ms: Annotated[int, Rule(minimum=1, maximum=60_000)] = 300
    bandwidth_mib_s: Annotated[int, Rule(minimum=0, maximum=1 << 20,
                                         description="0: no limit")] = 0
    auto_converge: bool = True
    postcopy: bool = False
    timeout_s: Annotated[int, Rule(minimum=1, maximum=86_400, description=(
        "past it the migration is aborted; the VM stays"))] = 300


@dataclass(frozen=True)
class MoveBody(_How):
    """``POST /api/v1/vms/{id}/migrate``."""

    to: Annotated[str, Rule(must="a node id", description=(
        "the destination node (default: placement)"))] = ""
    mode: Literal["live", "cold"] = "live"


@dataclass(frozen=True)
class DrainBody(_How):
    """``POST /api/v1/nodes/{id}/drain``: every VM moved off, ``parallel`` at a time."""

    mode: Literal["auto", "live", "cold"] = "auto"
    parallel: Annotated[int, Rule(minimum=1, maximum=DRAIN_PARALLEL_MAX)] = 2


@dataclass(frozen=True)
class MoveSettings:
    """How one VM moves; the defaults are what an operator should want."""

    mode: str = "live"  # or "cold"; "auto" (drains): live where possible
    max_downtime_ms: int = 300  # QEMU's own default
    bandwidth_mib_s: int = 0  # 0: no limit
    auto_converge: bool = True
    postcopy: bool = False
    timeout_s: float = 300.0

    @classmethod
    def from_json(cls, body: Any, *, modes: tuple[str, ...] = MODES) -> MoveSettings:
        """The settings in a request body (a move's, or with ``auto`` among ``modes`` a
        drain's); Refused, naming the field, if it breaks the shape."""
        shape: type[MoveBody | DrainBody] = DrainBody if "auto" in modes else MoveBody
        return cls.of(body_of(shape, body))

    @classmethod
    def of(cls, body: MoveBody | DrainBody) -> MoveSettings:
        return cls(body.mode, body.max_downtime_ms, body.bandwidth_mib_s, body.auto_converge,
                   body.postcopy, float(body.timeout_s))

    def params(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {"max_downtime_ms": self.max_downtime_ms,
                                  "auto_converge": self.auto_converge,
                                  "postcopy": self.postcopy, "timeout_s": self.timeout_s}
        if self.bandwidth_mib_s:
            out["bandwidth_mib_s"] = self.bandwidth_mib_s
        return out


@dataclass(frozen=True)
class Context:
    """What a move needs besides the database."""

    signer: OrderSigner
    profiles: Mapping[str, Profile]
    live: vms.Liveness
    ttl_s: float


def on_row_error(what: str) -> Callable[[Exception], None]:
    """For :meth:`Tx.savepoint <aggregator.store.tx.Tx.savepoint>` around one row's work: a row
    that fails (our bug, or data we did not expect) is rolled back and logged, and the others
    go on."""

    def logged(exc: Exception) -> None:
        log.error("%s failed; it is tried again at the next turn", what, exc_info=exc)

    return logged
