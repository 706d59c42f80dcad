"""``virt8ra-agent enroll``: trade a one-time token for this node's identity.

The key is made here and never leaves the node; the aggregator signs a CSR and returns the
certificate with the CA, the broker's address and its order-signing public key. Everything is
written to a staging directory first and moved into place at the end, so a failure leaves
nothing half-written. This module (and cryptography with it) is loaded only by the enroll
command, never by the daemon.

The steps, each refusing with what to do next; the token leaves the node only at step 4:
1. the hardware check (``agent/host/hostcheck.py``) of the libvirt host the agent will manage
   (``--libvirt-uri``, or the simulated host of ``--simulate``) against ``--profile``, the
   profile the token names (the node cannot read it from the token; the aggregator checks the
   facts sent again, against the token's own profile);
2. the aggregator's CA, accepted only if it matches the pinned ``--ca-fingerprint``;
3. the clock: more than :data:`MAX_CLOCK_SKEW_S` away from the aggregator's (allowing for the
   request's round trip, :func:`clock_skew_s`) is refused, since certificates and signed
   orders depend on it;
4. the request: token, node id, CSR, inventory and the host's facts;
5. the answer: certificate for this key, the pinned CA, broker, and an Ed25519 order-signing
   key, written as ``order-signing.pub`` and named in ``agent.toml`` (``[orders]``).
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from agent import __version__
from agent.host import hostcheck, simhost
from agent.host.hypervisor import Hypervisor, HypervisorError
from contract.profiles import HostFacts, Profile, default_profiles_dir
from contract.wire import ProtocolError, to_plain, validate_node_id
from plumbing import configfile
from plumbing.tls import TlsContext, pinned_client_context, unverified_client_context

MAX_CLOCK_SKEW_S = 60.0

# What to do next, by the error code the aggregator answers with.
HINTS = {
    "invalid_token": "check the token, or ask for a new one",
    "token_used": "each token enrolls one node: ask for a new one",
    "token_expired": "ask for a new token",
    "token_withdrawn": "the operator withdrew this token: ask for a new one",
    "node_exists": "a node with this id is already enrolled: pick another --node-id, or, to "
                   "enroll this node again, ask for a token bound to it (token create --node-id)",
    "token_for_other_node": "this token re-enrolls another node: use that --node-id, or ask "
                            "for a token for this one",
    "node_revoked": "this node id was revoked: enroll under a new --node-id with a new token",
    "profile_mismatch": "fix the hardware, or ask for a token for the profile this host meets "
                        "(virt8ra-agent check --profile NAME shows the checklist)",
}


log = logging.getLogger(__name__)


class EnrollError(Exception):
    """Enrollment failed; the message says what happened and what to do next."""


@dataclass(frozen=True)
class EnrollOptions:
    aggregator: str
    token: str
    node_id: str
    config_dir: Path
    state_dir: Path
    ca_fingerprint: str  # sha256:<hex> of the fleet CA's DER, from the operator
    libvirt_uri: str = "qemu:///system"
    simulate_profile: str = ""
    profile: str = ""  # the token's hardware profile (default: simulate_profile)
    profiles_dir: Path | None = None  # default: the installed hardware-profiles/
    interval_s: float = 10.0
    force: bool = False
    domain_type: str = "auto"  # or kvm, qemu: the guests' domain type
    group: str = ""  # the service's group: may read the key (0640) and the other files
    # Live migration (see [libvirt] in packaging/agent.toml): where peers' libvirtd reach this
    # node's (goes into the certificate as a subjectAltName), how, and libvirt's TLS files.
    migration_address: str = ""
    migration_transport: str = "tls"
    tls_dir: Path = Path("/etc/pki")
    admin_uri: str = "libvirtd:///system"


def default_node_id() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return name


def _fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _call(url: str, body: dict[str, Any] | None, tls: TlsContext | None) -> dict[str, Any]:
    req = urllib.request.Request(  # noqa: S310 - the URL is the operator's aggregator
        url, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30, context=tls) as resp:  # noqa: S310
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            code, message = str(exc.code), exc.reason
        hint = HINTS.get(code, "")
        raise EnrollError(f"the aggregator refused: {message}" + (f"; {hint}" if hint else ""))\
            from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnrollError(
            f"cannot reach the aggregator at {url}: {reason}; check the URL and the network"
        ) from None


def clock_skew_s(aggregator_time: float, sent_at: float, received_at: float) -> float:
    """How far this clock is ahead of the aggregator's (negative: behind), as little as the
    request's round trip allows: the aggregator read its clock between ``sent_at`` and
    ``received_at`` of ours, so any offset in that window may be transit time."""
    if aggregator_time < sent_at:
        return sent_at - aggregator_time
    if aggregator_time > received_at:
        return received_at - aggregator_time
    return 0.0


def check_clock(aggregator_time: float, sent_at: float, received_at: float) -> None:
    """Refuse when this clock is more than :data:`MAX_CLOCK_SKEW_S` off the aggregator's."""
    skew = clock_skew_s(aggregator_time, sent_at, received_at)
    if abs(skew) > MAX_CLOCK_SKEW_S:
        raise EnrollError(
            f"this node's clock is off by {abs(skew):.0f} seconds "
            f"({'ahead of' if skew > 0 else 'behind'} the aggregator's); fix the clock "
            "(enable NTP: timedatectl set-ntp true, or chrony) and enroll again; "
            "the token was not sent, nothing written"
        )


