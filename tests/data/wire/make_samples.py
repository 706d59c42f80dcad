"""Write the stored wire samples in this directory: the bytes a protocol-version-1 peer sends.

The samples are built from plain dicts and msgpack, never from ``contract.wire``: they state what
was on the wire, independently of the code that reads it today.
``tests/contract/test_wire.py`` decodes each file and compares it with a dataclass value
written out in the test.

    python tests/data/wire/make_samples.py              # write the samples that are missing
    python tests/data/wire/make_samples.py --overwrite  # rewrite all (see README.md first)

Existing files are kept unless ``--overwrite`` is given: once committed, a sample's bytes are
part of the contract.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import msgpack

HERE = Path(__file__).resolve().parent

NODE = "edge-fra-01"
VM_RUNNING = "5c0f8a5e-2f6b-4a53-9b2e-0d6f6c0f4a11"
VM_STOPPED = "9a3d2c41-7e1b-4c6f-8a0d-3b5e7f9c1d22"
ORDER_ID = "ord-20241122-0001"
# Shortened PEM blocks: the wire carries them as text; what is inside is the PKI's business.
CSR = (
    "-----BEGIN CERTIFICATE REQUEST-----\nMIIBBjCBrQIBADAWMRQwEgYDVQQDDAtlZGdlLWZyYS0wMQ==\n"
    "-----END CERTIFICATE REQUEST-----\n"
)
CERT = (
    "-----BEGIN CERTIFICATE-----\nMIIB1jCCAXygAwIBAgIUQm9ndXMgc2FtcGxlIGNlcnQ=\n"
    "-----END CERTIFICATE-----\n"
)

INVENTORY: dict[str, Any] = {
    "hostname": "edge-fra-01.example.net",
    "agent_version": "0.1.0",
    "domain_type": "kvm",
    "cpu_model": "AMD EPYC 7313P 16-Core Processor",
    "cpus": 32,
    "cpu_mhz": 3000,
    "sockets": 1,
    "cores_per_socket": 16,
    "threads_per_core": 2,
    "memory_bytes": 135_089_577_984,
    "libvirt_version": "9.0.0",
    "hypervisor": "QEMU 7.2.0",
    "profile": "epyc-7313p-128g",
}

HOST: dict[str, Any] = {
    "cpu_percent": 12.5,
    "cpu_count": 32,
    "load1": 1.25,
    "load5": 0.75,
    "load15": 0.5,
    "mem_total_bytes": 135_089_577_984,
    "mem_available_bytes": 98_765_432_832,
    "mem_used_bytes": 33_554_432_000,
    "swap_total_bytes": 8_589_934_592,
    "swap_used_bytes": 0,
    "uptime_s": 864_000.5,
    "filesystems": [
        {
            "mountpoint": "/",
            "fstype": "ext4",
            "total_bytes": 105_089_261_568,
            "used_bytes": 21_474_836_480,
            "free_bytes": 78_254_321_664,
        },
        {
            "mountpoint": "/var/lib/libvirt/images",
            "fstype": "xfs",
            "total_bytes": 3_840_755_982_336,
            "used_bytes": 1_099_511_627_776,
            "free_bytes": 2_741_244_354_560,
        },
    ],
    "disks": [
        {
            "name": "nvme0n1",
            "read_bytes": 52_428_800_000,
            "write_bytes": 157_286_400_000,
            "read_ops": 1_234_567,
            "write_ops": 7_654_321,
        },
        {
            "name": "nvme1n1",
            "read_bytes": 10_485_760,
            "write_bytes": 0,
            "read_ops": 2_560,
            "write_ops": 0,
        },
    ],
    "nics": [
        {
            "name": "eno1",
            "rx_bytes": 987_654_321_000,
            "tx_bytes": 123_456_789_000,
            "rx_packets": 901_234_567,
            "tx_packets": 345_678_901,
            "rx_errors": 0,
            "tx_errors": 0,
            "rx_drops": 17,
            "tx_drops": 0,
        },
        {
            "name": "br0",
            "rx_bytes": 4_096,
            "tx_bytes": 8_192,
            "rx_packets": 32,
            "tx_packets": 64,
            "rx_errors": 1,
            "tx_errors": 2,
            "rx_drops": 3,
            "tx_drops": 4,
        },
    ],
    "temperatures": [
        {"sensor": "k10temp", "label": "Tctl", "celsius": 48.0},
        {"sensor": "nvme", "label": "Composite", "celsius": 39.85},
    ],
}

GUEST_RUNNING: dict[str, Any] = {
    "uuid": VM_RUNNING,
    "name": "web-01",
    "state": "running",
    "vcpus": 4,
    "cpu_time_ns": 3_600_000_000_000,
    "memory_max_bytes": 8_589_934_592,
    "balloon_current_bytes": 8_589_934_592,
    "balloon_rss_bytes": 4_294_967_296,
    "block": [
        {
            "name": "vda",
            "read_bytes": 1_073_741_824,
            "write_bytes": 2_147_483_648,
            "read_ops": 65_536,
            "write_ops": 131_072,
            "capacity_bytes": 53_687_091_200,
            "allocation_bytes": 12_884_901_888,
        },
        {
            "name": "sda",
            "read_bytes": 512,
            "write_bytes": 0,
            "read_ops": 1,
            "write_ops": 0,
            "capacity_bytes": None,
            "allocation_bytes": None,
        },
    ],
    "nics": [
        {
            "name": "vnet0",
            "rx_bytes": 734_003_200,
            "tx_bytes": 209_715_200,
            "rx_packets": 524_288,
            "tx_packets": 262_144,
        },
    ],
}

GUEST_STOPPED: dict[str, Any] = {
    "uuid": VM_STOPPED,
    "name": "batch-07",
    "state": "shutoff",
    "vcpus": None,
    "cpu_time_ns": None,
    "memory_max_bytes": None,
    "balloon_current_bytes": None,
    "balloon_rss_bytes": None,
    "block": [],
    "nics": [],
}

# One envelope per message type, fields in dataclass order, then "v" and "t" (as encode writes).
V1: dict[str, dict[str, Any]] = {
    "status": {
        "node": NODE,
        "state": "online",
        "ts": 1_732_243_200.25,
        "interval_s": 10.0,
        "inventory": INVENTORY,
        "v": 1,
        "t": "status",
    },
    "telemetry": {
        "node": NODE,
        "seq": 4_711,
        "ts": 1_732_243_210.5,
        "interval_s": 10.0,
        "host": HOST,
        "guests": [GUEST_RUNNING, GUEST_STOPPED],
        "v": 1,
        "t": "telemetry",
    },
    "lifecycle": {
        "node": NODE,
        "seq": 4_712,
        "ts": 1_732_243_211.75,
        "vm_uuid": VM_RUNNING,
        "vm_name": "web-01",
        "event": "started",
        "detail": "booted",
        "state": "running",
        "v": 1,
        "t": "lifecycle",
    },
    "telemetry_gap": {
        "node": NODE,
        "seq": 4_713,
        "ts": 1_732_243_212.0,
        "first_seq": 1_001,
        "last_seq": 1_480,
        "reason": "spool full",
        "v": 1,
        "t": "telemetry_gap",
    },
    "order": {
        "node": NODE,
        "seq": 17,
        "order_id": ORDER_ID,
        "issued_at": 1_732_243_300.0,
        "expires_at": 1_732_243_360.0,
        "action": "vm.start",
        "params": {"vm_uuid": VM_RUNNING, "vcpus": 4, "cpu_weight": 0.5, "autostart": True},
        "signature": bytes(range(64)),
        "v": 1,
        "t": "order",
    },
    "report": {
        "node": NODE,
        "seq": 4_714,
        "ts": 1_732_243_301.5,
        "order_id": ORDER_ID,
        "state": "done",
        "result": {"domain_id": 7, "state": "running", "boot_ms": 812.5, "autostart": True},
        "error": "",
        "v": 1,
        "t": "report",
    },
    "renew_request": {
        "node": NODE,
        "seq": 4_716,
        "ts": 1_732_243_600.0,
        "csr": CSR,
        "not_after": 1_732_502_800.0,
        "v": 1,
        "t": "renew_request",
    },
    "certificate": {
        "node": NODE,
        "ts": 1_732_243_601.0,
        "certificate": CERT,
        "not_after": 1_732_848_401.0,
        "v": 1,
        "t": "certificate",
    },
}


def _newer_peer_telemetry() -> dict[str, Any]:
    """Telemetry from a newer version-1 peer: extra keys at every level, all to be ignored."""
    body = {**V1["telemetry"], "power_watts": 212.5, "labels": {"rack": "r12"}}
    body["host"] = {**HOST, "psi": {"cpu_some_avg10": 0.5}}
    body["host"]["nics"] = [{**HOST["nics"][0], "speed_mbps": 25_000}, HOST["nics"][1]]
    body["guests"] = [{**GUEST_RUNNING, "tags": ["web", "prod"]}, GUEST_STOPPED]
    return body


SAMPLES: dict[str, dict[str, Any]] = {
    **{f"v1_{kind}.msgpack": body for kind, body in V1.items()},
    # An older or terser peer: only the required fields, defaults fill in the rest.
    "v1_status_minimal.msgpack": {
        "v": 1,
        "t": "status",
        "node": NODE,
        "state": "offline",
        "ts": 1_732_243_400.0,
    },
    "v1_telemetry_newer_peer.msgpack": _newer_peer_telemetry(),
    # A gap on the events channel: "channel" joined TelemetryGap after the first samples.
    "v1_telemetry_gap_events.msgpack": {
        "node": NODE,
        "seq": 4_715,
        "ts": 1_732_243_500.0,
        "first_seq": 4_600,
        "last_seq": 4_699,
        "reason": "spool full",
        "channel": "events",
        "v": 1,
        "t": "telemetry_gap",
    },
    # An order that creates a VM (the "vm" spec joined Order after the first samples).
    "v1_order_create.msgpack": {
        "node": NODE,
        "seq": 18,
        "order_id": "ord-20241122-0002",
        "issued_at": 1_732_243_700.0,
        "expires_at": 1_732_244_000.0,
        "action": "create",
        "params": {},
        "signature": bytes(range(64)),
        "vm": {
            "uuid": VM_RUNNING,
            "name": "cam-7",
            "vcpus": 1,
            "memory_mib": 256,
            "disk_gib": 1,
            "image": "tiny",
            "image_sha256": "ab" * 32,
            "kernel": "",
            "kernel_sha256": "",
            "initrd": "",
            "initrd_sha256": "",
            "cmdline": "",
            "countries": ["SI", "AT"],
            "providers": [],
        },
        "v": 1,
        "t": "order",
    },
    # A status naming the host's arch in its inventory and the node's lease (both joined
    # after the first samples).
    "v1_status_arch.msgpack": {
        "node": NODE,
        "state": "online",
        "ts": 1_732_243_800.0,
        "interval_s": 10.0,
        "inventory": {**INVENTORY, "arch": "aarch64"},
        "lease_s": 60.0,
        "v": 1,
        "t": "status",
    },
    # A peer on a protocol version this code does not speak.
    "v2_status.msgpack": {**V1["status"], "v": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing samples too")
    args = parser.parse_args()
    for name, body in SAMPLES.items():
        path = HERE / name
        if path.exists() and not args.overwrite:
            print(f"kept    {path.name}")
            continue
        path.write_bytes(msgpack.packb(body, use_bin_type=True))
        print(f"wrote   {path.name}")


if __name__ == "__main__":
    main()
