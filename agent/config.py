"""The agent's configuration (``agent.toml``); see packaging/agent.toml for an annotated copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.identity import libvirttls
from contract.wire import ProtocolError, validate_node_id
from plumbing import configfile


@dataclass(frozen=True)
class NodeConfig:
    id: str
    profile: str = ""
    # From the node's certificate, written at enrollment: the node refuses a VM whose
    # residency policy does not allow them, whatever the aggregator asked.
    country: str = ""
    provider: str = ""
    site: str = ""

    def __post_init__(self) -> None:
        try:
            validate_node_id(self.id)
        except ProtocolError as exc:
            raise ValueError(f"id: {exc.reason}") from None


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 8883
    ca_file: Path = Path("/etc/virt8ra/ca.crt")
    cert_file: Path = Path("/etc/virt8ra/node.crt")
    key_file: Path = Path("/etc/virt8ra/node.key")
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff: need 0 < backoff_initial_s <= backoff_max_s")


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = "qemu:///system"
    # The guests' domain type: "auto" takes the best the host's capabilities offer (kvm where
    # it is there); "qemu" forces software emulation, for hosts whose /dev/kvm cannot run
    # guests (nested virtualisation that only looks usable).
    domain_type: str = "auto"
    # Live migration, peer to peer between the nodes' libvirt daemons. ``migration_address``
    # is where other nodes' libvirtd reach this one's (an IP address or host name in this
    # node's certificate); empty: this node takes no live migrations. ``migration_transport``
    # "tls" uses libvirt's TLS port (listen_tls = 1 in libvirtd.conf, no key_file/cert_file
    # lines: libvirt reloads only its default paths) and QEMU's TLS for the data, with the
    # node's fleet certificate, which the agent writes under ``tls_dir`` in libvirt's layout;
    # "tcp" is unauthenticated and only for a closed lab network.
    migration_address: str = ""
    migration_transport: str = "tls"
    tls_dir: Path = Path("/etc/pki")  # libvirt's own default layout: CA/, libvirt/, qemu/
    # libvirtd's admin socket URI: after new certificates the agent asks it to reload them.
    admin_uri: str = "libvirtd:///system"

    def __post_init__(self) -> None:
        if self.domain_type not in ("auto", "kvm", "qemu"):
            raise ValueError(f"domain_type: {self.domain_type!r} must be auto, kvm or qemu")
        if self.migration_transport not in ("tls", "tcp"):
            raise ValueError(f"migration_transport: {self.migration_transport!r} must be tls"
                             " or tcp")
        if self.migration_address:
            try:
                libvirttls.migration_uri(self.migration_address)
            except libvirttls.LibvirtTlsError as exc:
                raise ValueError(f"migration_address: {exc}") from None


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = 10.0
    spool_path: Path = Path("/var/lib/virt8ra/spool.sqlite")
    spool_max_messages: int = 8640
    publish_batch: int = 200

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval_s: must be positive")
        if self.spool_max_messages < 10:
            raise ValueError("spool_max_messages: must be at least 10")
        if self.publish_batch < 1:
            raise ValueError("publish_batch: must be at least 1")


@dataclass(frozen=True)
class OrdersConfig:
    # The aggregator's Ed25519 order-signing public key (PEM), received at enrollment.
    signing_key_file: Path = Path("/etc/virt8ra/order-signing.pub")
    # The order journal and the last signed desired state (SQLite).
    journal_path: Path = Path("/var/lib/virt8ra/orders.sqlite")
    # Images fetched from the aggregator (checked by sha256) and the VMs' disks.
    images_dir: Path = Path("/var/lib/virt8ra/images")
    disks_dir: Path = Path("/var/lib/virt8ra/disks")
    # The aggregator's image service (HTTPS with this node's certificate), from enrollment.
    images_url: str = ""
    # A stop order asks the guest to shut down, and pulls the plug after this long.
    shutdown_timeout_s: float = 30.0
    # Cut off from the broker longer than this, the node pauses the guests it runs: the
    # aggregator may restart them elsewhere after the lease and a grace period, and a VM
    # must never run in two places. They resume only when the aggregator says so. 0: never.
    lease_s: float = 60.0

    def __post_init__(self) -> None:
        if self.images_url and not self.images_url.startswith("https://"):
            raise ValueError("images_url: must be an https:// URL")
        if self.shutdown_timeout_s <= 0:
            raise ValueError("shutdown_timeout_s: must be positive")
        if self.lease_s < 0:
            raise ValueError("lease_s: must be 0 (never) or positive")


@dataclass(frozen=True)
class AgentConfig:
    node: NodeConfig
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    orders: OrdersConfig = field(default_factory=OrdersConfig)


def load(path: Path) -> AgentConfig:
    """The agent config at ``path``; raises ``configfile.ConfigError`` naming file and key."""
    return configfile.load(AgentConfig, path)