def pinned_ca(base_url: str, fingerprint: str) -> x509.Certificate:
    """The aggregator's CA, accepted only if it is the one the operator pinned, and only if
    this clock agrees with the aggregator's (when it says its time). Over HTTPS it is fetched
    without trusting the connection: the pin is the trust."""
    unverified = None
    if base_url.startswith("https:"):
        unverified = unverified_client_context()
    sent_at = time.time()
    answer = _call(base_url + "/api/v1/ca", None, unverified)
    received_at = time.time()
    try:
        ca = x509.load_pem_x509_certificate(str(answer["ca"]).encode())
    except (KeyError, ValueError) as exc:
        raise EnrollError(f"the aggregator's CA is unreadable ({exc}); "
                          "is the URL a virt8ra aggregator?") from None
    if _fingerprint(ca) != fingerprint.lower():
        raise EnrollError(
            f"the aggregator's CA is {_fingerprint(ca)}, not the pinned {fingerprint}: "
            "wrong aggregator or wrong fingerprint; the token was not sent, nothing written"
        )
    their_time = answer.get("time")
    if their_time is not None:
        if isinstance(their_time, bool) or not isinstance(their_time, int | float):
            raise EnrollError("the aggregator's time is unreadable; is the URL a virt8ra "
                              "aggregator?")
        check_clock(float(their_time), sent_at, received_at)
    return ca


def _profile(opts: EnrollOptions, name: str, option: str) -> Profile:
    if not name:
        raise EnrollError("--profile: name the hardware profile the token was issued for "
                          "(ask the operator), so this host is checked against it first")
    try:
        return hostcheck.find_profile(opts.profiles_dir or default_profiles_dir(), name)
    except hostcheck.UnknownProfile as exc:
        raise EnrollError(f"{option}: {exc}") from None


def local_check(profile: Profile, target: hostcheck.Target) -> HostFacts:
    """The host's facts if it meets ``profile``; otherwise refuse with every unmet line."""
    observation = asyncio.run(hostcheck.observe(target))
    report = hostcheck.evaluate(profile, observation)
    for c in report.checks:
        if c.status == "warn":
            log.warning("%s: %s; %s", c.name, c.found, c.hint)
    facts = observation.facts()
    if not report.ok or facts is None:
        lines = "; ".join(f"{c.name}: found {c.found}, required {c.required}"
                          + (f" ({c.hint})" if c.hint else "") for c in report.failures())
        raise EnrollError(
            f"this host does not meet the hardware profile {profile.name}: {lines}; "
            f"fix that or use a token for a profile the host meets (virt8ra-agent check "
            f"--profile {profile.name} shows the checklist); the token was not sent, "
            "nothing written"
        )
    return facts


