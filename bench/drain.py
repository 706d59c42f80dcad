#!/usr/bin/env python3
"""Drain of a node with --vms VMs on libvirt test-driver hosts: time to empty (orders only).

Runs `virt8ra demo --nodes 6` in-process (demo.run.Demo: the aggregator with its
managed Mosquitto, six simulated nodes as agent processes, two of them rack servers with room
for the VMs). --vms VMs (1 vCPU, 64 MiB, no disk, placed on the rack-server profile) are
created on the first rack server (the second cordoned meanwhile). Then, for each
--parallel value, the node holding them is drained (`POST /api/v1/nodes/{id}/drain`, cold
moves: test-driver nodes run no QEMU) and the time from the request to the drain's end as
the aggregator records it (`finished_at`) is reported, with the moves' own durations; the
next value drains the other node back. Every move is three signed orders (receive at the
destination, migrate at the source, adopt at the destination).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import install_sigterm_as_interrupt, log, make_data_dir, remove_data_dir, table
from rich.console import Console

from aggregator.cli.client import ApiClient
from demo.run import Demo, free_port


def wait_running(api: ApiClient, count: int) -> None:
    deadline = time.monotonic() + 120
    while sum(v["actual_state"] == "running" for v in api.get("/api/v1/vms")["vms"]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the VMs did not all start")
        time.sleep(0.1)


def drain(api: ApiClient, node: str, dest: str, parallel: int) -> tuple[float, list[float]]:
    api.post(f"/api/v1/nodes/{dest}/uncordon", {})
    t0 = time.time()
    started = api.post(f"/api/v1/nodes/{node}/drain", {"parallel": parallel, "mode": "cold"})
    while True:
        done = api.get(f"/api/v1/nodes/{node}/drain")
        if done["id"] == started["id"] and done["state"] != "running":
            break
        time.sleep(0.01)
    if done["state"] != "done":
        raise RuntimeError(f"drain {done['state']}: {done['failed']}")
    moves = [api.get(f"/api/v1/moves/{v['move']}") for v in done["vms"]]
    return float(done["finished_at"]) - t0, [m["finished_at"] - m["created_at"] for m in moves]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=20)
    p.add_argument("--parallel", default="1,4,10", help="comma-separated values to run")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    install_sigterm_as_interrupt()
    root = make_data_dir("drain")
    demo = Demo(root / "demo", 6, free_port(), 0, 2.0, Console(stderr=True))
    try:
        api = demo.start()
        demo.wait_online(api)
        first, second = (n.id for n in demo.nodes if n.profile == "rack-server")
        api.post(f"/api/v1/nodes/{second}/cordon", {})
        log(f"creating {args.vms} VMs on {first}")
        for i in range(args.vms):
            api.post("/api/v1/vms", {"name": f"drain-{i}", "vcpus": 1, "memory_mib": 64,
                                     "placement": {"profile": "rack-server"}})
        wait_running(api, args.vms)
        rows, holder, other = [], first, second
        for parallel in (int(x) for x in args.parallel.split(",")):
            took, each = drain(api, holder, other, parallel)
            wait_running(api, args.vms)
            on_other = api.get("/api/v1/vms", node=other)["vms"]
            if len(on_other) != args.vms:
                raise RuntimeError(f"{len(on_other)} VMs on {other} after the drain")
            log(f"parallel {parallel}: {took:.2f} s")
            rows.append([str(parallel), str(args.vms), f"{took:.2f}",
                         f"{args.vms / took:.1f}", f"{statistics.median(each) * 1000:.0f}",
                         f"{max(each) * 1000:.0f}"])
            holder, other = other, holder
        print(table(["parallel", "VMs", "time to empty s", "VMs/s", "move p50 ms",
                     "move max ms"], rows))
        return 0
    finally:
        demo.stop()
        if not args.keep:
            remove_data_dir(root)


if __name__ == "__main__":
    sys.exit(main())
