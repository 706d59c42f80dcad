"""Guests' states, lifecycle events and statistics records in our names and dataclasses."""

from __future__ import annotations

import libvirt

from agent.host.guests import DomainEvent, domain_event, guest_sample, state_name


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


def test_lifecycle_events_are_named_as_virsh_names_them() -> None:
    suspended = domain_event("u1", "cam-7", libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                             libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED,
                             libvirt.VIR_DOMAIN_PAUSED, 12.5)
    assert suspended == DomainEvent("u1", "cam-7", "suspended", "paused", "paused", 12.5)
    gone = domain_event("u1", "cam-7", libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
                        libvirt.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED, None, 13.0)
    assert (gone.event, gone.detail, gone.state) == ("undefined", "removed", "unknown")
    migrated = domain_event("u1", "cam-7", libvirt.VIR_DOMAIN_EVENT_STOPPED,
                            libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED,
                            libvirt.VIR_DOMAIN_SHUTOFF, 14.0)
    assert (migrated.event, migrated.detail, migrated.state) == ("stopped", "migrated",
                                                                 "shut off")
    # A newer libvirt's event or detail this code does not know stays a number.
    newer = domain_event("u1", "cam-7", 42, 7, 99, 15.0)
    assert (newer.event, newer.detail, newer.state) == ("42", "7", "unknown")
    assert domain_event("u1", "x", libvirt.VIR_DOMAIN_EVENT_STARTED, 99, 1, 0).detail == "99"
    assert domain_event("u1", "x", libvirt.VIR_DOMAIN_EVENT_STARTED, -1, 1, 0).detail == "-1"


def test_state_names_follow_libvirt_numbers() -> None:
    assert state_name(libvirt.VIR_DOMAIN_RUNNING) == "running"
    assert state_name(libvirt.VIR_DOMAIN_SHUTOFF) == "shut off"
    assert state_name(libvirt.VIR_DOMAIN_PMSUSPENDED) == "pmsuspended"
    assert state_name(None) == "unknown"
    assert state_name(99) == "unknown"
