"""``virt8ra-aggregator init`` and ``serve``: the data directory and the running service.

``serve`` is one TaskGroup of named tasks: the managed broker, ingest, retention and the
HTTP API, plus the systemd watchdog when systemd asks for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
from aiohttp import web

from agent import configfile, sdnotify
from agent.profiles import Profile, default_profiles_dir, load_profiles
from agent.tls import server_context
from aggregator import broker, config
from aggregator.api import Services, make_app
from aggregator.auth import create_api_token
from aggregator.config import AggregatorConfig, Layout
from aggregator.ingest import Ingest, ReceiverSettings
from aggregator.pki import CertificateAuthority
from aggregator.store import Store

log = logging.getLogger("virt8ra.aggregator")


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
         broker_port: int = 8883, broker_user: str = "mosquitto") -> InitResult:
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
    }
    cfg = configfile.build(AggregatorConfig, table, layout.config)
    ca = CertificateAuthority(layout.pki)
    ca.create()
    layout.broker.mkdir(parents=True, exist_ok=True)
    ca.issue_to_files("broker", layout.broker / "broker.crt", layout.broker / "broker.key",
                      server=True)
    ca.issue_to_files("aggregator", layout.client_cert, layout.client_key, server=False)
    ca.issue_to_files(api_host, layout.pki / "api.crt", layout.pki / "api.key", server=True)
    ca.write_crl(layout.crl, [])
    broker.write_config(layout, cfg.broker)
    store = Store(layout.database)
    store.start()
    try:
        token = asyncio.run(
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


class Aggregator:
    """The running service; :meth:`run` until :meth:`request_stop`."""

    def __init__(self, data_dir: Path, cfg: AggregatorConfig,
                 profiles: dict[str, Profile] | None = None) -> None:
        self.layout = Layout(data_dir)
        self.config = cfg
        self.profiles = profiles if profiles is not None else load_profiles(default_profiles_dir())
        self.stop = asyncio.Event()
        self.store = Store(self.layout.database, batch_size=cfg.ingest.batch_size,
                           queue_max=cfg.ingest.queue_max)
        self.ca = CertificateAuthority(self.layout.pki)
        self.supervisor: broker.BrokerSupervisor | None = None
        self.ingest = Ingest(
            self.store,
            ReceiverSettings(
                host=cfg.broker.host,
                port=cfg.broker.port,
                ca_file=self.layout.ca_cert,
                cert_file=self.layout.client_cert,
                key_file=self.layout.client_key,
                client_id=cfg.ingest.client_id,
            ),
        )

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
            "virt8ra_broker_restarts": self.supervisor.restarts if self.supervisor else 0,
        }

    async def run(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self.store.start)
        try:
            async with asyncio.TaskGroup() as tg:
                if cfg.broker.managed:
                    conf = broker.write_config(self.layout, cfg.broker)
                    self.supervisor = broker.BrokerSupervisor(cfg.broker.executable, conf)
                    tg.create_task(self.supervisor.run(self.stop), name="broker")
                tg.create_task(self.ingest.run(self.stop), name="ingest")
                tg.create_task(self._retention(), name="retention")
                tg.create_task(self._api(), name="api")
                tg.create_task(self._watchdog(), name="watchdog")
        finally:
            await asyncio.to_thread(self.store.stop)

    async def _api(self) -> None:
        cfg = self.config
        services = Services(
            store=self.store,
            ca=self.ca,
            profiles=self.profiles,
            heartbeat_factor=cfg.liveness.heartbeat_factor,
            min_timeout_s=cfg.liveness.min_timeout_s,
            cert_days=cfg.pki.node_cert_days,
            broker_host=cfg.broker.host,
            broker_port=cfg.broker.port,
            metrics=self.figures,
        )
        runner = web.AppRunner(make_app(services), access_log=None)
        await runner.setup()
        tls = None
        if cfg.api.https:  # plain HTTP only on loopback
            tls = server_context(self.layout.pki / "api.crt", self.layout.pki / "api.key")
        site = web.TCPSite(runner, cfg.api.host, cfg.api.port, ssl_context=tls)
        # Let ingest open its persistent session before nodes can enroll and publish: from
        # then on the broker queues their messages for us even while we are away.
        try:
            await asyncio.wait_for(self.ingest.connected.wait(), timeout=30)
        except TimeoutError:
            log.error("ingest is not connected to the broker yet; serving the API anyway")
        if self.stop.is_set():
            await runner.cleanup()
            return
        try:
            await site.start()
            log.info("API on %s://%s:%d", "https" if tls else "http", cfg.api.host, cfg.api.port)
            sdnotify.notify("READY=1")
            await self.stop.wait()
        finally:
            sdnotify.notify("STOPPING=1")
            await runner.cleanup()

    async def _retention(self) -> None:
        r = self.config.retention
        while not self.stop.is_set():
            now, chunk, total = time.time(), 5000, 0

            def sweep(db: sqlite_utils.Database, now: float = now, chunk: int = chunk
                      ) -> tuple[int, int]:
                return Store.sweep(db, now, r.raw_hours, r.rollup_bucket_s, r.rollup_days, chunk)

            while not self.stop.is_set():
                try:
                    rolled, _ = await self.store.write(sweep)
                except Exception:  # a sweep that fails must not take the service down
                    log.exception("retention sweep failed; retrying at the next interval")
                    break
                total += rolled
                if rolled < chunk:
                    break
            if total:
                log.info("retention: rolled up %d samples", total)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=r.sweep_interval_s)

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval_s()
        if interval is None:
            return
        while not self.stop.is_set():
            await self.store.flush()  # the writer thread is alive and keeping up
            sdnotify.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=interval)


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
