"""The pure pieces of VM moves: a guest's XML retargeted to the destination's files, the files
and migration settings the source reads from an order, the move settings the API takes, node
certificates fit for libvirt's TLS, and a disk's backing file."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.host.domainxml import (
    NAMESPACE,
    DomainSpecError,
    domain_xml,
    retarget,
    vm_name_from_metadata,
)
from agent.host.images import ImageError, backing_file
from agent.orders import migrate
from aggregator.errors import Refused
from aggregator.trust.pki import MAX_ALT_NAMES, CertificateAuthority, NodeAttributes, PkiError
from aggregator.workloads.moves import MoveSettings
from contract.wire import VmSpec

UUID = "6f1c1f0e-8a5b-4c1e-9a57-3b6a2d0f9c11"
DISK, KERNEL, INITRD, SERIAL = ("/var/lib/virt8ra/vms/web-1/disk.qcow2", "/var/lib/virt8ra/k",
                                "/var/lib/virt8ra/i", "/var/lib/virt8ra/vms/web-1/serial.log")


def spec(**changes: Any) -> VmSpec:
    fields: dict[str, Any] = {"uuid": UUID, "name": "web-1", "vcpus": 2, "memory_mib": 256}
    return VmSpec(**{**fields, **changes})


def full_xml(domain_type: str = "kvm") -> str:
    """A guest with every kind of file: disk, kernel, initrd, serial log."""
    return domain_xml(spec(), domain_type=domain_type, disk=Path(DISK), kernel=Path(KERNEL),
                      initrd=Path(INITRD), serial_log=Path(SERIAL))


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - our own output


def files_in(xml: str) -> dict[str, str | None]:
    dom = parse(xml)

    def attr(where: str, name: str) -> str | None:
        el = dom.find(where)
        return None if el is None else el.get(name)

    return {"disk": attr("devices/disk/source", "file"), "kernel": dom.findtext("os/kernel"),
            "initrd": dom.findtext("os/initrd"),
            "serial": attr("devices/serial/source", "path"),
            "console": attr("devices/console/source", "path")}


# --- retarget ----------------------------------------------------------------------------------


def test_retarget_puts_the_destinations_files_in_place_of_the_sources() -> None:
    new = {DISK: "/srv/disks/web-1.qcow2", KERNEL: "/srv/boot/vmlinuz",
           INITRD: "/srv/boot/initrd", SERIAL: "/srv/logs/web-1.log"}
    assert files_in(retarget(full_xml(), new)) == {
        "disk": "/srv/disks/web-1.qcow2", "kernel": "/srv/boot/vmlinuz",
        "initrd": "/srv/boot/initrd", "serial": "/srv/logs/web-1.log",
        "console": "/srv/logs/web-1.log"}


def test_retarget_leaves_paths_it_is_not_given_and_everything_else_alone() -> None:
    before = parse(full_xml())
    after = parse(retarget(full_xml(), {DISK: "/srv/disks/web-1.qcow2"}))
    assert files_in(ET.tostring(after, encoding="unicode")) == {
        "disk": "/srv/disks/web-1.qcow2", "kernel": KERNEL, "initrd": INITRD,
        "serial": SERIAL, "console": SERIAL}
    # Apart from the disk's source, the same elements with the same attributes and texts.
    pairs = list(zip(before.iter(), after.iter(), strict=True))
    changed = [(b.tag, b.attrib, a.attrib) for b, a in pairs
               if (b.tag, b.attrib, (b.text or "").strip()) != (a.tag, a.attrib,
                                                                 (a.text or "").strip())]
    assert changed == [("source", {"file": DISK}, {"file": "/srv/disks/web-1.qcow2"})]


def test_retarget_with_a_path_that_is_not_there_changes_nothing() -> None:
    assert files_in(retarget(full_xml(), {"/elsewhere/disk.qcow2": "/srv/d.qcow2"})) == \
        files_in(full_xml())


def test_retarget_keeps_the_virt8ra_metadata() -> None:
    out = retarget(full_xml(), {DISK: "/srv/disks/web-1.qcow2"})
    assert vm_name_from_metadata(out) == "web-1"
    assert parse(out).find(f"metadata/{{{NAMESPACE}}}vm") is not None
    assert f'xmlns:virt8ra="{NAMESPACE}"' in out


@pytest.mark.parametrize(
    ("paths", "reason"),
    [
        ({DISK: "disks/web-1.qcow2"}, "is not an absolute path"),
        ({DISK: ""}, "is not an absolute path"),
        ({DISK: "/srv/dïsk.qcow2"}, "has characters other than printable ASCII"),
        ({DISK: "/srv/disk\n.qcow2"}, "has characters other than printable ASCII"),
        ({"": "/srv/disk.qcow2"}, "an empty path cannot be replaced"),
    ],
)
def test_retarget_refuses_a_path_a_destination_cannot_use(paths: dict[str, str],
                                                         reason: str) -> None:
    with pytest.raises(DomainSpecError, match=reason) as caught:
        retarget(full_xml(), paths)
    assert caught.value.field == "paths"


# --- the move settings the API takes -----------------------------------------------------------


def test_move_settings_default_to_a_live_move_with_auto_converge() -> None:
    settings = MoveSettings.from_json({})
    assert settings == MoveSettings(mode="live", max_downtime_ms=300, bandwidth_mib_s=0,
                                    auto_converge=True, postcopy=False, timeout_s=300.0)
    assert type(settings.timeout_s) is float
    assert MoveSettings() == settings


def test_move_settings_as_given() -> None:
    settings = MoveSettings.from_json({"mode": "cold", "max_downtime_ms": 60_000,
                                       "bandwidth_mib_s": 1 << 20, "auto_converge": False,
                                       "postcopy": True, "timeout_s": 86_400})
    assert settings == MoveSettings("cold", 60_000, 1 << 20, False, True, 86_400.0)


def test_a_drain_defaults_to_auto_and_takes_any_of_its_modes() -> None:
    modes = ("live", "cold", "auto")
    assert MoveSettings.from_json({}, modes=modes).mode == "auto"
    assert [MoveSettings.from_json({"mode": m}, modes=modes).mode for m in modes] == list(modes)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (None, "body must be a JSON object"),
        ([], "body must be a JSON object"),
        ("live", "body must be a JSON object"),
        ({"mode": "teleport"}, "mode must be one of live, cold"),
        ({"mode": "auto"}, "mode must be one of live, cold"),
        ({"mode": None}, "mode must be one of live, cold"),
        ({"max_downtime_ms": True}, "max_downtime_ms must be an integer from 1 to 60000"),
        ({"max_downtime_ms": 0}, "max_downtime_ms must be an integer from 1 to 60000"),
        ({"max_downtime_ms": 60_001}, "max_downtime_ms must be an integer from 1 to 60000"),
        ({"max_downtime_ms": 500.0}, "max_downtime_ms must be an integer"),
        ({"max_downtime_ms": "500"}, "max_downtime_ms must be an integer"),
        ({"bandwidth_mib_s": -1}, "bandwidth_mib_s must be an integer from 0 to 1048576"),
        ({"bandwidth_mib_s": (1 << 20) + 1}, "bandwidth_mib_s must be an integer"),
        ({"bandwidth_mib_s": False}, "bandwidth_mib_s must be an integer"),
        ({"timeout_s": 0}, "timeout_s must be an integer from 1 to 86400"),
        ({"timeout_s": 86_401}, "timeout_s must be an integer from 1 to 86400"),
        ({"timeout_s": 30.5}, "timeout_s must be an integer"),
        ({"auto_converge": "true"}, "auto_converge must be true or false"),
        ({"auto_converge": 1}, "auto_converge must be true or false"),
        ({"postcopy": None}, "postcopy must be true or false"),
        ({"postcopy": "false"}, "postcopy must be true or false"),
    ],
)
def test_a_bad_move_setting_is_an_invalid_request(body: Any, reason: str) -> None:
    with pytest.raises(Refused, match=re.escape(reason)) as caught:
        MoveSettings.from_json(body)
    assert (caught.value.code, caught.value.status) == ("invalid_request", 400)


def test_move_params_leave_out_an_unlimited_bandwidth() -> None:
    assert MoveSettings().params() == {"max_downtime_ms": 300, "auto_converge": True,
                                       "postcopy": False, "timeout_s": 300.0}
    assert MoveSettings(bandwidth_mib_s=100, postcopy=True).params() == {
        "max_downtime_ms": 300, "bandwidth_mib_s": 100, "auto_converge": True,
        "postcopy": True, "timeout_s": 300.0}


def test_move_params_are_what_the_source_takes() -> None:
    settings = MoveSettings(max_downtime_ms=800, bandwidth_mib_s=50, auto_converge=False,
                            postcopy=True, timeout_s=120.0)
    params = settings.params()
    assert migrate.migration_limits(*(params.get(k) for k in (
        "max_downtime_ms", "bandwidth_mib_s", "auto_converge", "postcopy", "timeout_s"))) == {
        "max_downtime_ms": 800, "bandwidth_mib_s": 50, "auto_converge": False,
        "postcopy": True, "timeout_s": 120.0}


# --- node certificates -------------------------------------------------------------------------


ATTRS = NodeAttributes("si-rack-07", "SI", "arnes", "ljubljana-dc-1", "rack-server")


def node_csr(*names: x509.GeneralName, cn: str = "si-rack-07") -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                        critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM).decode()


def signed(pki: CertificateAuthority, csr: str) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(pki.sign_node_csr(csr, ATTRS, 1).certificate_pem.encode())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.cert_pem().encode()))
    return cert


def test_a_node_certificate_serves_and_opens_tls_connections(pki: CertificateAuthority) -> None:
    cert = signed(pki, node_csr())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(x509.ExtensionNotFound):  # it asked for no names: it gets none
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_a_node_certificate_carries_the_addresses_its_csr_asks_for(
        pki: CertificateAuthority) -> None:
    cert = signed(pki, node_csr(x509.IPAddress(ipaddress.ip_address("10.250.0.7")),
                                x509.DNSName("node-7.fleet.example"),
                                x509.IPAddress(ipaddress.ip_address("fd00::7"))))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.IPv4Address("10.250.0.7"), ipaddress.IPv6Address("fd00::7")]
    assert sans.get_values_for_type(x509.DNSName) == ["node-7.fleet.example"]
    # The subject is still the token's, whatever the names.
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "si-rack-07"


def test_a_node_certificate_takes_at_most_max_alt_names(pki: CertificateAuthority) -> None:
    names = [x509.IPAddress(ipaddress.ip_address(f"10.250.0.{i}"))
             for i in range(1, MAX_ALT_NAMES + 2)]
    cert = signed(pki, node_csr(*names[:MAX_ALT_NAMES]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(sans) == MAX_ALT_NAMES == 4
    with pytest.raises(PkiError, match=f"asks for {MAX_ALT_NAMES + 1} subjectAltNames; at most"
                                       f" {MAX_ALT_NAMES}"):
        pki.sign_node_csr(node_csr(*names), ATTRS, 1)


@pytest.mark.parametrize(
    "name",
    [
        x509.UniformResourceIdentifier("spiffe://fleet.example/node/si-rack-07"),
        x509.RFC822Name("ops@fleet.example"),
        x509.IPAddress(ipaddress.ip_network("10.250.0.0/24")),
        x509.DNSName("*.fleet.example"),
        x509.DNSName("under_score.fleet.example"),
        x509.DNSName("-lead.fleet.example"),
        x509.DNSName("trail-.fleet.example"),
        x509.DNSName("two..dots.example"),
        x509.DNSName("a" * 64 + ".example"),
    ],
    ids=["uri", "email", "ip-network", "wildcard", "underscore", "leading-hyphen",
         "trailing-hyphen", "empty-label", "long-label"],
)
def test_a_csr_asking_for_another_name_is_refused(pki: CertificateAuthority,
                                                  name: x509.GeneralName) -> None:
    csr = node_csr(x509.IPAddress(ipaddress.ip_address("10.250.0.7")), name)
    with pytest.raises(PkiError, match="csr asks for a subjectAltName"):
        pki.sign_node_csr(csr, ATTRS, 1)


# --- a disk's backing file ---------------------------------------------------------------------


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", *args], check=True, capture_output=True)


async def test_a_raw_disk_has_no_backing_file(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    qemu_img("-f", "raw", str(raw), "1M")
    assert await backing_file(raw) is None


async def test_a_qcow2_disk_without_backing_has_none(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    qemu_img("-f", "qcow2", str(disk), "1M")
    assert await backing_file(disk) is None


async def test_a_qcow2_overlay_names_its_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img("-f", "raw", str(base), "1M")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay), "1M")
    assert await backing_file(overlay) == str(base)
    # A relative name is given as the header holds it, not resolved.
    relative = tmp_path / "relative.qcow2"
    qemu_img("-f", "qcow2", "-b", "base.raw", "-F", "raw", str(relative), "1M")
    assert await backing_file(relative) == "base.raw"


async def test_a_short_file_has_no_backing_file(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"QFI\xfb\x00\x00\x00\x03")
    assert await backing_file(short) is None


async def test_a_missing_disk_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="No such file or directory"):
        await backing_file(tmp_path / "gone.qcow2")
