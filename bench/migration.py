#!/usr/bin/env python3
"""Live migration of the tiny guest: virt8ra's order request → move done, beside a plain
`virsh migrate --live` between the same two libvirt hosts in the same run.

Runs `virt8ra demo --real` in-process (demo.run.Demo, real mode; root): two libvirt
hosts in network namespaces (demo.tworig) enrolled as two nodes whose libvirt daemons
migrate over TLS with the fleet's certificates, and the tiny TCG guest `demo-1` on the first.
Then --rounds times there and back:

* ours: `POST /api/v1/vms/demo-1/migrate` (live, defaults: 500 ms max downtime,
  auto-converge, data over TLS) until `GET /api/v1/moves/{id}` says it ended; the time is from
  sending the request to the aggregator recording the end (`finished_at`, this machine's
  clock), and the downtime is the migrate order's result (QEMU's, read by the source).
* plain virsh: a second tiny guest defined straight on the hosts (same XML shape, memory and
  TLS transport), moved with `virsh -c <source> migrate --live --p2p --persistent
  --undefinesource --tls --auto-converge <vm> qemu+tls://<dest>/system`; the time is the
  command's wall time, the downtime `virsh domjobinfo --completed` at the destination.

Reported: p50 and max of each, ours minus virsh, and how much of ours is the libvirt migrate
call itself (its `duration_ms`) and how much the rest of the stack. Target: ours within 1 s
of plain virsh, downtime no worse. Everything is stopped at the end (the demo tears the hosts down).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _common import install_sigterm_as_interrupt, log, make_data_dir, remove_data_dir, table
from rich.console import Console

from agent.host.domainxml import domain_xml
from aggregator.cli.client import ApiClient
from contract.wire import VmSpec
from demo.guestimage import build_tiny_guest
from demo.run import REAL_NODES, REAL_VM, Demo, free_port
from demo.tworig import Host

OURS_CALL: list[float] = []  # the libvirt migrate call's own wall time in each of our moves


def ours(api: ApiClient, to: str) -> tuple[float, float]:
    t0 = time.time()
    move = api.post(f"/api/v1/vms/{REAL_VM}/migrate", {"to": to})
    while True:
        done = api.get(f"/api/v1/moves/{move['move']}")
        if done["finished_at"] is not None:
            break
        time.sleep(0.01)
    if done["state"] != "succeeded":
        raise RuntimeError(f"move {move['move']} {done['state']}: {done['error']}")
    OURS_CALL.append(done["result"]["duration_ms"] / 1000)
    return float(done["finished_at"]) - t0, float(done["result"]["downtime_ms"])


def plain(src: Host, dst: Host, vm: str) -> tuple[float, float]:
    t0 = time.monotonic()
    subprocess.run(["virsh", "-q", "-c", src.uri, "migrate", "--live", "--p2p", "--persistent",
                    "--undefinesource", "--tls", "--auto-converge", vm,
                    dst.tls_migration_uri], check=True, capture_output=True, text=True)
    took = time.monotonic() - t0
    info = subprocess.run(["virsh", "-c", dst.uri, "domjobinfo", "--completed", vm],
                          check=True, capture_output=True, text=True).stdout
    found = re.search(r"Total downtime:\s+(\d+)\s+ms", info)
    return took, float(found.group(1)) if found else float("nan")


def plain_guest(demo: Demo, shared: Path) -> str:
    """The tiny guest defined and started on the first host directly, its files at paths
    both hosts see."""
    assert demo.rig is not None
    guest = build_tiny_guest(Path("/var/cache/virt8ra/tiny-guest"))
    kernel, initrd = shared / "vmlinuz", shared / "initrd.img"
    shutil.copyfile(guest.kernel, kernel)
    shutil.copyfile(guest.initrd, initrd)
    spec = VmSpec(uuid=str(uuid.uuid4()), name="plain-1", vcpus=1, memory_mib=128)
    xml = shared / "plain-1.xml"
    xml.write_text(domain_xml(spec, domain_type="qemu", kernel=kernel, initrd=initrd,
                              serial_log=shared / "plain-1.serial.log"))
    uri = demo.rig.hosts[0].uri
    subprocess.run(["virsh", "-q", "-c", uri, "define", str(xml)], check=True,
                   capture_output=True)
    subprocess.run(["virsh", "-q", "-c", uri, "start", spec.name], check=True,
                   capture_output=True)
    return spec.name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="there-and-back trips per path")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    install_sigterm_as_interrupt()
    root = make_data_dir("migration")
    demo = Demo(root / "demo", 2, free_port(), 0, 2.0, Console(stderr=True), real=True)
    try:
        api = demo.start()
        assert demo.rig is not None
        a, b = demo.rig.hosts
        shared = demo.rig.shared_dir
        vm = plain_guest(demo, shared)
        log("both guests boot (software emulation)")
        time.sleep(10)
        results: dict[str, list[tuple[float, float]]] = {"ours": [], "virsh": []}
        for i in range(args.rounds):
            for dest in (REAL_NODES[1].id, REAL_NODES[0].id):
                results["ours"].append(ours(api, dest))
            results["virsh"].append(plain(a, b, vm))
            results["virsh"].append(plain(b, a, vm))
            log(f"round {i + 1}: ours {results['ours'][-2:]}, virsh {results['virsh'][-2:]}")
        rows = []
        for name, got in results.items():
            times, downs = [t for t, _ in got], [d for _, d in got]
            rows.append([name, str(len(got)), f"{statistics.median(times) * 1000:.0f}",
                         f"{max(times) * 1000:.0f}", f"{statistics.median(downs):.0f}",
                         f"{max(downs):.0f}"])
        print(table(["path", "moves", "total p50 ms", "total max ms", "downtime p50 ms",
                     "downtime max ms"], rows))
        ours_t = statistics.median(t for t, _ in results["ours"])
        virsh_t = statistics.median(t for t, _ in results["virsh"])
        spent = [t - call for (t, _), call in zip(results["ours"], OURS_CALL, strict=True)]
        print(f"\nours: the libvirt migrate call p50 {statistics.median(OURS_CALL) * 1000:.0f}"
              f" ms; the rest (receive, adopt, orders, reports) p50"
              f" {statistics.median(spent) * 1000:.0f} ms, max {max(spent) * 1000:.0f} ms")
        print(f"ours minus plain virsh, p50: {(ours_t - virsh_t) * 1000:.0f} ms "
              f"(target: under 1000 ms); downtime p50 ours "
              f"{statistics.median(d for _, d in results['ours']):.0f} ms, virsh "
              f"{statistics.median(d for _, d in results['virsh']):.0f} ms")
        return 0
    finally:
        demo.stop()
        if not args.keep:
            remove_data_dir(root)


if __name__ == "__main__":
    sys.exit(main())
