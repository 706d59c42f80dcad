"""``virt8ra-agent run``: one TaskGroup of named tasks (telemetry, libvirt events, uplink).

The agent keeps sampling while the uplink is down: everything goes through the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import time
from collections.abc import Callable

from agent import __version__
from agent.config import AgentConfig
from agent.host import images
from agent.host.hypervisor import DomainEvent, Hypervisor, HypervisorError
from agent.host.sampler import HostSampler
from agent.identity import libvirttls
from agent.identity.certificates import Identity, IdentityError, IdentityExpired
from agent.orders.journal import Journal
from agent.orders.runner import (
    Migration,
    NodeLimits,
    OrderRunner,
    Settings,
    Storage,
    load_verify_key,
)
from agent.spool import Dropped, Spool
from agent.uplink import Uplink, UplinkSettings
from contract.profiles import Reservations, default_profiles_dir, load_profile
from contract.wire import (
    Certificate,
    GuestSample,
    HostSample,
    Inventory,
    LifecycleEvent,
    Message,
    Order,
    Telemetry,
    TelemetryGap,
    encode,
)
from plumbing import sdnotify
from plumbing.configfile import ConfigError
from plumbing.tls import client_context

log = logging.getLogger("virt8ra.agent")
CONTACT_EVERY_S = 5.0  # how often the journal learns that the aggregator is in reach
QEMU_GROUP = "libvirt-qemu"  # QEMU reads its migration TLS key as this group
LIBVIRT_CRL_EVERY_S = 300.0  # how often libvirt's copy of the fleet's CRL is renewed


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.spool = Spool(config.telemetry.spool_path, config.telemetry.spool_max_messages)
        self.sampler = HostSampler()
        self.hypervisor: Hypervisor | None = None
        self._libvirt_given: tuple[str | None, str] | None = None  # (CRL, certificate)
        self._inventory: Inventory | None = None
        # None is the stop sentinel.
        self._events: asyncio.Queue[DomainEvent | None] = asyncio.Queue(maxsize=10_000)
        c = config.broker
        # Made anew for each connection: the certificate is renewed while the agent runs.
        self._tls = lambda: client_context(c.ca_file, c.cert_file, c.key_file)
        self.uplink = Uplink(
            UplinkSettings(
                node=config.node.id,
                host=c.host,
                port=c.port,
                tls=self._tls,
                keepalive_s=c.keepalive_s,
                connect_timeout_s=c.connect_timeout_s,
                backoff_initial_s=c.backoff_initial_s,
                backoff_max_s=c.backoff_max_s,
                interval_s=config.telemetry.interval_s,
                batch=config.telemetry.publish_batch,
                lease_s=config.orders.lease_s,
            ),
            self.spool,
            self.inventory,
            self._on_message,
        )
        self.identity = Identity(config.node.id, c.cert_file, c.key_file, c.ca_file,
                                 lambda make: self._append("events", make),
                                 self._libvirt_tls)
        o = config.orders
        self.journal = Journal(o.journal_path)
        self.orders = OrderRunner(
            settings=Settings(
                node=config.node.id,
                limits=NodeLimits(config.node.country, config.node.provider,
                                  _reservations(config)),
                storage=Storage(o.images_dir, o.disks_dir, o.images_url, o.shutdown_timeout_s,
                                config.libvirt.domain_type),
                migration=Migration(config.libvirt.migration_address,
                                    config.libvirt.migration_transport),
                lease_s=o.lease_s,
            ),
            key=load_verify_key(o.signing_key_file),
            journal=self.journal,
            hypervisor=lambda: self.hypervisor,
            tls=self._tls,
            report=lambda make: self._append("events", make),
        )

    def inventory(self) -> Inventory:
        assert self._inventory is not None, "inventory is read before the uplink starts"
        return self._inventory

    def _on_message(self, msg: Message, payload: bytes) -> None:
        if isinstance(msg, Certificate):
            self.identity.on_certificate(msg)
        elif isinstance(msg, Order):
            self.orders.submit(msg, payload)
        else:
            log.warning("ignored a %s message on the orders topic", msg.TYPE)

    def request_stop(self) -> None:
        self.stop.set()
        self.uplink.wake()
        with contextlib.suppress(asyncio.QueueFull):  # then the forwarder sees stop itself
            self._events.put_nowait(None)

    async def run(self) -> None:
        await self.identity.check()  # an expired certificate: nothing here can fix that
        o = self.config.orders
        for key, where in (("images_dir", o.images_dir), ("disks_dir", o.disks_dir)):
            try:  # first: they may share the spool's parent, which QEMU must pass too
                await asyncio.to_thread(images.passable_dir, where)
            except (OSError, images.ImageError) as exc:
                raise ConfigError("agent config", f"orders.{key}", str(exc)) from None
        await self.spool.open()
        await self.journal.open()
        # Read before anything touches it: how long the node was out of touch counts.
        self.orders.contact_at_start = await self.journal.last_contact()
        try:
            await self._connect_hypervisor()
            sdnotify.notify("READY=1")
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._telemetry(), name="telemetry")
                tg.create_task(self._forward_events(), name="libvirt-events")
                tg.create_task(self.uplink.run(self.stop), name="uplink")
                tg.create_task(self._keep_identity(), name="identity")
                tg.create_task(self.orders.run(self.stop), name="orders")
                tg.create_task(self._lease(), name="lease")
                tg.create_task(self._keep_libvirt_tls(), name="libvirt-tls")
        finally:
            sdnotify.notify("STOPPING=1")
            if self.hypervisor is not None:
                self.hypervisor.close()
            await self.journal.close()
            await self.spool.close()

    async def _lease(self) -> None:
        """Self-fencing: cut off from the broker past ``orders.lease_s``, pause the guests
        (once per outage); they resume when the aggregator orders them started. The time of
        the last contact is kept in the journal, so an outage counts across restarts."""
        lease = self.config.orders.lease_s
        if not lease:
            return
        last = self.orders.contact_at_start
        offline_before = max(0.0, time.time() - last) if last is not None else 0.0
        fenced_for: float | None = None  # the outage (its down_since) the guests were paused for
        touched, seen = -CONTACT_EVERY_S, 0
        while not self.stop.is_set():
            up = self.uplink
            down, connects, now = up.down_since, up.connects, time.monotonic()
            if down is None:
                if now - touched >= CONTACT_EVERY_S:
                    touched = now
                    await self.journal.touch_contact(time.time())
            else:
                if connects != seen:  # a session came and went since the last look
                    await self.journal.touch_contact(time.time() - (now - down))
                cut_off = now - down + (0.0 if connects else offline_before)
                if fenced_for != down and cut_off > lease:
                    paused, failed = await self.orders.fence()
                    if not failed:  # else: again at the next look
                        fenced_for = down
                    log.warning("cut off for more than %.0f s: paused %d guest(s) until the"
                                " aggregator says otherwise%s", lease, paused,
                                f"; {failed} could not be paused yet" if failed else "")
            seen = connects
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=min(1.0, lease / 4))

    async def _libvirt_tls(self) -> None:
        """libvirt's and QEMU's TLS files from this node's certificate and the fleet's CRL,
        and libvirtd told to reload them: live migration between nodes runs on the fleet's
        own CA, and a revoked node's certificate opens no libvirtd. Only for a node that
        takes migrations over TLS; a failure is logged (migration fails, the rest goes on).
        Without a fresh CRL the one written before stays; nothing new, nothing written."""
        lv, c = self.config.libvirt, self.config.broker
        if not lv.migration_address or lv.migration_transport != "tls":
            return
        crl_file = lv.tls_dir / "CA" / "cacrl.pem"
        try:
            crl: str | None = await images.fetch_crl(self.config.orders.images_url, self._tls)
        except images.ImageError as exc:
            log.warning("%s; libvirt keeps the CRL it has", exc)
            crl = crl_file.read_text() if crl_file.exists() else None
        try:
            group = grp.getgrnam(QEMU_GROUP).gr_gid if os.geteuid() == 0 else None
        except KeyError:
            group = None

        def write() -> tuple[str, str | None] | None:
            ca, cert, key = c.ca_file.read_text(), c.cert_file.read_text(), c.key_file.read_text()
            if (crl, cert) == self._libvirt_given:
                return None
            libvirttls.write_tls_files(lv.tls_dir, ca_pem=ca, cert_pem=cert, key_pem=key,
                                       crl_pem=crl, layout="system")
            libvirttls.write_tls_files(lv.tls_dir / "qemu", ca_pem=ca, cert_pem=cert,
                                       key_pem=key, crl_pem=crl, layout="qemu",
                                       key_group=group)
            return cert, libvirttls.reload_tls(lv.admin_uri)

        try:
            done = await asyncio.to_thread(write)
        except (OSError, ValueError) as exc:
            log.error("cannot write libvirt's TLS files under %s: %s", lv.tls_dir, exc)
            return
        if done is None:
            return
        cert, failed = done
        if failed:
            log.error("libvirtd did not reload its TLS files: %s", failed)
            return
        self._libvirt_given = (crl, cert)
        log.info("libvirt's TLS files under %s: this node's certificate%s", lv.tls_dir,
                 " and the fleet's CRL" if crl else "")

    async def _keep_libvirt_tls(self) -> None:
        """At start, then every few minutes: the CRL changes when a node is revoked (and a
        renewal rewrites the files itself). In a task of its own: an unreachable aggregator
        does not hold the agent's start up."""
        while not self.stop.is_set():
            await self._libvirt_tls()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=LIBVIRT_CRL_EVERY_S)

    async def _keep_identity(self) -> None:
        try:
            await self.identity.run(self.stop)
        except IdentityExpired:
            raise  # the daemon stops and says what to do
        except IdentityError as exc:  # e.g. an unreadable certificate: keep the rest going
            log.error("certificate renewal stopped: %s", exc)

    async def _connect_hypervisor(self) -> None:
        hv = await Hypervisor.open(self.config.libvirt.uri)
        self._inventory = await hv.inventory(__version__, self.config.node.profile)
        hv.watch_lifecycle(self._on_domain_event)
        self.hypervisor = hv

    def _on_domain_event(self, event: DomainEvent) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            log.error("lifecycle event queue full; dropped event for %s", event.vm_name)

    async def _append(self, channel: str, make: Callable[[int], bytes]) -> None:
        dropped = await self.spool.append(channel, make)
        if dropped is not None:
            await self._report_drop(dropped)
        self.uplink.wake()

    async def _report_drop(self, dropped: Dropped) -> None:
        log.warning("spool full: dropped %s %d..%d", dropped.channel, dropped.first_seq,
                    dropped.last_seq)
        node = self.config.node.id
        await self.spool.append(
            "events",
            lambda seq: encode(
                TelemetryGap(
                    node=node,
                    seq=seq,
                    ts=time.time(),
                    first_seq=dropped.first_seq,
                    last_seq=dropped.last_seq,
                    reason="agent spool full",
                    channel=dropped.channel,
                )
            ),
        )

    async def _telemetry(self) -> None:
        interval = self.config.telemetry.interval_s
        watchdog = sdnotify.watchdog_interval_s()
        node = self.config.node.id
        next_at = time.monotonic()
        while not self.stop.is_set():
            host = self.sampler.sample()
            guests = await self._guest_samples()
            make = _telemetry(node, time.time(), interval, host, guests)
            await self._append("telemetry", make)
            if watchdog is not None:
                sdnotify.notify("WATCHDOG=1")
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspend, overload): do not burst to catch up
                next_at, delay = time.monotonic(), 0
            if watchdog is not None:
                delay = min(delay, watchdog)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=delay)

    async def _guest_samples(self) -> tuple[GuestSample, ...]:
        hv = self.hypervisor
        if hv is None:
            return ()
        try:
            return await hv.guest_samples()
        except HypervisorError as exc:
            log.warning("guest figures unavailable: %s", exc)
            if not hv.alive():
                await self._reconnect_hypervisor()
            return ()

    async def _reconnect_hypervisor(self) -> None:
        if self.hypervisor is not None:
            self.hypervisor.close()
            self.hypervisor = None
        try:
            await self._connect_hypervisor()
            log.info("reconnected to libvirt at %s", self.config.libvirt.uri)
        except HypervisorError as exc:
            log.warning("libvirt still unreachable: %s", exc)

    async def _forward_events(self) -> None:
        node = self.config.node.id
        while (ev := await self._events.get()) is not None and not self.stop.is_set():
            await self._append(
                "events",
                lambda seq: encode(
                    LifecycleEvent(
                        node=node, seq=seq, ts=ev.ts, vm_uuid=ev.vm_uuid, vm_name=ev.vm_name,
                        event=ev.event, detail=ev.detail, state=ev.state,
                    )
                ),
            )


def _reservations(config: AgentConfig) -> Reservations:
    """The host's own share from its hardware profile (none if the profile is unknown)."""
    if not config.node.profile:
        return Reservations()
    try:
        return load_profile(default_profiles_dir() / f"{config.node.profile}.toml").reserved
    except (OSError, ConfigError) as exc:
        log.warning("hardware profile %s unreadable (%s): no host reservation",
                    config.node.profile, exc)
        return Reservations()


def _telemetry(node: str, ts: float, interval: float, host: HostSample,
               guests: tuple[GuestSample, ...]) -> Callable[[int], bytes]:
    def make(seq: int) -> bytes:
        return encode(Telemetry(node=node, seq=seq, ts=ts, interval_s=interval, host=host,
                                guests=guests))

    return make


def run(config: AgentConfig) -> None:
    """Run the agent until SIGTERM or SIGINT; raises IdentityExpired when the node's
    certificate has expired (only a new enrollment helps)."""

    async def main() -> None:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        try:
            await agent.run()
        except* IdentityExpired as group:
            raise group.exceptions[0] from None

    asyncio.run(main())
