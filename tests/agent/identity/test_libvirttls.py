"""libvirt's TLS files in each layout (names, modes, atomic replacement, the CRL), the reload
through virt-admin (with small stand-in scripts), and the TLS migration URI."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity.libvirttls import (
    DEFAULT_ADMIN_URI,
    LAYOUTS,
    Layout,
    LibvirtTlsError,
    TlsFiles,
    admin_uri,
    file_names,
    migration_uri,
    reload_tls,
    write_tls_files,
)


@dataclass(frozen=True)
class Pems:
    ca: str
    cert: str
    key: str
    crl: str


def _self_signed(cn: str) -> tuple[str, str, str]:
    """An EC P-256 self-signed certificate, its key, and an empty CRL it signed (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name)
           .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return (cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem,
            crl.public_bytes(serialization.Encoding.PEM).decode())


@pytest.fixture(scope="module")
def pems() -> Pems:
    ca, _, crl = _self_signed("test libvirt CA")
    cert, key, _ = _self_signed("si-rack-01")
    return Pems(ca=ca, cert=cert, key=key, crl=crl)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def _written(pem: str) -> str:
    return pem.strip() + "\n"


# --- the files ---------------------------------------------------------------------------------


EXPECTED: dict[Layout, dict[str, str]] = {
    "system": {"ca": "CA/cacert.pem", "crl": "CA/cacrl.pem",
               "server_cert": "libvirt/servercert.pem",
               "server_key": "libvirt/private/serverkey.pem",
               "client_cert": "libvirt/clientcert.pem",
               "client_key": "libvirt/private/clientkey.pem"},
    "pkipath": {"ca": "cacert.pem", "crl": "cacrl.pem", "server_cert": "servercert.pem",
                "server_key": "serverkey.pem", "client_cert": "clientcert.pem",
                "client_key": "clientkey.pem"},
    "qemu": {"ca": "ca-cert.pem", "crl": "ca-crl.pem", "server_cert": "server-cert.pem",
             "server_key": "server-key.pem", "client_cert": "client-cert.pem",
             "client_key": "client-key.pem"},
}


def test_every_layout_has_its_readers_file_names() -> None:
    assert set(LAYOUTS) == set(EXPECTED)
    for layout in LAYOUTS:
        assert file_names(layout) == EXPECTED[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gets_its_files_with_keys_private_and_certificates_readable(
        tmp_path: Path, pems: Pems, layout: Layout) -> None:
    root = tmp_path / "pki"
    files = write_tls_files(root, ca_pem=pems.ca, cert_pem=pems.cert, key_pem=pems.key,
                            layout=layout)
    names = EXPECTED[layout]
    assert files == TlsFiles(
        layout=layout, ca=root / names["ca"], crl=None,
        server_cert=root / names["server_cert"], server_key=root / names["server_key"],
        client_cert=root / names["client_cert"], client_key=root / names["client_key"])
    # Everything but the CRL (none given), and no temporary file left behind.
    assert _tree(root) == {rel for key, rel in names.items() if key != "crl"}
    assert files.ca.read_text() == _written(pems.ca)
    for cert in (files.server_cert, files.client_cert):
        assert cert.read_text() == _written(pems.cert)
        assert _mode(cert) == 0o644
    for key in (files.server_key, files.client_key):
        assert key.read_text() == _written(pems.key)
        assert _mode(key) == 0o600
    assert _mode(files.ca) == 0o644
    assert _mode(files.server_key.parent) == 0o700
    if layout == "system":  # only the key directory is private
        assert _mode(files.ca.parent) == 0o755
        assert files.server_key.parent == root / "libvirt" / "private"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_key_group_makes_keys_and_their_directory_group_readable(
        tmp_path: Path, pems: Pems, layout: Layout) -> None:
    gid = os.getgid()
    files = write_tls_files(tmp_path / "pki", ca_pem=pems.ca, cert_pem=pems.cert,
                            key_pem=pems.key, layout=layout, key_group=gid)
    for key in (files.server_key, files.client_key):
        assert (_mode(key), key.stat().st_gid) == (0o640, gid)
    assert (_mode(files.client_key.parent), files.client_key.parent.stat().st_gid) == (
        0o750, gid)
    assert (_mode(files.client_cert), _mode(files.ca)) == (0o644, 0o644)


def test_a_crl_is_written_when_given_and_a_stale_one_removed_when_not(
        tmp_path: Path, pems: Pems) -> None:
    with_crl = write_tls_files(tmp_path, ca_pem=pems.ca, cert_pem=pems.cert, key_pem=pems.key,
                               crl_pem=pems.crl, layout="system")
    assert with_crl.crl == tmp_path / "CA" / "cacrl.pem"
    assert with_crl.crl.read_text() == _written(pems.crl)
    assert _mode(with_crl.crl) == 0o644

    without = write_tls_files(tmp_path, ca_pem=pems.ca, cert_pem=pems.cert, key_pem=pems.key,
                              layout="system")
    assert without.crl is None
    assert not (tmp_path / "CA" / "cacrl.pem").exists()
    assert (tmp_path / "CA" / "cacert.pem").exists()


def test_files_are_replaced_by_rename_so_a_reader_never_sees_half_a_file(
        tmp_path: Path, pems: Pems) -> None:
    write_tls_files(tmp_path, ca_pem=pems.ca, cert_pem=pems.cert, key_pem=pems.key)
    other_cert, other_key, _ = _self_signed("si-rack-01 renewed")
    with (tmp_path / "clientcert.pem").open() as reader:
        files = write_tls_files(tmp_path, ca_pem=pems.ca, cert_pem=other_cert,
                                key_pem=other_key)
        # The old file was renamed over, not rewritten in place: an open reader keeps it.
        assert reader.read() == _written(pems.cert)
    assert files.client_cert.read_text() == _written(other_cert)
    assert files.server_key.read_text() == _written(other_key)
    assert _tree(tmp_path) == {"cacert.pem", "servercert.pem", "serverkey.pem",
                               "clientcert.pem", "clientkey.pem"}


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, pems: Pems) -> None:
    (tmp_path / "clientcert.pem").mkdir()  # the rename into place fails
    with pytest.raises(IsADirectoryError):
        write_tls_files(tmp_path, ca_pem=pems.ca, cert_pem=pems.cert, key_pem=pems.key)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_certificate_chain_is_kept_whole(tmp_path: Path, pems: Pems) -> None:
    chain = pems.cert + pems.ca
    files = write_tls_files(tmp_path, ca_pem=pems.ca, cert_pem=chain, key_pem=pems.key)
    assert files.client_cert.read_text().count("-----BEGIN CERTIFICATE-----") == 2


