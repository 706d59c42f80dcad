"""libvirt's TLS files from the fleet CA's PEM, their reload, and the TLS migration URI.

Peer-to-peer migration over ``qemu+tls://``: the source ``libvirtd`` opens a client TLS
connection to the destination's ``libvirtd`` (port 16514). One node certificate serves both
ends when it carries both extended key usages (``serverAuth`` and ``clientAuth``) and the
node's migration address as a subjectAltName (``iPAddress``, or ``dNSName`` when the URI
names the peer by host name): the client checks the server's certificate against the host
part of the URI, and the common name is not consulted for an IP address.

Three layouts, one per reader (:data:`LAYOUTS`):

``system``
    libvirt's compiled-in locations under a root (``/etc/pki`` on a host):
    ``CA/cacert.pem``, ``CA/cacrl.pem``, ``libvirt/servercert.pem``,
    ``libvirt/private/serverkey.pem``, ``libvirt/clientcert.pem``,
    ``libvirt/private/clientkey.pem``. The daemon's server side must use these (no
    ``key_file``/``cert_file``/``ca_file``/``crl_file`` in ``libvirtd.conf``): libvirt 9.0's
    ``server-update-tls`` reloads from these paths only, whatever ``libvirtd.conf`` says.
    A peer-to-peer migration URI without ``pkipath`` makes the source daemon read its client
    files here too.
``pkipath``
    One flat directory, as the ``pkipath`` parameter of a ``qemu+tls://`` URI reads it (the
    source daemon honours it in a peer-to-peer migration): ``cacert.pem``, ``cacrl.pem``,
    ``clientcert.pem``, ``clientkey.pem`` (and ``servercert.pem``, ``serverkey.pem``).
``qemu``
    QEMU's ``tls-creds-x509`` directory, for migration data over TLS (``VIR_MIGRATE_TLS``;
    ``migrate_tls_x509_cert_dir`` in ``qemu.conf``, default ``/etc/pki/qemu``):
    ``ca-cert.pem``, ``ca-crl.pem``, ``server-cert.pem``, ``server-key.pem``,
    ``client-cert.pem``, ``client-key.pem``. QEMU reads them as its own user: pass
    ``key_group`` (e.g. the gid of ``libvirt-qemu``) when QEMU does not run as root.

Each file is written to a temporary name and renamed into place; private keys get mode 0600
(0640 with ``key_group``), the rest 0644. Without a CRL, a CRL left from before is removed
(libvirt and QEMU skip a missing CRL; a stale one from another CA would reject every peer).

The daemon's server side reads its files at start and on :func:`reload_tls` only; its client
side (the source of a migration) reads them afresh for each connection. So ``libvirtd`` can
start with a placeholder certificate and take the real one later.

Standard library only: the agent daemon does not import ``cryptography``.

Errors::

    LibvirtTlsError (ValueError)   a PEM argument is not what it claims to be, or a layout or
                                   address is unknown
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

Layout = Literal["system", "pkipath", "qemu"]
LAYOUTS: Final[tuple[Layout, ...]] = ("system", "pkipath", "qemu")
TLS_PORT: Final = 16514
DEFAULT_SERVER: Final = "libvirtd"
DEFAULT_ADMIN_URI: Final = "libvirtd:///system"
RELOAD_TIMEOUT_S: Final = 30.0

_CERT_MODE: Final = 0o644
_KEY_MODE: Final = 0o600
_GROUP_KEY_MODE: Final = 0o640
_DIR_MODE: Final = 0o755
_PRIVATE_DIR_MODE: Final = 0o700
_GROUP_PRIVATE_DIR_MODE: Final = 0o750


class LibvirtTlsError(ValueError):
    """An argument cannot make libvirt's TLS files or URI; the message says why."""


@dataclass(frozen=True, slots=True)
class _Names:
    ca: str
    crl: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


