"""What the order runner knows of its node: its name, where it is and what it keeps back from
guests, where VM files go, how it takes part in live migration, its lease (all from
``agent.toml`` and the node's certificate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.identity import libvirttls
from agent.orders.errors import Refused
from contract.profiles import Reservations


@dataclass(frozen=True)
class NodeLimits:
    """What the node offers guests and where it is, for its own checks."""

    country: str
    provider: str
    reserved: Reservations
    cpu_overcommit: float = 4.0


@dataclass(frozen=True)
class Migration:
    """How this node takes part in live migration (``[libvirt]`` in agent.toml)."""

    address: str = ""  # where other nodes' libvirtd reach this one's; "": none comes in
    transport: str = "tls"  # or "tcp" (a closed lab network only)

    def uri(self, peer: str) -> str:
        """The libvirt URI this node's libvirtd uses to reach ``peer``'s (peer to peer); over
        TLS it reads its client certificate from libvirt's default paths (the daemon writes
        them there: ``[libvirt] tls_dir``)."""
        try:
            return libvirttls.migration_uri(peer, transport=self.transport)
        except libvirttls.LibvirtTlsError as exc:
            raise Refused(f"the destination's migration address: {exc}") from None


@dataclass(frozen=True)
class Storage:
    images_dir: Path
    disks_dir: Path
    images_url: str
    shutdown_timeout_s: float
    domain_type: str = "auto"  # or kvm, qemu: overrides what the capabilities offer


@dataclass(frozen=True)
class Settings:
    """The node as the order runner and its handlers see it."""

    node: str  # the node's id: orders for another are refused
    limits: NodeLimits
    storage: Storage
    migration: Migration = field(default_factory=Migration)
    # Cut off from the aggregator this long, the node pauses its guests (0: never).
    lease_s: float = 0.0
