"""The aggregator's configuration (``DIR/aggregator.toml``; annotated copy in packaging/).

Everything lives under one data directory; paths inside it are derived here, not configured.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from plumbing import configfile

CONFIG_NAME = "aggregator.toml"


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8480
    tls: str = "auto"  # auto: HTTPS unless bound to loopback; on: always HTTPS

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.tls not in ("auto", "on"):
            raise ValueError(f"tls: {self.tls!r} must be \"auto\" or \"on\"")

    @property
    def https(self) -> bool:
        return self.tls == "on" or not self.loopback

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


@dataclass(frozen=True)
class BrokerConfig:
    managed: bool = True
    host: str = "127.0.0.1"
    port: int = 8883
    executable: str = "mosquitto"
    user: str = "mosquitto"  # the broker drops to this user when started as root
    # Sized for ingest bursts: Mosquitto's default (1000) silently drops QoS 1 messages
    # for a subscriber that falls behind.
    max_queued_messages: int = 1_000_000
    max_inflight_messages: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")


@dataclass(frozen=True)
class IngestConfig:
    client_id: str = "aggregator"
    batch_size: int = 2000
    queue_max: int = 200_000  # past this, messages are shed and counted, never silently lost


@dataclass(frozen=True)
class LivenessConfig:
    heartbeat_factor: float = 3.0  # offline after this many missed telemetry intervals
    min_timeout_s: float = 5.0


@dataclass(frozen=True)
class RetentionConfig:
    raw_hours: float = 48.0
    rollup_bucket_s: int = 300
    rollup_days: float = 90.0
    sweep_interval_s: float = 300.0

    def __post_init__(self) -> None:
        if self.raw_hours <= 0 or self.rollup_days <= 0 or self.sweep_interval_s <= 0:
            raise ValueError("raw_hours, rollup_days and sweep_interval_s must be positive")
        if self.rollup_bucket_s < 1:
            raise ValueError("rollup_bucket_s must be at least 1")


@dataclass(frozen=True)
class PkiConfig:
    # Node certificates are short-lived: agents renew at two thirds of the lifetime.
    node_cert_days: float = 7.0
    # How long a CRL is valid; it is re-signed at half that, and at every revocation.
    crl_days: float = 7.0

    def __post_init__(self) -> None:
        if not 0 < self.node_cert_days <= 825 or not 0 < self.crl_days <= 365:
            raise ValueError("node_cert_days must be in (0, 825] and crl_days in (0, 365]")


@dataclass(frozen=True)
class OrdersConfig:
    ttl_s: float = 600.0  # an order not finished by then ends as expired
    # Unanswered orders are published again with backoff; this is how often the dispatcher
    # looks (new orders go out at once).
    dispatch_interval_s: float = 1.0
    # A VM that asked to be restarted when its node is lost is, once the node has been silent
    # for its own lease (it has paused its guests by then) plus this long.
    node_loss_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.ttl_s < 5 or self.dispatch_interval_s <= 0:
            raise ValueError("ttl_s must be at least 5 and dispatch_interval_s positive")
        if not self.node_loss_grace_s >= 0:
            raise ValueError("node_loss_grace_s must be 0 or more")


@dataclass(frozen=True)
class ImagesConfig:
    # Nodes fetch images here over HTTPS with their own certificates (mutual TLS, CRL checked).
    host: str = "127.0.0.1"
    port: int = 8481
    # The largest image the aggregator takes (registered or uploaded), counted while copying.
    max_bytes: int = 64 << 30

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")


@dataclass(frozen=True)
class AggregatorConfig:
    api: ApiConfig = field(default_factory=ApiConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    pki: PkiConfig = field(default_factory=PkiConfig)
    orders: OrdersConfig = field(default_factory=OrdersConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)


@dataclass(frozen=True)
class Layout:
    """Where things live inside the data directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def database(self) -> Path:
        return self.root / "fleet.sqlite"

    @property
    def admin_token(self) -> Path:
        return self.root / "admin-token"

    @property
    def client_cert(self) -> Path:
        return self.pki / "aggregator.crt"

    @property
    def client_key(self) -> Path:
        return self.pki / "aggregator.key"

    @property
    def control_cert(self) -> Path:
        return self.pki / "control.crt"

    @property
    def control_key(self) -> Path:
        return self.pki / "control.key"

    @property
    def order_key(self) -> Path:
        return self.pki / "order-signing.key"

    @property
    def order_public_key(self) -> Path:
        return self.pki / "order-signing.pub"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.broker / "crl.pem"


def load(data_dir: Path) -> AggregatorConfig:
    return configfile.load(AggregatorConfig, Layout(data_dir).config)
