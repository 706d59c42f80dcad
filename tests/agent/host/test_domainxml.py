"""Domain XML from the typed spec; guests managed through the hypervisor module: on libvirt's
test driver, and one real QEMU guest (the tiny busybox guest) on the system libvirtd."""

from __future__ import annotations

import asyncio
import concurrent.futures
import xml.etree.ElementTree as ET
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.host import simhost
from agent.host.domainxml import (
    CMDLINE_MAX,
    MEMORY_MIB_MAX,
    NAME_PATTERN,
    NAMESPACE,
    DomainSpecError,
    domain_xml,
    validate_uuid,
    validate_vm_name,
    vm_name_from_metadata,
)
from agent.host.hypervisor import Hypervisor, HypervisorError
from contract.profiles import Profile
from contract.wire import VmSpec

T = TypeVar("T")
UUID = "6f1c1f0e-8a5b-4c1e-9a57-3b6a2d0f9c11"


def spec(**changes: Any) -> VmSpec:
    fields: dict[str, Any] = {"uuid": UUID, "name": "web-1", "vcpus": 2, "memory_mib": 256}
    return VmSpec(**{**fields, **changes})


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - our own output


# --- the XML ----------------------------------------------------------------------------------


def test_qemu_guest_with_disk_kernel_and_serial_log() -> None:
    xml = domain_xml(spec(cmdline="console=ttyS0 quiet"), domain_type="qemu",
                     disk=Path("/var/lib/virt8ra/web-1.qcow2"), kernel=Path("/boot/k"),
                     initrd=Path("/boot/i"), serial_log=Path("/var/log/web-1.log"))
    dom = parse(xml)
    assert dom.get("type") == "qemu"
    assert (dom.findtext("name"), dom.findtext("uuid")) == ("web-1", UUID)
    assert dom.find("memory").attrib == {"unit": "MiB"}
    assert (dom.findtext("memory"), dom.findtext("currentMemory"), dom.findtext("vcpu")) == (
        "256", "256", "2")
    assert dom.find("os/type").attrib == {"machine": "pc"}
    assert (dom.findtext("os/kernel"), dom.findtext("os/initrd"), dom.findtext("os/cmdline")) == (
        "/boot/k", "/boot/i", "console=ttyS0 quiet")
    assert dom.find("os/boot") is None  # the kernel boots, not the disk
    assert [dom.findtext(t) for t in ("on_poweroff", "on_reboot", "on_crash")] == [
        "destroy", "restart", "destroy"]
    assert dom.find("features/acpi") is not None
    disk = dom.find("devices/disk")
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2"}
    assert disk.find("source").get("file") == "/var/lib/virt8ra/web-1.qcow2"
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    serial = dom.find("devices/serial")
    assert serial.get("type") == "file"
    assert serial.find("source").get("path") == "/var/log/web-1.log"
    assert dom.find("devices/graphics") is None
    assert dom.find("devices/interface") is None  # no networks on these hosts yet
    assert dom.find(f"metadata/{{{NAMESPACE}}}vm").attrib == {"name": "web-1"}
    assert vm_name_from_metadata(xml) == "web-1"


def test_defaults_raw_disk_boot_pty_console() -> None:
    dom = parse(domain_xml(spec(), domain_type="kvm", disk=Path("/d.img"), disk_format="raw"))
    assert dom.get("type") == "kvm"
    assert dom.find("os/boot").get("dev") == "hd"
    assert dom.find("devices/disk/driver").get("type") == "raw"
    assert dom.find("devices/serial").get("type") == "pty"
    assert dom.find("devices/console").get("type") == "pty"
    kernel_only = parse(domain_xml(spec(), domain_type="qemu", kernel=Path("/k")))
    assert kernel_only.findtext("os/cmdline") == "console=ttyS0"
    assert kernel_only.find("os/initrd") is None


def test_test_driver_guest_is_minimal() -> None:
    dom = parse(domain_xml(spec(), domain_type="test", disk=Path("/ignored")))
    assert dom.get("type") == "test"
    assert dom.find("devices") is None
    assert dom.find("os/type").attrib == {}
    assert vm_name_from_metadata(ET.tostring(dom, encoding="unicode")) == "web-1"


def test_markup_in_the_command_line_stays_text() -> None:
    cmdline = """console=ttyS0 x="</cmdline><kernel>/etc/shadow</kernel>" y='&amp;'"""
    dom = parse(domain_xml(spec(cmdline=cmdline), domain_type="qemu", kernel=Path("/k")))
    assert dom.findtext("os/cmdline") == cmdline
    assert [k.text for k in dom.iter("kernel")] == ["/k"]


@pytest.mark.parametrize("name", [
    "", "Web", "-web", "web_1", "web 1", "web.1", "a" * 64, "web\n", "wéb", "web/../x",
    "x'><devices/><name>y", "a]]>", "web\x00", "<name>",
])
def test_names_that_are_not_dns_labels_are_refused(name: str) -> None:
    with pytest.raises(DomainSpecError) as info:
        domain_xml(spec(name=name), domain_type="test")
    assert info.value.field == "name"
    assert "DNS label" in str(info.value)


@pytest.mark.parametrize("name", ["a", "0", "web-1", "a" * 63, "a-"])
def test_dns_labels_are_names(name: str) -> None:
    assert validate_vm_name(name) == name


