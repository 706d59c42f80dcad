"""The fleet's certificate authority: the only module of the aggregator that imports cryptography.

Makes the CA, the broker's server certificate, the aggregator's client certificate, signs node
CSRs with the placement attributes taken from the enrollment token (never from the node), and
writes the CRL. Keys are EC P-256; files are PEM.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Our own attribute for the hardware profile (the others are standard name attributes).
PROFILE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57264.8.1")


class PkiError(Exception):
    """A CSR or certificate that cannot be accepted; the message says why."""


@dataclass(frozen=True, slots=True)
class NodeAttributes:
    node_id: str
    country: str
    provider: str
    site: str
    profile: str


@dataclass(frozen=True, slots=True)
class Issued:
    certificate_pem: str
    serial: int
    not_after: float
    names: tuple[str, ...] = ()  # its subjectAltNames (a node's migration address)


@dataclass(frozen=True, slots=True)
class Ephemeral:
    """A certificate and key held only in memory (PEM), for one short task."""

    certificate_pem: str
    key_pem: str
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """``sha256:<hex>`` of a public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def make_order_key(key_path: Path, public_path: Path) -> None:
    """The aggregator's Ed25519 order-signing key; its public half goes to every node."""
    key = ed25519.Ed25519PrivateKey.generate()
    _write(key_path, _key_pem(key), 0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(public_path, public, 0o644)


def fingerprint(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class CertificateAuthority:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.cert_path = directory / "ca.crt"
        self.key_path = directory / "ca.key"
        self._cert: x509.Certificate | None = None
        self._key: ec.EllipticCurvePrivateKey | None = None

    def create(self, name: str = "virt8ra fleet CA", days: int = 3650) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write(self.key_path, _key_pem(key), 0o600)
        _write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._cert, self._key = cert, key

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self._cert is None or self._key is None:
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PkiError(f"{self.key_path}: not an EC private key")
            self._key = key
        return self._cert, self._key

    def cert_pem(self) -> str:
        return self.cert_path.read_text()

    def fingerprint(self) -> str:
        return fingerprint(self.cert_path.read_bytes())

    def _issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        days: float,
        usage: list[x509.ObjectIdentifier],
        sans: list[x509.GeneralName] | None = None,
    ) -> Issued:
        ca_cert, ca_key = self._load()
        now = _now()
        not_after = now + dt.timedelta(days=days)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM).decode(), serial, not_after.timestamp()
        )

    def issue_to_files(
        self, cn: str, cert_path: Path, key_path: Path, *, server: bool, days: float = 825
    ) -> Issued:
        """A key and certificate for one of our own services (broker, aggregator client)."""
        key = _new_key()
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        sans: list[x509.GeneralName] | None = None
        if server:
            sans = [
                x509.DNSName("localhost"),
                x509.DNSName(cn),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
        issued = self._issue(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
            key.public_key(), days, usage, sans,
        )
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, issued.certificate_pem.encode(), 0o644)
        return issued

    def sign_node_csr(self, csr_pem: str, attrs: NodeAttributes, days: float,
                      taken: Collection[str] = ()) -> Issued:
        """Sign a node's CSR; the subject is ours, built from ``attrs``, not from the CSR.
        The subjectAltNames it asks for are signed unless another node has them (``taken``)
        or a service of the fleet does (the broker's and the aggregator's certificates beside
        the CA's): a node's certificate never names what it could then impersonate."""
        csr, key = _load_csr(csr_pem)
        names = node_alt_names(csr)
        clash = sorted({_name_text(n) for n in names}
                       & (set(taken) | self.service_names() | _LOOPBACK_NAMES))
        if clash:
            raise PkiError(f"csr asks for {', '.join(clash)}, which names another node or a"
                           " service of the fleet")
        asked = {a.oid: a.value for a in csr.subject}
        cn = asked.get(NameOID.COMMON_NAME)
        if cn is not None and cn != attrs.node_id:
            raise PkiError(f"csr asks for common name {cn!r}, expected {attrs.node_id!r}")
        for oid, value, label in (
            (NameOID.COUNTRY_NAME, attrs.country, "country"),
            (NameOID.ORGANIZATION_NAME, attrs.provider, "provider"),
            (NameOID.LOCALITY_NAME, attrs.site, "site"),
        ):
            if oid in asked and asked[oid] != value:
                raise PkiError(f"csr asks for {label} {asked[oid]!r}; the token grants {value!r}")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, attrs.node_id),
                x509.NameAttribute(NameOID.COUNTRY_NAME, attrs.country),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, attrs.provider),
                x509.NameAttribute(NameOID.LOCALITY_NAME, attrs.site),
                x509.NameAttribute(PROFILE_OID, attrs.profile),
            ]
        )
        # Both usages: the node's libvirtd serves peer-to-peer migrations with it (TLS) and
        # opens them with it; the names it asks for are the address other nodes' libvirtd
        # reach it at, which their TLS check holds the certificate to.
        issued = self._issue(subject, key, days, [ExtendedKeyUsageOID.CLIENT_AUTH,
                                                  ExtendedKeyUsageOID.SERVER_AUTH],
                             names or None)
        return Issued(issued.certificate_pem, issued.serial, issued.not_after,
                      tuple(_name_text(n) for n in names))

    def service_names(self) -> set[str]:
        """The names in the certificates of the fleet's own services: the ones in the CA's
        directory and the broker's beside it."""
        found: set[str] = set()
        for path in [*self.dir.glob("*.crt"), *self.dir.parent.glob("broker/*.crt")]:
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            except (OSError, ValueError, x509.ExtensionNotFound):
                continue
            found.update(_name_text(n) for n in ext.value
                         if isinstance(n, x509.IPAddress | x509.DNSName))
        return found

    def issue_ephemeral(self, cn: str, seconds: float) -> Ephemeral:
        """A client certificate for ``cn`` that lives ``seconds``: the aggregator uses one to
        take over a revoked node's broker session, which makes the broker drop the node."""
        key = _new_key()
        issued = self._issue(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), key.public_key(),
            seconds / 86400, [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        return Ephemeral(issued.certificate_pem, _key_pem(key).decode(), issued.serial)

    def write_crl(self, path: Path, revoked_serials: list[int], days: float = 7) -> None:
        ca_cert, ca_key = self._load()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_csr(csr_pem: str) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        valid = csr.is_signature_valid
        key = csr.public_key()
    except InvalidSignature:
        raise PkiError("csr signature does not verify") from None
    except Exception as exc:
        raise PkiError(f"csr is not a PEM certificate request we can use: {exc}") from None
    if not valid:
        raise PkiError("csr signature does not verify")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise PkiError("csr key must be EC P-256")
    return csr, key


def placeholder_tls(name: str) -> tuple[str, str, str]:
    """A throwaway CA, and a certificate and key it signed (PEM, valid a day), for a TLS
    server that must start before it has its real certificate (libvirtd)."""
    now = _now()

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> str:
        made = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signer, hashes.SHA256()))
        return made.public_bytes(serialization.Encoding.PEM).decode()

    ca_key, key = _new_key(), _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} placeholder CA")])
    ca_pem = cert(f"{name} placeholder CA", ca_key, ca_name, ca_key, True)
    return ca_pem, cert(f"{name} placeholder", key, ca_name, ca_key, False), \
        _key_pem(key).decode()


