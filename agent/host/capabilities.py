"""What libvirt says of the host, read: its capabilities XML (architecture, domain types, CPU
features) and its version number. Pure functions over what ``hypervisor.py`` fetched."""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET


def domain_type_from_capabilities(caps_xml: str) -> str:
    """``kvm`` when the host offers it for its own architecture, else ``qemu`` (or the first)."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return "unknown"
    host_arch = root.findtext("host/cpu/arch") or platform.machine()
    offered: list[str] = []
    for guest in root.findall("guest"):
        arch = guest.find("arch")
        if arch is None or arch.get("name") != host_arch:
            continue
        offered.extend(d.get("type", "") for d in arch.findall("domain"))
    for preferred in ("kvm", "qemu"):
        if preferred in offered:
            return preferred
    return offered[0] if offered else "unknown"


def arch_from_capabilities(caps_xml: str) -> str:
    """The host's own architecture as libvirt names it (``x86_64``, ``aarch64``), or ""."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return ""
    return (root.findtext("host/cpu/arch") or "").strip()


def domain_types_from_capabilities(caps_xml: str) -> tuple[str, ...]:
    """The domain types offered for the host's own architecture: ``kvm``, then ``qemu``, then
    any other (the test driver's ``test``); empty if the XML says nothing."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return ()
    host_arch = root.findtext("host/cpu/arch") or platform.machine()
    offered = {
        d.get("type", "")
        for arch in root.findall("guest/arch")
        if arch.get("name") == host_arch
        for d in arch.findall("domain")
    }
    offered.discard("")
    rank = {"kvm": 0, "qemu": 1}
    return tuple(sorted(offered, key=lambda t: (rank.get(t, 2), t)))


def cpu_features_from_capabilities(caps_xml: str) -> tuple[str, ...]:
    """The host CPU's features: ``<feature name=...>`` (QEMU/KVM: those beyond the named CPU
    model) and the children of ``<features>`` (the test driver's ``pae``, ``nonpae``)."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return ()
    cpu = root.find("host/cpu")
    if cpu is None:
        return ()
    named = [f.get("name", "") for f in cpu.findall("feature")]
    listed = [f.tag for f in cpu.findall("features/*")]
    return tuple(sorted({f for f in named + listed if f}))


def version_string(version: int) -> str:
    """libvirt's version number (``getLibVersion``: major * 1,000,000 + minor * 1000 +
    release) as ``major.minor.release``."""
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
