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
from typing import Any

from aiohttp import web

from aggregator import config
from aggregator.api.common import Services
from aggregator.api.http import JsonErrorRunner, error, json_errors
from aggregator.api.routes import make_app
from aggregator.config import AggregatorConfig, Layout
from aggregator.fleet import broker
from aggregator.fleet.control import CONTROL_CN, Control, ControlSettings, ControlUnavailable
from aggregator.fleet.ingest import Ingest, ReceiverSettings
from aggregator.store.ingest import EventHandlers
from aggregator.store.tx import Tx
from aggregator.store.writer import Store
from aggregator.trust import audit
from aggregator.trust import nodes as trust
from aggregator.trust.enrollment import EnrollmentError
from aggregator.trust.pki import CertificateAuthority, OrderSigner, make_order_key
from aggregator.trust.tokens import create_api_token
from aggregator.workloads import images, moves, orders, placement, vms
from contract.profiles import Profile, default_profiles_dir, load_profiles
from contract.wire import Certificate, RenewRequest, encode
from plumbing import configfile, sdnotify
from plumbing.tls import client_verifying_context, server_context

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
    """The running service; :meth:`run` until :meth:`request_stop`."""

    def __init__(self, data_dir: Path, cfg: AggregatorConfig,
                 profiles: dict[str, Profile] | None = None) -> None:
        self.layout = Layout(data_dir)
        self.config = cfg
        self.profiles = profiles if profiles is not None else load_profiles(default_profiles_dir())
        self.stop = asyncio.Event()
        self.store = Store(self.layout.database, batch_size=cfg.ingest.batch_size,
                           handlers=EventHandlers(node_online=orders.node_online,
                                                  lifecycle=orders.apply_lifecycle,
                                                  report=orders.apply_report),
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
            on_renew=self._renewal_requested,
            on_report=lambda: self._dispatch_now.set(),  # a move may take its next step
        )
        self.control = Control(
            ControlSettings(
                host=cfg.broker.host,
                port=cfg.broker.port,
                ca_file=self.layout.ca_cert,
                cert_file=self.layout.control_cert,
                key_file=self.layout.control_key,
                scratch_dir=self.layout.pki,
            ),
            self.ca,
        )
        self._renewals: asyncio.Queue[RenewRequest] = asyncio.Queue(maxsize=10_000)
        self._crl_lock = asyncio.Lock()
        self.renewed = 0
        self.signer: OrderSigner | None = None
        self._dispatch_now = asyncio.Event()

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
            "virt8ra_certificates_renewed": self.renewed,
        }

    async def run(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self.store.start)
        try:
            await asyncio.to_thread(ensure_identities, self.layout, self.ca)
            self.order_public_key = self.layout.order_public_key.read_text()
            self.signer = OrderSigner(self.layout.order_key)
            await self.refresh_crl()  # before the broker reads it: it may have expired meanwhile
            await self.store.write(lambda db: placement.sync_reservations(db, self.profiles))
            async with asyncio.TaskGroup() as tg:
                if cfg.broker.managed:
                    conf = broker.write_config(self.layout, cfg.broker)
                    self.supervisor = broker.BrokerSupervisor(cfg.broker.executable, conf)
                    tg.create_task(self.supervisor.run(self.stop), name="broker")
                tg.create_task(self.ingest.run(self.stop), name="ingest")
                tg.create_task(self.control.run(self.stop), name="control")
                tg.create_task(self._renewer(), name="renewals")
                tg.create_task(self._crl_keeper(), name="crl")
                tg.create_task(self._dispatcher(), name="orders")
                tg.create_task(self._image_service(), name="images")
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
            order_public_key=self.order_public_key,
            revoke=self.revoke,
            crl_changed=self._re_enrolled,
            signer=self.signer,
            order_ttl_s=cfg.orders.ttl_s,
            images_dir=self.layout.images,
            images_url=f"https://{cfg.images.host}:{cfg.images.port}",
            max_image_bytes=cfg.images.max_bytes,
            orders_changed=self._dispatch_now.set,
        )
        runner = JsonErrorRunner(make_app(services), access_log=None)
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

    # --- trust: CRL, revocation, renewal -------------------------------------------------------

    async def refresh_crl(self) -> bool:
        """Write the CRL from the database and have the broker re-read it (SIGHUP); True when
        the broker was told. One at a time, so a newer list is never overwritten by an older."""
        async with self._crl_lock:
            serials = await self.store.read(lambda c: trust.crl_serials(c, time.time()))
            await asyncio.to_thread(self.ca.write_crl, self.layout.crl, serials,
                                    self.config.pki.crl_days)
            if self.supervisor is not None and self.supervisor.reload():
                log.info("CRL renewed (%d revoked); the broker re-reads it", len(serials))
                return True
            if not self.config.broker.managed:
                log.warning("CRL renewed at %s: have your broker re-read it (SIGHUP)",
                            self.layout.crl)
            return False

    async def _crl_keeper(self) -> None:
        """Re-sign the CRL at half its validity: an expired CRL makes the broker refuse
        every node."""
        period = self.config.pki.crl_days * 86400 / 2
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=period)
            if not self.stop.is_set():
                try:
                    await self.refresh_crl()
                except Exception:  # retried at the next turn; the old CRL stays valid meanwhile
                    log.exception("CRL renewal failed")

    async def revoke(self, node: str, actor: str, reason: str) -> dict[str, Any]:
        """Revoke ``node``: CRL, broker reload, then take its live session away."""
        now = time.time()
        serials = await self.store.write(
            lambda db: trust.revoke_node(db, node, now, actor, reason)
        )
        dropped, reloaded = await self.cut_off(node)
        return {"node": node, "revoked_at": now, "serials": serials, "reason": reason,
                "broker_reloaded": reloaded, "session_dropped": dropped}

    async def cut_off(self, node: str) -> tuple[bool, bool]:
        """After revoking certificates of ``node``: renew the CRL, have the broker re-read it
        and take the node's live session over; ``(session dropped, broker reloaded)``. With a
        broker we do not manage, the session is left alone: it would only reconnect under
        the old CRL until that broker re-reads it."""
        reloaded = await self.refresh_crl()
        if not reloaded:
            log.error("%s: revoked, but the broker was not told; its session stays until the"
                      " broker re-reads %s", node, self.layout.crl)
            return False, False
        await asyncio.sleep(0.3)  # the broker handles SIGHUP on its next loop turn
        try:
            await self.control.cut_off(node)
        except ControlUnavailable as exc:
            log.error("revoked %s, but its live session stays until it reconnects: %s", node,
                      exc)
            return False, True
        return True, True

    async def _re_enrolled(self, node: str) -> None:
        await self.cut_off(node)

    def _renewal_requested(self, request: RenewRequest) -> None:
        try:
            self._renewals.put_nowait(request)
        except asyncio.QueueFull:
            log.warning("renewal request from %s dropped: too many waiting; it will ask again",
                        request.node)

    async def _renewer(self) -> None:
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                getter = asyncio.ensure_future(self._renewals.get())
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                req = getter.result()
                try:
                    await self._renew(req)
                except Exception:  # one node's request must never stop the aggregator
                    log.exception("renewal for %s failed", req.node)
        finally:
            stopper.cancel()

    async def _renew(self, req: RenewRequest) -> None:
        now, days = time.time(), self.config.pki.node_cert_days

        def sign(db: Tx) -> trust.Renewed:
            return trust.renew(db, self.ca, req.node, req.csr, now, days)

        try:
            renewed = await self.store.write(sign)
        except EnrollmentError as exc:
            log.warning("refused to renew %s's certificate: %s", req.node, exc)
            code = exc.code
            await self.store.write(lambda db: audit.record(
                db, now, f"node:{req.node}", "certificate.renew", req.node, "refused",
                reason=code,
            ))
            return
        answer = encode(Certificate(node=req.node, ts=time.time(),
                                    certificate=renewed.certificate_pem,
                                    not_after=renewed.not_after))
        try:
            await self.control.publish(req.node, answer)
        except ControlUnavailable as exc:
            log.warning("renewed %s's certificate but cannot send it (%s); the node will ask"
                        " again", req.node, exc)
            return
        if not renewed.reused:
            self.renewed += 1
        log.info("renewed %s's certificate (serial %s)", req.node, renewed.serial)

    # --- orders and images --------------------------------------------------------------------

    async def _dispatcher(self) -> None:
        """Publish due orders in sequence: new ones at once, unanswered ones again with
        backoff, everything a node missed when it comes back; expire what ran out of time."""
        interval = self.config.orders.dispatch_interval_s
        while not self.stop.is_set():
            self._dispatch_now.clear()
            try:
                await self._dispatch(time.time())
            except Exception:  # a bad turn must not stop order delivery for good
                log.exception("order dispatch failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dispatch_now.wait(), timeout=interval)

    async def _dispatch(self, now: float) -> None:
        expired = await self.store.write(lambda db: orders.expire(db, now))
        if expired:
            log.warning("%d order(s) expired unfinished", expired)
        signer, live, ttl = self.signer, vms.Liveness(
            self.config.liveness.heartbeat_factor, self.config.liveness.min_timeout_s
        ), self.config.orders.ttl_s
        if signer is not None:
            restarted = await self.store.write(
                lambda db: vms.reconcile(db, signer, now, live, ttl))
            if restarted:
                log.info("resuming %d VM(s) their node paused on its own", len(restarted))
            ctx = moves.Context(signer, self.profiles, live, ttl)
            grace, since = self.config.orders.node_loss_grace_s, self.ingest.connected_since

            def move_on(db: Tx) -> list[str]:
                moves.advance(db, ctx, now)
                moves.drive(db, ctx, now)
                lost = moves.restart_lost(db, ctx, now, grace, since)
                moves.evict(db, ctx, now)
                return lost

            try:
                lost = await self.store.write(move_on)
            except Exception:  # orders already due still go out below
                log.exception("moving VMs failed this turn; trying again at the next")
                lost = []
            if lost:
                log.warning("restarting %d VM(s) of lost nodes elsewhere", len(lost))
        due = await self.store.read(lambda c: orders.due(c, now))
        sent: list[str] = []
        for item in due:
            try:
                await self.control.publish(item.node_id, item.payload, wait_s=2)
            except ControlUnavailable as exc:
                log.warning("orders wait for the broker: %s", exc)
                break
            sent.append(item.order_id)
        if sent:
            await self.store.write(lambda db: orders.mark_sent(db, sent, now))

    async def _image_service(self) -> None:
        """Images (and the CRL) for nodes: HTTPS that requires a fleet certificate not in
        the CRL."""
        cfg = self.config.images
        app = web.Application(middlewares=[json_errors])

        async def image(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            path = await self.store.read(lambda c: images.path_of(c, name))
            if path is None:
                return error(404, "not_found", f"no image {name!r}")
            return web.FileResponse(path)

        async def crl(request: web.Request) -> web.StreamResponse:
            # The fleet's revocations, for the nodes' libvirt daemons (migration over TLS).
            return web.FileResponse(self.layout.crl, headers={"Content-Type":
                                                              "application/x-pem-file"})

        app.router.add_get("/images/{name}", image)
        app.router.add_get("/crl", crl)
        runner = JsonErrorRunner(app, access_log=None)
        await runner.setup()
        tls = client_verifying_context(self.layout.pki / "api.crt", self.layout.pki / "api.key",
                                       self.layout.ca_cert, self.layout.crl)
        site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=tls)
        await site.start()
        log.info("image service on https://%s:%d", cfg.host, cfg.port)
        try:
            await self.stop.wait()
        finally:
            await runner.cleanup()

    async def _retention(self) -> None:
        r = self.config.retention
        while not self.stop.is_set():
            now, chunk, total = time.time(), 5000, 0

            def sweep(db: Tx, now: float = now, chunk: int = chunk
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
