"""A libvirt test-driver host made from a hardware profile: a node for demos and tests."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from agent.profiles import Profile


def _sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = str(text)
    return el


def host_xml(profile: Profile, node_id: str) -> str:
    """The test driver's ``<node>`` document: the profile's CPUs and memory and its guests."""
    sim = profile.simulation
    node = ET.Element("node")
    cpu = _sub(node, "cpu")
    _sub(cpu, "mhz", sim.mhz)
    _sub(cpu, "model", sim.cpu_model)
    _sub(cpu, "active", sim.sockets * sim.cores * sim.threads)
    _sub(cpu, "nodes", 1)
    _sub(cpu, "sockets", sim.sockets)
    _sub(cpu, "cores", sim.cores)
    _sub(cpu, "threads", sim.threads)
    _sub(node, "memory", sim.memory_mib * 1024)
    for i in range(sim.guests):
        name = f"{node_id}-guest-{i + 1}"
        dom = _sub(node, "domain", type="test")
        _sub(dom, "name", name)
        _sub(dom, "uuid", str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.virt8ra")))
        _sub(dom, "memory", sim.guest_memory_mib * 1024)
        _sub(dom, "currentMemory", sim.guest_memory_mib * 1024)
        _sub(dom, "vcpu", sim.guest_vcpus)
        os_el = _sub(dom, "os")
        _sub(os_el, "type", "hvm")
    ET.indent(node)
    return ET.tostring(node, encoding="unicode") + "\n"


def write_host(profile: Profile, node_id: str, path: Path) -> str:
    """Write the host description to ``path`` and return its libvirt URI."""
    path.write_text(host_xml(profile, node_id))
    return "test://" + str(path.resolve())
