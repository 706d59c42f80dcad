"""Whether a guest can run on another host as it runs now: the check both ends of a move make
before libvirt is asked to migrate.

The destination says what it offers (:class:`HostOffers`, from libvirt's capabilities and
domain capabilities) in the result of its ``receive`` order; the aggregator passes that on in
the ``migrate`` order, and the source holds it against what the running guest needs
(:class:`GuestNeeds`, from its live XML): the same architecture, a machine type the
destination's QEMU has, and a CPU model it can run. A guest that would not fit stays where it
is, and the move says why instead of failing inside libvirt halfway through.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GuestNeeds:
    """What a guest needs of a host: its architecture, machine type and CPU model (``""``
    where its XML names none: the hypervisor's default, which every host of the arch has)."""

    arch: str
    machine: str
    cpu_mode: str  # custom, host-model, host-passthrough, maximum; "" without <cpu>
    cpu_model: str


@dataclass(frozen=True, slots=True)
class HostOffers:
    """What a host offers guests of one domain type. ``machines`` and ``cpu_models`` are
    None where libvirt does not tell (the test driver has no domain capabilities)."""

    arch: str
    machines: frozenset[str] | None
    cpu_models: frozenset[str] | None

    def as_result(self) -> dict[str, str]:
        """As plain strings for an order's result (and the next order's parameters)."""
        return {
            "arch": self.arch,
            "machines": " ".join(sorted(self.machines)) if self.machines is not None else "?",
            "cpu_models": (" ".join(sorted(self.cpu_models))
                           if self.cpu_models is not None else "?"),
        }

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> HostOffers | None:
        """Read back what :meth:`as_result` wrote, as a migrate order carries it (each key
        under ``dest_``); None if it is not there (an aggregator or a destination from before
        this check)."""
        arch = params.get("dest_arch")
        if not isinstance(arch, str) or not arch:
            return None

        def names(key: str) -> frozenset[str] | None:
            value = params.get(f"dest_{key}")
            if not isinstance(value, str) or value == "?":
                return None
            return frozenset(value.split())

        return cls(arch, names("machines"), names("cpu_models"))


def guest_needs(xml: str) -> GuestNeeds:
    """What the guest described by ``xml`` (its live or migratable XML) needs of a host."""
    root = ET.fromstring(xml)  # noqa: S314 - from our own libvirtd, not the network
    os_type = root.find("os/type")
    cpu = root.find("cpu")
    mode = ""
    model = ""
    if cpu is not None:
        mode = cpu.get("mode", "custom")
        model = (cpu.findtext("model") or "").strip()
    return GuestNeeds(
        arch=os_type.get("arch", "") if os_type is not None else "",
        machine=os_type.get("machine", "") if os_type is not None else "",
        cpu_mode=mode,
        cpu_model=model,
    )


def host_offers(caps_xml: str, domcaps_xml: str | None, domain_type: str) -> HostOffers:
    """What the host offers guests of ``domain_type``: its own architecture, the machine
    types listed for that architecture (aliases such as ``pc`` and the versioned names they
    stand for) and the CPU models its domain capabilities do not call unusable."""
    root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    arch = (root.findtext("host/cpu/arch") or "").strip()
    machines: set[str] = set()
    for guest in root.findall("guest"):
        if (guest.findtext("os_type") or "").strip() != "hvm":
            continue
        el = guest.find("arch")
        if el is None or el.get("name") != arch:
            continue
        if not any(d.get("type") == domain_type for d in el.findall("domain")):
            continue
        for machine in [*el.findall("machine"), *el.findall(f"domain[@type='{domain_type}']"
                                                            "/machine")]:
            machines.update(n for n in ((machine.text or "").strip(),
                                        machine.get("canonical", "")) if n)
    models: frozenset[str] | None = None
    if domcaps_xml is not None:
        dom = ET.fromstring(domcaps_xml)  # noqa: S314 - from our own libvirtd
        custom = dom.find("cpu/mode[@name='custom']")
        if custom is not None and custom.get("supported") == "yes":
            models = frozenset((m.text or "").strip() for m in custom.findall("model")
                               if m.get("usable") != "no" and (m.text or "").strip())
        else:
            models = frozenset()
    return HostOffers(arch, frozenset(machines) if machines else None, models)


def misfits(needs: GuestNeeds, offers: HostOffers) -> list[str]:
    """Why the guest cannot run on the host as it runs now; empty if it can (as far as the
    host tells)."""
    why: list[str] = []
    if needs.arch and needs.arch != offers.arch:
        why.append(f"the guest is {needs.arch}, the destination runs {offers.arch} guests")
        return why  # nothing else can fit
    if needs.machine and offers.machines is not None and needs.machine not in offers.machines:
        why.append(f"the destination's QEMU has no machine type {needs.machine}")
    if needs.cpu_mode in ("host-passthrough", "host-model", "maximum"):
        why.append(f"the guest's CPU is the host's own ({needs.cpu_mode}): it moves only"
                   " between identical hosts, which this check cannot tell")
    elif needs.cpu_model and offers.cpu_models is not None \
            and needs.cpu_model not in offers.cpu_models:
        why.append(f"the destination cannot run the guest's CPU model {needs.cpu_model}")
    return why