_NAMES: Final[dict[Layout, _Names]] = {
    "system": _Names(
        ca="CA/cacert.pem", crl="CA/cacrl.pem",
        server_cert="libvirt/servercert.pem", server_key="libvirt/private/serverkey.pem",
        client_cert="libvirt/clientcert.pem", client_key="libvirt/private/clientkey.pem"),
    "pkipath": _Names(
        ca="cacert.pem", crl="cacrl.pem",
        server_cert="servercert.pem", server_key="serverkey.pem",
        client_cert="clientcert.pem", client_key="clientkey.pem"),
    "qemu": _Names(
        ca="ca-cert.pem", crl="ca-crl.pem",
        server_cert="server-cert.pem", server_key="server-key.pem",
        client_cert="client-cert.pem", client_key="client-key.pem"),
}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where :func:`write_tls_files` put each file (``crl`` is None when none was given)."""

    layout: Layout
    ca: Path
    crl: Path | None
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def file_names(layout: Layout) -> dict[str, str]:
    """The relative file names of ``layout``: keys ``ca``, ``crl``, ``server_cert``,
    ``server_key``, ``client_cert``, ``client_key``."""
    names = _names(layout)
    return {"ca": names.ca, "crl": names.crl, "server_cert": names.server_cert,
            "server_key": names.server_key, "client_cert": names.client_cert,
            "client_key": names.client_key}


def write_tls_files(
    directory: Path,
    *,
    ca_pem: str,
    cert_pem: str,
    key_pem: str,
    crl_pem: str | None = None,
    layout: Layout = "pkipath",
    key_group: int | None = None,
) -> TlsFiles:
    """Write the CA certificate, the node's certificate (as server and client certificate)
    and key, and the CRL into ``directory`` in ``layout`` (see the module's docstring).

    ``cert_pem`` may hold the node certificate followed by intermediates. Each file is
    replaced atomically; keys are 0600 (0640 and group ``key_group`` if given; the caller
    must be root to change the group). Directories are created as needed (a key's directory
    0700, or 0750 with ``key_group``). Raises :class:`LibvirtTlsError` for a PEM argument
    without the block it should hold (nothing is written then), OSError for the file system.
    """
    names = _names(layout)
    _check_pem("CA certificate", ca_pem, ("CERTIFICATE",))
    _check_pem("certificate", cert_pem, ("CERTIFICATE",))
    _check_pem("private key", key_pem, ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"))
    if crl_pem is not None:
        _check_pem("CRL", crl_pem, ("X509 CRL",))
    if "PRIVATE KEY" in cert_pem or "PRIVATE KEY" in ca_pem:
        raise LibvirtTlsError("a certificate argument holds a private key")

    key_mode = _KEY_MODE if key_group is None else _GROUP_KEY_MODE
    paths = {name: directory / rel for name, rel in file_names(layout).items()}
    for name in ("server_key", "client_key"):
        _make_dir(paths[name].parent, private=True, key_group=key_group)
    for name in ("ca", "crl", "server_cert", "client_cert"):
        _make_dir(paths[name].parent, private=False, key_group=None)

    # The CA (and CRL) first: a reader that finds the new certificate finds its issuer.
    _write(paths["ca"], _normalized(ca_pem), _CERT_MODE, None)
    if crl_pem is not None:
        _write(paths["crl"], _normalized(crl_pem), _CERT_MODE, None)
    else:
        paths["crl"].unlink(missing_ok=True)
    for cert, key in (("server_cert", "server_key"), ("client_cert", "client_key")):
        _write(paths[key], _normalized(key_pem), key_mode, key_group)
        _write(paths[cert], _normalized(cert_pem), _CERT_MODE, None)
    return TlsFiles(
        layout=layout, ca=directory / names.ca,
        crl=directory / names.crl if crl_pem is not None else None,
        server_cert=directory / names.server_cert, server_key=directory / names.server_key,
        client_cert=directory / names.client_cert, client_key=directory / names.client_key)


def admin_uri(socket: Path | None = None) -> str:
    """virt-admin's URI for the system ``libvirtd``; with ``socket``, its admin socket there
    (``<run dir>/libvirt-admin-sock``)."""
    if socket is None:
        return DEFAULT_ADMIN_URI
    return f"{DEFAULT_ADMIN_URI}?socket={urllib.parse.quote(str(socket), safe='/')}"


def reload_tls(
    uri: str = DEFAULT_ADMIN_URI,
    *,
    server: str = DEFAULT_SERVER,
    virt_admin: str = "virt-admin",
    timeout_s: float = RELOAD_TIMEOUT_S,
) -> str | None:
    """Make the running daemon at admin ``uri`` (see :func:`admin_uri`) reload its server-side
    TLS files (``virt-admin server-update-tls``). None when it did, else the reason as text
    (virt-admin's message, a timeout, a missing virt-admin).

    libvirt 9.0 reloads from the ``system`` layout under ``/etc/pki`` (in the daemon's mount
    namespace) even when ``libvirtd.conf`` names other files. A failed reload leaves the
    daemon on the files it had before.
    """
    argv = [virt_admin, "-q", "-c", uri, "server-update-tls", server]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        return f"{virt_admin}: not found"
    except OSError as exc:  # not executable, a directory
        return f"{virt_admin}: {exc.strerror}"
    except subprocess.TimeoutExpired:
        return f"{virt_admin} server-update-tls {server}: no answer within {timeout_s:g} s"
    if done.returncode == 0:
        return None
    text = " ".join(line.strip() for line in (done.stderr or done.stdout).splitlines()
                    if line.strip())
    return text or f"{virt_admin} server-update-tls {server}: exit status {done.returncode}"


HOST_NAME: Final = re.compile(r"(?=.{1,253}$)(?i:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                              r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*)")


def migration_uri(address: str, pki_dir: Path | None = None, *, port: int | None = None,
                  transport: str = "tls") -> str:
    """``qemu+tls://<address>/system``, for a peer-to-peer migration to the node at
    ``address`` (an IP address or host name: the one its certificate names as a
    subjectAltName). With ``pki_dir``, the source daemon reads its CA and client certificate
    from that directory (``pkipath`` layout) instead of ``/etc/pki``. ``transport="tcp"``:
    ``qemu+tcp://`` (no authentication: a closed lab network only)."""
    if transport not in ("tls", "tcp"):
        raise LibvirtTlsError(f"transport {transport!r} is not tls or tcp")
    host = address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # a bracketed IPv6 address
        bracketed = True
    else:
        bracketed = False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise LibvirtTlsError(f"{address!r}: a scoped IPv6 address cannot be a peer's address")
    if ip is not None and not (bracketed and ip.version == 4):
        host = f"[{ip}]" if ip.version == 6 else str(ip)
    elif bracketed or not HOST_NAME.fullmatch(host):
        raise LibvirtTlsError(f"{address!r} is not a host address (an IP address or a DNS"
                              " name)")
    else:
        host = host.lower()
    if port is not None:
        if not 0 < port < 65536:
            raise LibvirtTlsError(f"port {port} out of range")
        host = f"{host}:{port}"
    uri = f"qemu+{transport}://{host}/system"
    if pki_dir is not None and transport == "tls":
        uri += "?pkipath=" + urllib.parse.quote(str(pki_dir), safe="/")
    return uri


def _names(layout: str) -> _Names:
    try:
        return _NAMES[layout]  # type: ignore[index]
    except KeyError:
        raise LibvirtTlsError(
            f"layout {layout!r} is not one of {', '.join(LAYOUTS)}") from None


def _check_pem(what: str, text: str, labels: tuple[str, ...]) -> None:
    if not isinstance(text, str) or not any(
            f"-----BEGIN {label}-----" in text and f"-----END {label}-----" in text
            for label in labels):
        raise LibvirtTlsError(f"{what}: no PEM {' or '.join(labels)} block")


def _normalized(pem: str) -> bytes:
    return (pem.strip() + "\n").encode("ascii")


def _make_dir(path: Path, *, private: bool, key_group: int | None) -> None:
    if path.is_dir():
        return
    mode = _DIR_MODE
    if private:
        mode = _PRIVATE_DIR_MODE if key_group is None else _GROUP_PRIVATE_DIR_MODE
    path.mkdir(parents=True, mode=mode)
    os.chmod(path, mode)
    if private and key_group is not None:
        os.chown(path, -1, key_group)


def _write(path: Path, data: bytes, mode: int, group: int | None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if group is not None:
            os.chown(tmp, -1, group)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