def _name_text(name: x509.GeneralName) -> str:
    return str(name.value).lower()


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


MAX_ALT_NAMES = 4
_DNS_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                       r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


def node_alt_names(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    """The subjectAltNames a node's CSR asks for: IP addresses and DNS names only, at most
    :data:`MAX_ALT_NAMES`; anything else is refused (PkiError)."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except Exception as exc:  # a malformed or duplicated extension
        raise PkiError(f"csr extensions cannot be read: {exc}") from None
    names: list[x509.GeneralName] = []
    for name in ext.value:
        ip = isinstance(name, x509.IPAddress) and isinstance(
            name.value, ipaddress.IPv4Address | ipaddress.IPv6Address)
        dns = isinstance(name, x509.DNSName) and _DNS_NAME.fullmatch(name.value) is not None
        if ip or dns:
            names.append(name)
        else:
            raise PkiError(f"csr asks for a subjectAltName {name!r}: only IP addresses and"
                           " DNS names (the node's migration address) are signed")
    if len(names) > MAX_ALT_NAMES:
        raise PkiError(f"csr asks for {len(names)} subjectAltNames; at most {MAX_ALT_NAMES}")
    return names


def csr_key_id(csr_pem: str) -> str:
    """The key id (see :func:`key_id`) of a valid CSR's public key; raises PkiError."""
    return key_id(_load_csr(csr_pem)[1])


def read_node_attributes(cert_pem: str) -> NodeAttributes:
    """The placement attributes a node certificate carries."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())

    def get(oid: x509.ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    return NodeAttributes(
        node_id=get(NameOID.COMMON_NAME),
        country=get(NameOID.COUNTRY_NAME),
        provider=get(NameOID.ORGANIZATION_NAME),
        site=get(NameOID.LOCALITY_NAME),
        profile=get(PROFILE_OID),
    )


class OrderSigner:
    """Signs orders with the aggregator's Ed25519 key (the nodes hold its public half)."""

    def __init__(self, key_path: Path) -> None:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise PkiError(f"{key_path}: not an Ed25519 private key")
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)
