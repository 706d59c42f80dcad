"""What libvirt says of guests, in our names and dataclasses: states and lifecycle events as
virsh names them, and a guest's statistics record as a wire sample. Pure functions over what
``hypervisor.py`` received."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from contract.wire import GuestBlockSample, GuestNicSample, GuestSample

STATE_NAMES: Final = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shut off",
    6: "crashed",
    7: "pmsuspended",
}
EVENT_NAMES: Final = {
    0: "defined",
    1: "undefined",
    2: "started",
    3: "suspended",
    4: "resumed",
    5: "stopped",
    6: "shutdown",
    7: "pmsuspended",
    8: "crashed",
}
# Detail codes per event, as virsh names them (libvirt's virDomainEvent*DetailType).
DETAIL_NAMES: Final[dict[int, tuple[str, ...]]] = {
    0: ("added", "updated", "renamed", "from snapshot"),
    1: ("removed", "renamed"),
    2: ("booted", "migrated", "restored", "from snapshot", "wakeup"),
    3: ("paused", "migrated", "I/O error", "watchdog", "restored", "from snapshot",
        "API error", "post-copy", "post-copy failed"),
    4: ("unpaused", "migrated", "from snapshot", "post-copy", "post-copy failed"),
    5: ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot"),
    6: ("finished", "guest", "host"),
    7: ("memory", "disk"),
    8: ("panicked", "crashloaded"),
}


@dataclass(frozen=True, slots=True)
class DomainEvent:
    vm_uuid: str
    vm_name: str
    event: str
    detail: str
    state: str
    ts: float


def state_name(state: int | None) -> str:
    """libvirt's state number (``virDomainState``) by name; ``unknown`` for None (the guest
    could not be asked: it is gone) or a number this code does not know."""
    return "unknown" if state is None else STATE_NAMES.get(state, "unknown")


def domain_event(vm_uuid: str, vm_name: str, event: int, detail: int, state: int | None,
                 ts: float) -> DomainEvent:
    """A lifecycle event from libvirt's numbers: the event, its detail (a number without a
    name stays a number) and the guest's state then (None: it could not be asked)."""
    details = DETAIL_NAMES.get(event, ())
    return DomainEvent(
        vm_uuid=vm_uuid,
        vm_name=vm_name,
        event=EVENT_NAMES.get(event, str(event)),
        detail=details[detail] if 0 <= detail < len(details) else str(detail),
        state=state_name(state),
        ts=ts,
    )


def _int(stats: dict[str, Any], key: str) -> int | None:
    value = stats.get(key)
    return int(value) if isinstance(value, int) else None


def guest_sample(uuid: str, name: str, stats: dict[str, Any]) -> GuestSample:
    """One guest's ``getAllDomainStats`` record as a wire sample (KiB become bytes)."""

    def kib(key: str) -> int | None:
        value = _int(stats, key)
        return None if value is None else value * 1024

    block = tuple(
        GuestBlockSample(
            name=str(stats.get(f"block.{i}.name", f"block{i}")),
            read_bytes=_int(stats, f"block.{i}.rd.bytes") or 0,
            write_bytes=_int(stats, f"block.{i}.wr.bytes") or 0,
            read_ops=_int(stats, f"block.{i}.rd.reqs") or 0,
            write_ops=_int(stats, f"block.{i}.wr.reqs") or 0,
            capacity_bytes=_int(stats, f"block.{i}.capacity"),
            allocation_bytes=_int(stats, f"block.{i}.allocation"),
        )
        for i in range(_int(stats, "block.count") or 0)
    )
    nics = tuple(
        GuestNicSample(
            name=str(stats.get(f"net.{i}.name", f"net{i}")),
            rx_bytes=_int(stats, f"net.{i}.rx.bytes") or 0,
            tx_bytes=_int(stats, f"net.{i}.tx.bytes") or 0,
            rx_packets=_int(stats, f"net.{i}.rx.pkts") or 0,
            tx_packets=_int(stats, f"net.{i}.tx.pkts") or 0,
        )
        for i in range(_int(stats, "net.count") or 0)
    )
    return GuestSample(
        uuid=uuid,
        name=name,
        state=STATE_NAMES.get(_int(stats, "state.state") or 0, "unknown"),
        vcpus=_int(stats, "vcpu.current"),
        cpu_time_ns=_int(stats, "cpu.time"),
        memory_max_bytes=kib("balloon.maximum"),
        balloon_current_bytes=kib("balloon.current"),
        balloon_rss_bytes=kib("balloon.rss"),
        block=block,
        nics=nics,
    )
