"""A guest's libvirt domain XML, built from the typed :class:`~contract.wire.VmSpec`.

The XML is built with ElementTree: every value from the spec lands in an attribute or a text
node and is escaped there, never formatted into markup. The spec is validated first (names,
uuid, sizes, kernel command line), and :class:`DomainSpecError` names the field that is wrong.

The domain type is the host's (``kvm`` on production hosts, ``qemu`` where only software
emulation works, ``test`` for libvirt's test driver): ask the hypervisor's capabilities,
don't hard-code it. Paths (disk, kernel, initrd, serial log) are the agent's own files.

Errors::

    DomainSpecError (ValueError)   the spec (or an argument) cannot make a guest
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Final

from contract.wire import VmSpec

NAMESPACE: Final = "https://virt8ra.eu/xmlns/vm/1"
NAMESPACE_PREFIX: Final = "virt8ra"
NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DOMAIN_TYPES: Final = frozenset({"kvm", "qemu", "test"})
DISK_FORMATS: Final = frozenset({"qcow2", "raw"})
VCPUS_MIN: Final = 1
VCPUS_MAX: Final = 64
MEMORY_MIB_MIN: Final = 64
MEMORY_MIB_MAX: Final = 1024 * 1024  # 1 TiB
DISK_GIB_MAX: Final = 64 * 1024
CMDLINE_MAX: Final = 2047  # x86 COMMAND_LINE_SIZE, less the terminating NUL
CMDLINE_PATTERN: Final = re.compile(r"[\x20-\x7e]*")  # printable ASCII, no control characters
DEFAULT_CMDLINE: Final = "console=ttyS0"

ET.register_namespace(NAMESPACE_PREFIX, NAMESPACE)


class DomainSpecError(ValueError):
    """The spec cannot make a guest; ``field`` names the culprit (``name``, ``vcpus``, ...)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def validate_vm_name(name: str) -> str:
    """Return ``name`` if it can name a guest: a lower-case DNS label of 1..63 characters
    (``a-z``, ``0-9``, ``-``; not starting with ``-``), else raise :class:`DomainSpecError`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DomainSpecError(
            "name", f"{name!r} is not a VM name (lower-case DNS label: a-z, 0-9 and '-', "
            "1 to 63 characters, not starting with '-')")
    return name


def validate_uuid(value: str) -> str:
    """Return ``value`` if it is a UUID in canonical form (lower-case, hyphenated, as libvirt
    prints it), else raise :class:`DomainSpecError`."""
    try:
        canonical: str | None = str(uuidlib.UUID(value))
    except (ValueError, TypeError, AttributeError):
        canonical = None
    if canonical is None or canonical != value:
        raise DomainSpecError(
            "uuid", f"{value!r} is not a UUID in canonical form "
            "(xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, lower-case hex)")
    return value


def _validate_int(field: str, value: int, low: int, high: int, unit: str = "") -> None:
    if type(value) is not int or not low <= value <= high:
        raise DomainSpecError(field, f"{value!r} is outside {low}..{high}{unit}")


def validate_spec(spec: VmSpec) -> VmSpec:
    """Return ``spec`` if every field that goes into the domain XML is acceptable."""
    validate_uuid(spec.uuid)
    validate_vm_name(spec.name)
    _validate_int("vcpus", spec.vcpus, VCPUS_MIN, VCPUS_MAX)
    _validate_int("memory_mib", spec.memory_mib, MEMORY_MIB_MIN, MEMORY_MIB_MAX, " MiB")
    _validate_int("disk_gib", spec.disk_gib, 0, DISK_GIB_MAX, " GiB")
    if not isinstance(spec.cmdline, str) or not CMDLINE_PATTERN.fullmatch(spec.cmdline):
        raise DomainSpecError("cmdline", "only printable ASCII, no control characters")
    if len(spec.cmdline) > CMDLINE_MAX:
        raise DomainSpecError("cmdline", f"longer than {CMDLINE_MAX} characters")
    return spec


def _path(field: str, path: Path) -> str:
    if not path.is_absolute():
        raise DomainSpecError(field, f"{str(path)!r} is not an absolute path")
    text = str(path)
    if not CMDLINE_PATTERN.fullmatch(text):  # QEMU's option syntax and libvirt need plain text
        raise DomainSpecError(field, f"{text!r} has characters other than printable ASCII")
    return text


def _sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = str(text)
    return el


def domain_xml(
    spec: VmSpec,
    *,
    domain_type: str,
    disk: Path | None = None,
    disk_format: str = "qcow2",
    kernel: Path | None = None,
    initrd: Path | None = None,
    serial_log: Path | None = None,
) -> str:
    """The libvirt ``<domain>`` document for ``spec``.

    ``domain_type`` is the host's (see ``Hypervisor.capabilities_domain_type``). For ``test``
    (libvirt's test driver) the document has no devices: that driver runs nothing. For ``qemu``
    and ``kvm``: machine ``pc``, ACPI, no graphics and no NIC; ``disk`` becomes a virtio disk
    ``vda`` in ``disk_format`` (``qcow2`` or ``raw``); ``kernel`` (with ``initrd``) boots
    directly, with the spec's command line or ``console=ttyS0``; the first serial port writes
    to ``serial_log`` when given, else to a pty (``virsh console``). Power-off and crash stop
    the guest, a guest's reboot restarts it.
    """
    validate_spec(spec)
    if domain_type not in DOMAIN_TYPES:
        raise DomainSpecError(
            "domain_type", f"{domain_type!r} is not one of {', '.join(sorted(DOMAIN_TYPES))}")
    if disk_format not in DISK_FORMATS:
        raise DomainSpecError(
            "disk_format", f"{disk_format!r} is not one of {', '.join(sorted(DISK_FORMATS))}")
    if initrd is not None and kernel is None:
        raise DomainSpecError("initrd", "an initrd needs a kernel")

    dom = ET.Element("domain", type=domain_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    _sub(_sub(dom, "metadata"), f"{{{NAMESPACE}}}vm", name=spec.name)
    _sub(dom, "memory", spec.memory_mib, unit="MiB")
    _sub(dom, "currentMemory", spec.memory_mib, unit="MiB")
    _sub(dom, "vcpu", spec.vcpus, placement="static")
    os_el = _sub(dom, "os")
    if domain_type == "test":
        _sub(os_el, "type", "hvm")
    else:
        _sub(os_el, "type", "hvm", machine="pc")
        if kernel is not None:
            _sub(os_el, "kernel", _path("kernel", kernel))
            if initrd is not None:
                _sub(os_el, "initrd", _path("initrd", initrd))
            _sub(os_el, "cmdline", spec.cmdline or DEFAULT_CMDLINE)
        elif disk is not None:
            _sub(os_el, "boot", dev="hd")
        features = _sub(dom, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
        _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    if domain_type != "test":
        _devices(_sub(dom, "devices"), disk, disk_format, serial_log)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _devices(devices: ET.Element, disk: Path | None, disk_format: str,
             serial_log: Path | None) -> None:
    if disk is not None:
        el = _sub(devices, "disk", type="file", device="disk")
        _sub(el, "driver", name="qemu", type=disk_format)
        _sub(el, "source", file=_path("disk", disk))
        _sub(el, "target", dev="vda", bus="virtio")
    if serial_log is not None:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=_path("serial_log", serial_log))
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="file")
        _sub(console, "source", path=_path("serial_log", serial_log))
        _sub(console, "target", type="serial", port="0")
    else:
        _sub(_sub(devices, "serial", type="pty"), "target", port="0")
        _sub(_sub(devices, "console", type="pty"), "target", type="serial", port="0")
    _sub(devices, "memballoon", model="virtio")


def vm_name_from_metadata(xml: str) -> str | None:
    """The VM name virt8ra recorded in a domain's XML, or None if virt8ra does not manage it."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - from our own libvirtd, not the network
    except ET.ParseError:
        return None
    vm = root.find(f"metadata/{{{NAMESPACE}}}vm")
    return None if vm is None else vm.get("name")


def retarget(xml: str, paths: dict[str, str]) -> str:
    """A guest's (migratable) XML with each of its file paths that is a key of ``paths``
    replaced by that key's value, wherever it appears as an attribute value or an element's
    text (disk sources, kernel, initrd, serial and console logs): the document a destination
    host takes the guest with, its own files in place of the source's. Every new path must
    be absolute and plain printable ASCII."""
    for key, value in paths.items():
        _path("paths", Path(value))
        if not key:
            raise DomainSpecError("paths", "an empty path cannot be replaced")
    root = ET.fromstring(xml)  # noqa: S314 - from our own libvirtd, not the network
    for el in root.iter():
        for name, value in el.attrib.items():
            if value in paths:
                el.set(name, paths[value])
        if el.text is not None and el.text.strip() in paths:
            el.text = paths[el.text.strip()]
    return ET.tostring(root, encoding="unicode") + "\n"