@pytest.mark.parametrize("value", [
    "", "not-a-uuid", UUID.upper(), UUID.replace("-", ""), "{" + UUID + "}",
    UUID + "\n", f"urn:uuid:{UUID}",
])
def test_uuids_must_be_canonical(value: str) -> None:
    with pytest.raises(DomainSpecError) as info:
        validate_uuid(value)
    assert info.value.field == "uuid"


@pytest.mark.parametrize(("changes", "field"), [
    ({"vcpus": 0}, "vcpus"), ({"vcpus": 65}, "vcpus"), ({"vcpus": True}, "vcpus"),
    ({"memory_mib": 63}, "memory_mib"), ({"memory_mib": MEMORY_MIB_MAX + 1}, "memory_mib"),
    ({"disk_gib": -1}, "disk_gib"),
    ({"cmdline": "console=ttyS0\ninit=/bin/sh"}, "cmdline"),
    ({"cmdline": "x" * (CMDLINE_MAX + 1)}, "cmdline"),
])
def test_out_of_range_specs_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(DomainSpecError) as info:
        domain_xml(spec(**changes), domain_type="qemu")
    assert info.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"domain_type": "xen"}, "domain_type"),
    ({"domain_type": "qemu", "disk": Path("/d"), "disk_format": "vmdk"}, "disk_format"),
    ({"domain_type": "qemu", "disk": Path("relative.qcow2")}, "disk"),
    ({"domain_type": "qemu", "kernel": Path("/k"), "serial_log": Path("/l\n")}, "serial_log"),
    ({"domain_type": "qemu", "initrd": Path("/i")}, "initrd"),
])
def test_bad_arguments_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(DomainSpecError) as info:
        domain_xml(spec(), **kwargs)
    assert info.value.field == field


# --- property: every valid spec makes a guest libvirt's test driver defines as asked -----------

specs = st.builds(
    VmSpec,
    uuid=st.uuids().map(str),
    name=st.from_regex(NAME_PATTERN, fullmatch=True),
    vcpus=st.integers(1, 64),
    memory_mib=st.integers(64, MEMORY_MIB_MAX),
    cmdline=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
)


def run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on its own loop in a worker thread (hypothesis tests are synchronous)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def define_and_read_back(uri: str, xml: str) -> str:
    hv = await Hypervisor.open(uri, events=False)
    try:
        vm_uuid = await hv.define(xml)
        return await hv.domain_xml(vm_uuid)
    finally:
        hv.close()


@settings(max_examples=60, deadline=None)
@given(vm=specs)
def test_valid_specs_define_as_specified(vm: VmSpec, root_dir: Path,
                                         profiles: dict[str, Profile]) -> None:
    uri = simhost.write_host(profiles["tower-5g"], "n1", root_dir / "domainxml-host.xml")
    xml = domain_xml(vm, domain_type="test")
    dom = parse(run_in_thread(define_and_read_back(uri, xml)))
    assert (dom.findtext("name"), dom.findtext("uuid")) == (vm.name, vm.uuid)
    assert dom.findtext("vcpu") == str(vm.vcpus)
    assert dom.find("memory").get("unit") == "KiB"
    assert dom.findtext("memory") == str(vm.memory_mib * 1024)
    assert vm_name_from_metadata(ET.tostring(dom, encoding="unicode")) == vm.name
    qemu = parse(domain_xml(vm, domain_type="qemu", kernel=Path("/k")))
    assert qemu.findtext("os/cmdline") == (vm.cmdline or "console=ttyS0")


# --- guests through the hypervisor module, on the test driver ---------------------------------


async def test_guest_lifecycle_on_the_test_driver(profiles: dict[str, Profile],
                                                  tmp_path: Path) -> None:
    hv = await Hypervisor.open(simhost.write_host(profiles["tower-5g"], "n1",
                                                  tmp_path / "host.xml"))
    try:
        domain_type = await hv.capabilities_domain_type()
        assert domain_type == "test"
        before = await hv.guest_names()
        vm_uuid = await hv.define(domain_xml(spec(), domain_type=domain_type))
        assert vm_uuid == UUID
        assert (await hv.guest_names())[UUID] == "web-1"
        assert set(await hv.guest_names()) - set(before) == {UUID}
        assert await hv.state(UUID) == "shut off"
        assert vm_name_from_metadata(await hv.domain_xml(UUID)) == "web-1"
        await hv.start(UUID)
        assert await hv.state(UUID) == "running"
        with pytest.raises(HypervisorError, match="already running"):
            await hv.start(UUID)
        await hv.reboot(UUID)
        assert await hv.state(UUID) == "running"
        assert await hv.shutdown(UUID, timeout_s=5) is True  # the test driver obeys at once
        assert await hv.state(UUID) == "shut off"
        assert await hv.shutdown(UUID, timeout_s=5) is True  # already off: nothing to do
        await hv.start(UUID)
        assert await hv.undefine(UUID) is True  # running: stopped first
        assert await hv.state(UUID) is None
        assert await hv.undefine(UUID) is False
        assert UUID not in await hv.guest_names()
        with pytest.raises(HypervisorError) as info:
            await hv.domain_xml(UUID)
        assert info.value.code > 0
        with pytest.raises(HypervisorError):
            await hv.define("<domain type='test'><name>x</name></domain>")  # no memory
    finally:
        hv.close()