def _signing_key(pem: object) -> bytes:
    """The order-signing key from the answer, checked to be an Ed25519 public key."""
    if not isinstance(pem, str):
        raise TypeError("order_signing_key is not a PEM string")
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("order_signing_key is not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


async def _inventory(uri: str, profile: str) -> dict[str, Any]:
    try:
        hv = await Hypervisor.open(uri, events=False)
    except HypervisorError as exc:
        raise EnrollError(f"cannot reach libvirt at {uri}: {exc}; is libvirtd running?") from None
    try:
        return to_plain(await hv.inventory(__version__, profile))
    finally:
        hv.close()


def _hand_to_group(directory: Path, group: str) -> None:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise EnrollError(f"no group {group!r}: create the service user first "
                          "(see systemd/README.md)") from None
    for path in directory.iterdir():
        os.chown(path, -1, gid)
        os.chmod(path, 0o640 if path.name == "node.key" else 0o644)


def _alt_name(address: str) -> x509.GeneralName:
    """The migration address as a subjectAltName: an IP address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address.lower())  # names are signed in lower case


@dataclass(frozen=True)
class Granted:
    """The aggregator's answer to the enroll request, read and checked against this node's key
    and the pinned CA."""

    certificate: x509.Certificate
    ca: x509.Certificate
    broker_host: Any  # as the aggregator sent it
    broker_port: int
    attributes: dict[str, str]  # profile, country, provider, site
    signing_key: bytes  # the order-signing public key, PEM
    images_url: str


def enroll(opts: EnrollOptions) -> Path:
    """Enroll this node; returns the path of the agent config written."""
    config_path = _config_path(opts)
    profile = _profile(opts, opts.profile or opts.simulate_profile, "--profile")
    simulated = None
    if opts.simulate_profile:
        simulated = _profile(opts, opts.simulate_profile, "--simulate")
    created = not opts.config_dir.exists()
    opts.config_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".enroll-", dir=opts.config_dir))
    done = False
    try:
        uri = opts.libvirt_uri
        check_uri = uri
        if simulated is not None:
            host_file = opts.config_dir / "simulated-host.xml"
            uri = simhost.host_uri(host_file)
            check_uri = simhost.write_host(simulated, opts.node_id, staging / host_file.name)
        facts = local_check(profile, hostcheck.Target(check_uri, simulation=simulated))
        inventory = asyncio.run(_inventory(check_uri, profile.name))
        key = ec.generate_private_key(ec.SECP256R1())
        granted = _request_identity(opts, key, inventory, facts)
        _write_identity(staging, key, granted)
        (staging / "agent.toml").write_text(
            "# Written by virt8ra-agent enroll; see packaging/agent.toml for every key.\n"
            + configfile.dump_toml(agent_config(opts, uri, granted))
        )
        _install(opts, staging)
        done = True
        return config_path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            shutil.rmtree(opts.config_dir, ignore_errors=True)


def _config_path(opts: EnrollOptions) -> Path:
    """Where the agent's config goes; refused for a bad node id, or a node already enrolled
    (unless ``force``)."""
    try:
        validate_node_id(opts.node_id)
    except ProtocolError as exc:
        raise EnrollError(f"--node-id: {exc.reason}") from None
    config_path = opts.config_dir / "agent.toml"
    if config_path.exists() and not opts.force:
        raise EnrollError(
            f"this node is already enrolled ({config_path} exists); pass --force to re-enroll"
        )
    return config_path


def certificate_request(node_id: str, migration_address: str,
                        key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """The request for this node's certificate: its id as the common name, its migration
    address (if any) as a subjectAltName."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
    if migration_address:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [_alt_name(migration_address)]), critical=False)
    return builder.sign(key, hashes.SHA256())


def _request_identity(opts: EnrollOptions, key: ec.EllipticCurvePrivateKey,
                      inventory: dict[str, Any], facts: HostFacts) -> Granted:
    """Steps 2 to 5: the pinned CA (and the clock), then the token and the CSR sent, and the
    answer read and checked."""
    csr = certificate_request(opts.node_id, opts.migration_address, key)
    base_url = opts.aggregator.rstrip("/")
    pinned = pinned_ca(base_url, opts.ca_fingerprint)
    tls = None
    if base_url.startswith("https:"):  # from here on, trust only the pinned CA
        tls = pinned_client_context(pinned.public_bytes(serialization.Encoding.PEM).decode())
    answer = _call(
        base_url + "/api/v1/enroll",
        {
            "token": opts.token,
            "node_id": opts.node_id,
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "inventory": inventory,
            "facts": facts.to_plain(),
        },
        tls,
    )
    return read_answer(answer, pinned, key)