@pytest.mark.parametrize(
    ("field", "swap", "reason"),
    [
        ("ca_pem", "not a pem at all", "CA certificate: no PEM CERTIFICATE block"),
        ("cert_pem", "key", "certificate: no PEM CERTIFICATE block"),
        ("key_pem", "cert", "private key: no PEM PRIVATE KEY or EC PRIVATE KEY"),
        ("crl_pem", "cert", "CRL: no PEM X509 CRL block"),
        ("cert_pem", "cert+key", "a certificate argument holds a private key"),
        ("ca_pem", "cert+key", "a certificate argument holds a private key"),
        ("key_pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n", "private key: no PEM"),  # no END
        ("cert_pem", b"-----BEGIN CERTIFICATE-----", "certificate: no PEM"),  # not text
    ],
)
def test_a_pem_of_the_wrong_kind_is_refused_and_nothing_written(
        tmp_path: Path, pems: Pems, field: str, swap: Any, reason: str) -> None:
    args: dict[str, Any] = {"ca_pem": pems.ca, "cert_pem": pems.cert, "key_pem": pems.key,
                            "crl_pem": pems.crl}
    args[field] = {"key": pems.key, "cert": pems.cert,
                   "cert+key": pems.cert + pems.key}.get(swap, swap)
    root = tmp_path / "pki"
    with pytest.raises(LibvirtTlsError, match=reason):
        write_tls_files(root, **args)
    assert not root.exists()


def test_an_unknown_layout_is_refused(tmp_path: Path, pems: Pems) -> None:
    layout: Any = "windows"
    with pytest.raises(LibvirtTlsError, match="layout 'windows' is not one of system"):
        write_tls_files(tmp_path / "pki", ca_pem=pems.ca, cert_pem=pems.cert,
                        key_pem=pems.key, layout=layout)
    assert not (tmp_path / "pki").exists()


# --- the reload --------------------------------------------------------------------------------


def _script(directory: Path, body: str) -> str:
    path = directory / "virt-admin"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_a_missing_virt_admin_is_reported_as_text() -> None:
    assert reload_tls(virt_admin="/nonexistent/virt-admin") == (
        "/nonexistent/virt-admin: not found")


def test_a_virt_admin_that_cannot_run_is_reported_as_text(tmp_path: Path) -> None:
    assert reload_tls(virt_admin=str(tmp_path)) == f"{tmp_path}: Permission denied"


def test_a_successful_reload_gives_none() -> None:
    assert reload_tls(virt_admin="true") is None


def test_a_failing_reload_without_output_says_the_exit_status() -> None:
    assert reload_tls(virt_admin="false", server="virtproxyd") == (
        "false server-update-tls virtproxyd: exit status 1")


