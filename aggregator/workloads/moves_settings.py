"""What every part of moving VMs shares: the settings a VM moves with (:class:`MoveSettings`),
what a move needs besides the database (:class:`Context`), the limits, and how the work on one
move, drain or lost VM that fails is kept from the others (:func:`on_row_error`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aggregator.errors import Refused
from contract.wire import Scalar

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
        if not isinstance(body, dict):
            raise Refused("invalid_request", "body must be a JSON object")
        mode = body.get("mode", "live" if "auto" not in modes else "auto")
        if mode not in modes:
            raise Refused("invalid_request", f"mode must be one of {', '.join(modes)}")

        def integer(key: str, low: int, high: int, default: int) -> int:
            value = body.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise Refused("invalid_request", f"{key} must be an integer from {low} to {high}")
            return value

        def flag(key: str, default: bool) -> bool:
            value = body.get(key, default)
            if not isinstance(value, bool):
                raise Refused("invalid_request", f"{key} must be true or false")
            return value

        return cls(mode, integer("max_downtime_ms", 1, 60_000, cls.max_downtime_ms),
                   integer("bandwidth_mib_s", 0, 1 << 20, cls.bandwidth_mib_s),
                   flag("auto_converge", cls.auto_converge), flag("postcopy", cls.postcopy),
                   float(integer("timeout_s", 1, 86_400, int(cls.timeout_s))))

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