def read_answer(answer: dict[str, Any], pinned: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> Granted:
    """The enroll answer read; refused if incomplete, with another CA than the pinned one, or
    with a certificate for another key."""
    try:
        granted = Granted(
            certificate=x509.load_pem_x509_certificate(answer["certificate"].encode()),
            ca=x509.load_pem_x509_certificate(answer["ca"].encode()),
            broker_host=answer["broker"]["host"],
            broker_port=int(answer["broker"]["port"]),
            attributes={"profile": str(answer["attributes"]["profile"]),
                        **{k: str(answer["attributes"].get(k, ""))
                           for k in ("country", "provider", "site")}},
            signing_key=_signing_key(answer["order_signing_key"]),
            images_url=str(answer.get("images_url", "")),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise EnrollError(f"the aggregator's answer is incomplete ({exc}); "
                          "is the URL a virt8ra aggregator?") from None
    if granted.ca != pinned:
        raise EnrollError("the aggregator answered with another CA than the pinned one")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if (granted.certificate.public_key().public_bytes(*spki)
            != key.public_key().public_bytes(*spki)):
        raise EnrollError("the certificate returned is not for this node's key")
    return granted


def _write_identity(staging: Path, key: ec.EllipticCurvePrivateKey, granted: Granted) -> None:
    """The key (0600), the certificate, the CA and the order-signing key, into ``staging``."""
    (staging / "node.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    os.chmod(staging / "node.key", 0o600)
    (staging / "node.crt").write_bytes(granted.certificate.public_bytes(serialization.Encoding.PEM))
    (staging / "ca.crt").write_bytes(granted.ca.public_bytes(serialization.Encoding.PEM))
    (staging / "order-signing.pub").write_bytes(granted.signing_key)
    os.chmod(staging / "order-signing.pub", 0o644)


def agent_config(opts: EnrollOptions, uri: str, granted: Granted) -> dict[str, dict[str, Any]]:
    """The agent's config (``agent.toml``) for the identity granted, its files where
    :func:`_install` puts them."""
    return {
        "node": {"id": opts.node_id, **granted.attributes},
        "broker": {"host": granted.broker_host, "port": granted.broker_port,
                   "ca_file": opts.config_dir / "ca.crt",
                   "cert_file": opts.config_dir / "node.crt",
                   "key_file": opts.config_dir / "node.key"},
        "libvirt": {"uri": uri, "domain_type": opts.domain_type,
                    "migration_address": opts.migration_address,
                    "migration_transport": opts.migration_transport,
                    "tls_dir": opts.tls_dir, "admin_uri": opts.admin_uri},
        "telemetry": {"interval_s": opts.interval_s,
                      "spool_path": opts.state_dir / "spool.sqlite"},
        "orders": {"signing_key_file": opts.config_dir / "order-signing.pub",
                   "journal_path": opts.state_dir / "orders.sqlite",
                   "images_dir": opts.state_dir / "images",
                   "disks_dir": opts.state_dir / "disks",
                   "images_url": granted.images_url},
    }


def _install(opts: EnrollOptions, staging: Path) -> None:
    """Move the staged files into the config directory, the config last (it marks success);
    with ``group``, the service's group may read them and renew the certificate there."""
    if opts.group:
        _hand_to_group(staging, opts.group)
    for stale in ("node.key.next", "node.crt.next"):  # a renewal of the old identity
        (opts.config_dir / stale).unlink(missing_ok=True)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "agent.toml"):
        os.replace(item, opts.config_dir / item.name)  # the config last: it marks success
    if opts.group:  # the service renews node.crt and node.key here itself
        os.chown(opts.config_dir, -1, grp.getgrnam(opts.group).gr_gid)
        os.chmod(opts.config_dir, 0o770)  # noqa: S103 - root and the service group only
