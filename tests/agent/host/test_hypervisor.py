"""The hypervisor module against libvirt's test driver, hosts made from the hardware profiles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.host import simhost
from agent.host.hypervisor import DomainEvent, Hypervisor, HypervisorError
from contract.profiles import Profile


@pytest.mark.parametrize("name", ["tower-5g", "edge-server", "rack-server"])
async def test_simulated_host_matches_its_profile(
    name: str, profiles: dict[str, Profile], tmp_path: Path
) -> None:
    profile = profiles[name]
    uri = simhost.write_host(profile, "n1", tmp_path / "host.xml")
    hv = await Hypervisor.open(uri)
    try:
        inv = await hv.inventory("0.1.0", name)
        sim = profile.simulation
        assert inv.cpus == sim.sockets * sim.cores * sim.threads
        assert inv.memory_bytes == sim.memory_mib * 2**20
        assert (inv.sockets, inv.cores_per_socket, inv.threads_per_core) == (
            sim.sockets, sim.cores, sim.threads)
        assert inv.profile == name
        assert inv.libvirt_version.count(".") == 2
        guests = await hv.guest_samples()
        assert sorted(g.name for g in guests) == [f"n1-guest-{i + 1}" for i in range(sim.guests)]
        assert {g.state for g in guests} == {"running"}
    finally:
        hv.close()


async def test_lifecycle_events_arrive_as_they_happen(
    profiles: dict[str, Profile], tmp_path: Path
) -> None:
    uri = simhost.write_host(profiles["tower-5g"], "n1", tmp_path / "host.xml")
    hv = await Hypervisor.open(uri)
    events: asyncio.Queue[DomainEvent] = asyncio.Queue()
    hv.watch_lifecycle(events.put_nowait)
    try:
        guest = (await hv.guest_samples())[0]
        await hv.change_state(guest.uuid, "suspend")
        ev = await asyncio.wait_for(events.get(), 5)
        assert (ev.vm_uuid, ev.event, ev.detail, ev.state) == (
            guest.uuid, "suspended", "paused", "paused")
        await hv.change_state(guest.uuid, "destroy")
        ev = await asyncio.wait_for(events.get(), 5)
        assert (ev.event, ev.detail, ev.state) == ("stopped", "destroyed", "shut off")
        with pytest.raises(HypervisorError) as info:
            await hv.change_state(guest.uuid, "resume")  # not running: libvirt says why
        assert info.value.code > 0
        assert "not paused" in str(info.value)
    finally:
        hv.close()


async def test_unreachable_libvirt_is_a_hypervisor_error(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError):
        await Hypervisor.open(f"test://{tmp_path}/missing.xml")


async def test_unknown_actions_are_our_bug(profiles: dict[str, Profile], tmp_path: Path) -> None:
    hv = await Hypervisor.open(simhost.write_host(profiles["tower-5g"], "n1", tmp_path / "h.xml"))
    try:
        guest = (await hv.guest_samples())[0]
        with pytest.raises(ValueError, match="unknown action 'hibernate'"):
            await hv.change_state(guest.uuid, "hibernate")
        assert await hv.state(guest.uuid) == "running"
    finally:
        hv.close()


async def test_a_migration_libvirt_refuses_leaves_the_guest_here(
    profiles: dict[str, Profile], tmp_path: Path
) -> None:
    hv = await Hypervisor.open(simhost.write_host(profiles["tower-5g"], "n1", tmp_path / "h.xml"))
    try:
        guest = (await hv.guest_samples())[0]
        assert await hv.job_stats(guest.uuid) is None  # the test driver runs no jobs
        with pytest.raises(HypervisorError) as info:  # nor peer-to-peer migrations
            await hv.migrate(guest.uuid, "test:///default", timeout_s=30)
        assert info.value.code > 0
        assert "not supported" in str(info.value)
        assert await hv.state(guest.uuid) == "running"
        assert guest.uuid in await hv.guest_names()
    finally:
        hv.close()
