"""The hypervisor module against libvirt's test driver, hosts made from the hardware profiles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.host import simhost
from agent.host.hypervisor import (
    DomainEvent,
    Hypervisor,
    HypervisorError,
    domain_type_from_capabilities,
    guest_sample,
)
from contract.profiles import Profile

DATA = Path(__file__).parents[2] / "data"


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


def test_domain_type_comes_from_capabilities() -> None:
    kvm_host = (DATA / "capabilities-kvm.xml").read_text()
    assert domain_type_from_capabilities(kvm_host) == "kvm"
    tcg_only = kvm_host.replace("<domain type='kvm'/>", "")
    assert domain_type_from_capabilities(tcg_only) == "qemu"
    assert domain_type_from_capabilities("<not xml") == "unknown"


def test_guest_sample_from_a_real_qemu_stats_record() -> None:
    # One record of getAllDomainStats() from a QEMU guest with a disk and a NIC.
    stats = {
        "state.state": 1, "state.reason": 1, "cpu.time": 5_000_000_000, "cpu.user": 1,
        "balloon.current": 131072, "balloon.maximum": 131072, "balloon.rss": 90000,
        "vcpu.current": 1, "vcpu.maximum": 1, "vcpu.0.state": 1, "vcpu.0.time": 4_000_000_000,
        "net.count": 1, "net.0.name": "vnet0", "net.0.rx.bytes": 1200, "net.0.rx.pkts": 10,
        "net.0.tx.bytes": 800, "net.0.tx.pkts": 8,
        "block.count": 1, "block.0.name": "vda", "block.0.rd.bytes": 4096,
        "block.0.rd.reqs": 2, "block.0.wr.bytes": 512, "block.0.wr.reqs": 1,
        "block.0.capacity": 67108864, "block.0.allocation": 200704,
    }
    g = guest_sample("uuid-1", "cam-7", stats)
    assert (g.state, g.vcpus, g.cpu_time_ns) == ("running", 1, 5_000_000_000)
    assert g.memory_max_bytes == 131072 * 1024
    assert g.balloon_rss_bytes == 90000 * 1024
    assert g.block[0].name == "vda"
    assert (g.block[0].read_bytes, g.block[0].capacity_bytes) == (4096, 67108864)
    assert (g.nics[0].name, g.nics[0].rx_bytes, g.nics[0].tx_packets) == ("vnet0", 1200, 8)
    # The test driver reports only state.*: everything else is absent, not invented.
    bare = guest_sample("uuid-2", "x", {"state.state": 5})
    assert (bare.state, bare.vcpus, bare.cpu_time_ns, bare.block) == ("shut off", None, None, ())
