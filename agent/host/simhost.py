"""A libvirt test-driver host made from a hardware profile: a node for demos and tests.

Besides CPUs, memory and guests, the host gets the profile's NICs as libvirt host interfaces
(``eth0``, ``eth1``, ...) and its disks as block volumes of one storage pool, so the hardware
check reads them back through libvirt like any other host. (The test driver fixes every
pool's capacity at 100 GiB, so disks are volumes, whose capacity it keeps.) It cannot express
CPU flags: those the check takes from the profile's ``[simulation] cpu_flags`` and says so.
"""

from __future__ import annotations

import hashlib
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from contract.profiles import Profile


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
    mac_base = hashlib.sha256(node_id.encode()).digest()[:3]
    for i in range(sim.nics):
        iface = _sub(node, "interface", type="ethernet", name=f"eth{i}")
        _sub(iface, "start", mode="onboot")
        mac = bytes([0x52, 0x54, 0x00]) + mac_base[:2] + bytes([i])
        _sub(iface, "mac", address=":".join(f"{b:02x}" for b in mac))
    if sim.disks_gib:
        pool = _sub(node, "pool", type="dir")
        _sub(pool, "name", "local-disks")
        _sub(pool, "uuid", str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node_id}.disks.virt8ra")))
        _sub(_sub(pool, "target"), "path", "/dev/virt8ra-sim")
        for i, gib in enumerate(sim.disks_gib):
            vol = _sub(pool, "volume", type="block")
            _sub(vol, "name", f"disk{i}")
            _sub(vol, "capacity", gib, unit="GiB")
            _sub(vol, "allocation", 0)
            _sub(_sub(vol, "target"), "path", f"/dev/virt8ra-sim/disk{i}")
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


def host_uri(path: Path) -> str:
    """The test driver's URI for the host description at ``path`` (quoted: libvirt refuses a
    URI with spaces or brackets in the path, and unquotes it)."""
    return "test://" + urllib.parse.quote(str(path.resolve()))


def write_host(profile: Profile, node_id: str, path: Path) -> str:
    """Write the host description to ``path`` and return its libvirt URI."""
    path.write_text(host_xml(profile, node_id))
    return host_uri(path)
