"""``virt8ra-aggregator init`` and ``serve``: the data directory and the running service.

``serve`` is one TaskGroup of named tasks, each a collaborator from its own package: the
managed broker (``fleet/managedbroker.py``), ingest and the control session (``fleet/``),
certificate renewal and the CRL (``trust/renewal.py``, ``trust/revocation.py``), the order
dispatcher (``fleet/dispatcher.py``), the image service (``api/images.py``), retention
(``fleet/retention.py``) and the REST API (``api/server.py``), plus the systemd watchdog when
systemd asks for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from aggregator import config
from aggregator.api.common import Services
from aggregator.api.images import ImageService
from aggregator.api.server import ApiServer
from aggregator.config import AggregatorConfig, Layout
from aggregator.fleet import broker
from aggregator.fleet.control import CONTROL_CN, Control, ControlSettings
from aggregator.fleet.dispatcher import Dispatcher
from aggregator.fleet.ingest import Ingest, ReceiverSettings
from aggregator.fleet.managedbroker import ManagedBroker
from aggregator.fleet.retention import Retention
from aggregator.store.ingest import EventHandlers
from aggregator.store.writer import Store
from aggregator.trust.pki import CertificateAuthority, OrderSigner, make_order_key
from aggregator.trust.renewal import Renewals
from aggregator.trust.revocation import Revocation
from aggregator.trust.tokens import create_api_token
from aggregator.workloads import orders, placement, vms
from contract.profiles import Profile, default_profiles_dir, load_profiles
from plumbing import configfile, sdnotify
from plumbing.tls import client_verifying_context, server_context


class InitError(Exception):
    """The data directory cannot be initialised; the message says why."""


class ServiceError(Exception):
    """The service could not start or stopped on an outside failure; the message says why."""


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    admin_token: str
    ca_fingerprint: str


def init(data_dir: Path, *, api_host: str = "127.0.0.1", api_port: int = 8480,
         broker_port: int = 8883, broker_user: str = "mosquitto",
         images_port: int = 8481) -> InitResult:
    """Make the CA, service certificates, broker config, database and first admin token."""
    layout = Layout(data_dir)
    if layout.config.exists():
        raise InitError(f"{data_dir} is already initialised ({layout.config} exists)")
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o755)  # noqa: S103 - the broker's user must reach broker/ inside
    table = {
        "api": {"host": api_host, "port": api_port},
        "broker": {"managed": True, "host": "127.0.0.1", "port": broker_port,
                   "user": broker_user},
        "images": {"host": api_host, "port": images_port},
    }
    cfg = configfile.build(AggregatorConfig, table, layout.config)
    ca = CertificateAuthority(layout.pki)
    ca.create()
    layout.broker.mkdir(parents=True, exist_ok=True)
    ca.issue_to_files("broker", layout.broker / "broker.crt", layout.broker / "broker.key",
                      server=True)
    ca.issue_to_files("aggregator", layout.client_cert, layout.client_key, server=False)
    ca.issue_to_files(api_host, layout.pki / "api.crt", layout.pki / "api.key", server=True)
    ensure_identities(layout, ca)
    ca.write_crl(layout.crl, [], cfg.pki.crl_days)
    broker.write_config(layout, cfg.broker)
    store = Store(layout.database)
    store.start()
    try:
        _, token = asyncio.run(
            store.write(lambda db: create_api_token(db, "admin", "initial admin", time.time()))
        )
    finally:
        store.stop()
    fd = os.open(layout.admin_token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    layout.config.write_text(
        "# virt8ra aggregator; see packaging/aggregator.toml for every key.\n"
        + configfile.dump_toml(table)
    )
    return InitResult(data_dir, token, ca.fingerprint())


def ensure_identities(layout: Layout, ca: CertificateAuthority) -> None:
    """The control session's certificate and the order-signing key: made by ``init``, and
    added to a data directory initialised before they existed."""
    if not layout.control_cert.exists():
        ca.issue_to_files(CONTROL_CN, layout.control_cert, layout.control_key, server=False)
    if not layout.order_key.exists():
        make_order_key(layout.order_key, layout.order_public_key)


class Aggregator:
    """The running service; :meth:`run` until :meth:`request_stop`.

    Only wiring: each task is a collaborator from the package it belongs to, built here from
    the config and handed what it needs (the store, the CA, the control session).
    """

    def __init__(self, data_dir: Path, cfg: AggregatorConfig,
                 profiles: dict[str, Profile] | None = None) -> None:
        self.layout = layout = Layout(data_dir)
        self.config = cfg
        self.profiles = profiles if profiles is not None else load_profiles(default_profiles_dir())
        self.stop = asyncio.Event()
        self.orders_due = asyncio.Event()  # wakes the dispatcher: a new order, a node's report
        self.liveness = vms.Liveness(cfg.liveness.heartbeat_factor, cfg.liveness.min_timeout_s)
        self.store = Store(layout.database, batch_size=cfg.ingest.batch_size,
                           handlers=EventHandlers(node_online=orders.node_online,
                                                  lifecycle=orders.apply_lifecycle,
                                                  report=orders.apply_report),
                           queue_max=cfg.ingest.queue_max)
        self.ca = CertificateAuthority(layout.pki)
        self.broker = ManagedBroker(layout, cfg.broker)
        self.control = Control(
            ControlSettings(host=cfg.broker.host, port=cfg.broker.port, ca_file=layout.ca_cert,
                            cert_file=layout.control_cert, key_file=layout.control_key,
                            scratch_dir=layout.pki),
            self.ca,
        )
        self.renewals = Renewals(self.store, self.ca, cert_days=cfg.pki.node_cert_days,
                                 sender=self.control)
        self.revocation = Revocation(self.store, self.ca, crl_file=layout.crl,
                                     crl_days=cfg.pki.crl_days, broker=self.broker,
                                     sessions=self.control)
        self.ingest = Ingest(
            self.store,
            ReceiverSettings(host=cfg.broker.host, port=cfg.broker.port,
                             ca_file=layout.ca_cert, cert_file=layout.client_cert,
                             key_file=layout.client_key, client_id=cfg.ingest.client_id),
            on_renew=self.renewals.request,
            on_report=self.orders_due.set,  # a move may take its next step
        )
        self.retention = Retention(self.store, cfg.retention)

    def request_stop(self) -> None:
        self.stop.set()

    def figures(self) -> dict[str, float]:
        c, s = self.ingest.counters, self.store
        return {
            "virt8ra_ingest_received": c.received,
            "virt8ra_ingest_malformed": c.malformed,
            "virt8ra_ingest_shed": s.shed,
            "virt8ra_ingest_connects": c.connects,
            "virt8ra_ingest_restarts": self.ingest.restarts,
            "virt8ra_store_samples": s.stored_samples,
            "virt8ra_store_events": s.stored_events,
            "virt8ra_store_duplicates": s.duplicates,
            "virt8ra_store_gaps": s.gaps_detected,
            "virt8ra_store_batches": s.batches,
            "virt8ra_store_backlog": s.backlog,
            "virt8ra_broker_restarts": self.broker.restarts,
            "virt8ra_certificates_renewed": self.renewals.renewed,
        }

    async def run(self) -> None:
        await asyncio.to_thread(self.store.start)
        try:
            signer, public_key = await asyncio.to_thread(self._identities)
            await self.revocation.refresh_crl()  # before the broker reads it: it may have expired
            await self.store.write(lambda db: placement.sync_reservations(db, self.profiles))
            await self._serve(signer, public_key)
        finally:
            await asyncio.to_thread(self.store.stop)

    def _identities(self) -> tuple[OrderSigner, str]:
        """The order-signing key (made if this data directory predates it) and its public
        half, which every node gets at enrollment."""
        ensure_identities(self.layout, self.ca)
        return OrderSigner(self.layout.order_key), self.layout.order_public_key.read_text()

    async def _serve(self, signer: OrderSigner, public_key: str) -> None:
        cfg, stop, layout = self.config, self.stop, self.layout
        dispatcher = Dispatcher(self.store, self.control, signer=signer, profiles=self.profiles,
                                liveness=self.liveness, config=cfg.orders, listener=self.ingest,
                                wake=self.orders_due)
        api_tls = None
        if cfg.api.https:  # plain HTTP only on loopback
            api_tls = server_context(layout.pki / "api.crt", layout.pki / "api.key")
        api = ApiServer(self._services(signer, public_key), host=cfg.api.host,
                        port=cfg.api.port, tls=api_tls)
        images = ImageService(
            self.store, crl_file=layout.crl, host=cfg.images.host, port=cfg.images.port,
            tls=client_verifying_context(layout.pki / "api.crt", layout.pki / "api.key",
                                         layout.ca_cert, layout.crl),
        )
        async with asyncio.TaskGroup() as tg:
            if self.broker.managed:
                tg.create_task(self.broker.run(stop), name="broker")
            tg.create_task(self.ingest.run(stop), name="ingest")
            tg.create_task(self.control.run(stop), name="control")
            tg.create_task(self.renewals.run(stop), name="renewals")
            tg.create_task(self.revocation.keep_crl(stop), name="crl")
            tg.create_task(dispatcher.run(stop), name="orders")
            tg.create_task(images.run(stop), name="images")
            tg.create_task(self.retention.run(stop), name="retention")
            tg.create_task(api.run(stop, listening=self.ingest.connected), name="api")
            tg.create_task(watchdog(self.store, stop), name="watchdog")

    def _services(self, signer: OrderSigner, public_key: str) -> Services:
        """What the API's handlers use: collaborators, never callbacks into this class."""
        cfg = self.config
        return Services(
            store=self.store,
            ca=self.ca,
            profiles=self.profiles,
            heartbeat_factor=cfg.liveness.heartbeat_factor,
            min_timeout_s=cfg.liveness.min_timeout_s,
            cert_days=cfg.pki.node_cert_days,
            broker_host=cfg.broker.host,
            broker_port=cfg.broker.port,
            metrics=self.figures,
            order_public_key=public_key,
            revocation=self.revocation,
            signer=signer,
            order_ttl_s=cfg.orders.ttl_s,
            images_dir=self.layout.images,
            images_url=f"https://{cfg.images.host}:{cfg.images.port}",
            max_image_bytes=cfg.images.max_bytes,
            orders_due=self.orders_due,
        )


async def watchdog(store: Store, stop: asyncio.Event) -> None:
    """Tell systemd we are alive, when it asks to be told: only while the store's writer
    thread is alive and keeping up."""
    interval = sdnotify.watchdog_interval_s()
    if interval is None:
        return
    while not stop.is_set():
        await store.flush()
        sdnotify.notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def serve(data_dir: Path) -> None:
    """Run the aggregator in ``data_dir`` until SIGTERM or SIGINT."""
    cfg = config.load(data_dir)

    async def main() -> None:
        agg = Aggregator(data_dir, cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agg.request_stop)
        try:
            await agg.run()
        except* (OSError, broker.BrokerError) as group:
            reasons = "; ".join(str(e) for e in group.exceptions)
            raise ServiceError(f"the aggregator stopped: {reasons}") from None

    asyncio.run(main())
