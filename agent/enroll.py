"""``virt8ra-agent enroll``: trade a one-time token for this node's identity.

The key is made here and never leaves the node; the aggregator signs a CSR and returns the
certificate with the CA and the broker's address. Everything is written to a staging directory
first and moved into place at the end, so a failure leaves nothing half-written. This module
(and cryptography with it) is loaded only by the enroll command, never by the daemon.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import json
import os
import shutil
import socket
import ssl
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import __version__, configfile, simhost
from agent.hypervisor import Hypervisor, HypervisorError
from agent.profiles import default_profiles_dir, load_profile
from agent.wire import ProtocolError, to_plain, validate_node_id


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
    interval_s: float = 10.0
    force: bool = False
    group: str = ""  # the service's group: may read the key (0640) and the other files


def default_node_id() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return name


def _fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _call(url: str, body: dict[str, Any] | None, tls: ssl.SSLContext | None) -> dict[str, Any]:
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
        hints = {
            "invalid_token": "check the token, or ask for a new one",
            "token_used": "each token enrolls one node: ask for a new one",
            "token_expired": "ask for a new token",
            "node_exists": "pick another --node-id, or have the operator remove the node",
        }
        hint = hints.get(code, "")
        raise EnrollError(f"the aggregator refused: {message}" + (f"; {hint}" if hint else ""))\
            from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnrollError(
            f"cannot reach the aggregator at {url}: {reason}; check the URL and the network"
        ) from None


def pinned_ca(base_url: str, fingerprint: str) -> x509.Certificate:
    """The aggregator's CA, accepted only if it is the one the operator pinned. Over HTTPS it
    is fetched without trusting the connection: the pin is the trust."""
    unverified = None
    if base_url.startswith("https:"):
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
    answer = _call(base_url + "/api/v1/ca", None, unverified)
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
    return ca


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


def enroll(opts: EnrollOptions) -> Path:
    """Enroll this node; returns the path of the agent config written."""
    try:
        validate_node_id(opts.node_id)
    except ProtocolError as exc:
        raise EnrollError(f"--node-id: {exc.reason}") from None
    config_path = opts.config_dir / "agent.toml"
    if config_path.exists() and not opts.force:
        raise EnrollError(
            f"this node is already enrolled ({config_path} exists); pass --force to re-enroll"
        )
    created = not opts.config_dir.exists()
    opts.config_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".enroll-", dir=opts.config_dir))
    done = False
    try:
        uri = opts.libvirt_uri
        if opts.simulate_profile:
            profile = load_profile(default_profiles_dir() / f"{opts.simulate_profile}.toml")
            host_file = opts.config_dir / "simulated-host.xml"
            uri = "test://" + str(host_file.resolve())
            (staging / host_file.name).write_text(simhost.host_xml(profile, opts.node_id))
            inventory = asyncio.run(_inventory("test://" + str(staging / host_file.name),
                                               profile.name))
        else:
            inventory = asyncio.run(_inventory(uri, ""))

        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, opts.node_id)]))
            .sign(key, hashes.SHA256())
        )
        base_url = opts.aggregator.rstrip("/")
        pinned = pinned_ca(base_url, opts.ca_fingerprint)
        tls = None
        if base_url.startswith("https:"):  # from here on, trust only the pinned CA
            tls = ssl.create_default_context(
                cadata=pinned.public_bytes(serialization.Encoding.PEM).decode()
            )
        answer = _call(
            base_url + "/api/v1/enroll",
            {
                "token": opts.token,
                "node_id": opts.node_id,
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "inventory": inventory,
            },
            tls,
        )
        try:
            cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
            ca = x509.load_pem_x509_certificate(answer["ca"].encode())
            broker_host, broker_port = answer["broker"]["host"], int(answer["broker"]["port"])
            profile_name = str(answer["attributes"]["profile"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EnrollError(f"the aggregator's answer is incomplete ({exc}); "
                              "is the URL a virt8ra aggregator?") from None
        if ca != pinned:
            raise EnrollError("the aggregator answered with another CA than the pinned one")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise EnrollError("the certificate returned is not for this node's key")
        (staging / "node.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )
        os.chmod(staging / "node.key", 0o600)
        (staging / "node.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (staging / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (staging / "agent.toml").write_text(
            "# Written by virt8ra-agent enroll; see packaging/agent.toml for every key.\n"
            + configfile.dump_toml({
                "node": {"id": opts.node_id, "profile": profile_name},
                "broker": {"host": broker_host, "port": broker_port,
                           "ca_file": opts.config_dir / "ca.crt",
                           "cert_file": opts.config_dir / "node.crt",
                           "key_file": opts.config_dir / "node.key"},
                "libvirt": {"uri": uri},
                "telemetry": {"interval_s": opts.interval_s,
                              "spool_path": opts.state_dir / "spool.sqlite"},
            })
        )
        if opts.group:
            _hand_to_group(staging, opts.group)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "agent.toml"):
            os.replace(item, opts.config_dir / item.name)  # the config last: it marks success
        done = True
        return config_path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            shutil.rmtree(opts.config_dir, ignore_errors=True)