def test_a_failing_reload_gives_virt_admins_message_on_one_line(tmp_path: Path) -> None:
    admin = _script(tmp_path, "echo 'error: failed to connect'  >&2\n"
                              "echo '   to the admin server' >&2\necho ignored\nexit 3")
    assert reload_tls(virt_admin=admin) == "error: failed to connect to the admin server"


def test_a_failing_reload_with_only_stdout_gives_that(tmp_path: Path) -> None:
    admin = _script(tmp_path, "echo 'no such server'\nexit 1")
    assert reload_tls(virt_admin=admin) == "no such server"


def test_the_reload_asks_the_named_server_at_the_admin_uri(tmp_path: Path) -> None:
    seen = tmp_path / "argv"
    admin = _script(tmp_path, f'printf "%s\\n" "$@" > {seen}')
    uri = admin_uri(Path("/run/libvirt dir/libvirt-admin-sock"))
    assert uri == "libvirtd:///system?socket=/run/libvirt%20dir/libvirt-admin-sock"
    assert reload_tls(uri, server="libvirtd", virt_admin=admin) is None
    assert seen.read_text().splitlines() == ["-q", "-c", uri, "server-update-tls", "libvirtd"]
    assert admin_uri() == DEFAULT_ADMIN_URI == "libvirtd:///system"


def test_a_reload_that_hangs_is_given_up(tmp_path: Path) -> None:
    admin = _script(tmp_path, "exec sleep 30")
    assert reload_tls(virt_admin=admin, timeout_s=0.2) == (
        f"{admin} server-update-tls libvirtd: no answer within 0.2 s")


# --- the migration URI -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kwargs", "uri"),
    [
        ("10.250.0.5", {}, "qemu+tls://10.250.0.5/system"),
        (" 10.250.0.5 ", {}, "qemu+tls://10.250.0.5/system"),
        ("fd00::5", {}, "qemu+tls://[fd00::5]/system"),
        ("[fd00:0:0::5]", {}, "qemu+tls://[fd00::5]/system"),
        ("node-5.fleet.example", {}, "qemu+tls://node-5.fleet.example/system"),
        ("Node-5.Fleet.Example", {}, "qemu+tls://node-5.fleet.example/system"),
        ("10.250.0.5", {"port": 16514}, "qemu+tls://10.250.0.5:16514/system"),
        ("fd00::5", {"port": 16514}, "qemu+tls://[fd00::5]:16514/system"),
        ("10.250.0.5", {"pki_dir": Path("/var/lib/virt8ra/pki")},
         "qemu+tls://10.250.0.5/system?pkipath=/var/lib/virt8ra/pki"),
        ("10.250.0.5", {"pki_dir": Path("/srv/my pki/a&b?c#d")},
         "qemu+tls://10.250.0.5/system?pkipath=/srv/my%20pki/a%26b%3Fc%23d"),
        ("10.250.0.5", {"transport": "tcp"}, "qemu+tcp://10.250.0.5/system"),
        ("fd00::5", {"transport": "tcp"}, "qemu+tcp://[fd00::5]/system"),
        # No pkipath over tcp: it has no certificates.
        ("10.250.0.5", {"transport": "tcp", "pki_dir": Path("/p")}, "qemu+tcp://10.250.0.5/system"),
    ],
)
def test_migration_uri(address: str, kwargs: dict[str, Any], uri: str) -> None:
    assert migration_uri(address, **kwargs) == uri


@pytest.mark.parametrize(
    "address",
    ["a/b", "", "   ", "x y", "1.2.3.4?x", "node#frag", "user@node", "node:16514",
     "[fd00::5]:16514", "fd00::5/64", "[1.2.3.4]", "[example.com]", "1.2.3.4]", "no\tde",
     "node%25", "-node", "n\u00f6de"],
)
def test_a_bad_address_is_refused(address: str) -> None:
    with pytest.raises(LibvirtTlsError, match="is not a host address"):
        migration_uri(address)


def test_a_scoped_ipv6_address_is_refused() -> None:
    with pytest.raises(LibvirtTlsError, match="scoped IPv6"):
        migration_uri("fe80::1%eth0")


@pytest.mark.parametrize("transport", ["ssh", "TLS", "", "tls+tcp"])
def test_a_bad_transport_is_refused(transport: str) -> None:
    reason = f"transport {transport!r} is not tls or tcp"
    with pytest.raises(LibvirtTlsError, match=re.escape(reason)):
        migration_uri("10.250.0.5", transport=transport)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(LibvirtTlsError, match=f"port {port} out of range"):
        migration_uri("10.250.0.5", port=port)
