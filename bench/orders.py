#!/usr/bin/env python3
"""Order latency: API request → the agent's `succeeded` report stored, on a libvirt test-driver
node, beside the same libvirt calls made directly (our overhead is the difference).

Initialises an aggregator in a fresh /tmp/bench-orders-* data dir, runs `serve` (its managed
Mosquitto is the broker), enrolls one simulated node (rack-server: room for 200 VMs) through
the real enrollment and runs its agent. Then, one at a time, --count VMs are created
(`POST /api/v1/vms`, 64 MiB, no disk) and the time from sending the request to the
aggregator storing the node's `succeeded` report is read from the order's own history (both
clocks are this machine's). Then each is
stopped and started again the same way. The direct path: the same domain XML defined and
started (and then shut down and started) through agent.host.hypervisor on a fresh test-driver host
made from the same profile. Reported: p50, p90, p99, max per path, and the overhead
(ours minus direct) at p50 and p99. Target: overhead p99 under 50 ms.
Everything started here is stopped by pid at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import (
    Children,
    install_sigterm_as_interrupt,
    log,
    make_data_dir,
    remove_data_dir,
    table,
)

from agent.host.domainxml import domain_xml
from agent.host.hypervisor import Hypervisor
from agent.host.simhost import host_xml
from aggregator.cli.client import ApiClient
from contract.profiles import default_profiles_dir, load_profile
from contract.wire import VmSpec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(name: str, values: list[float]) -> list[str]:
    return [name, str(len(values))] + [f"{pct(values, p) * 1000:.1f}" for p in (50, 90, 99)] \
        + [f"{max(values) * 1000:.1f}"]


def finished_at(order: dict[str, object]) -> float:
    history = order["history"]
    assert isinstance(history, list)
    return float(next(h["ts"] for h in history if h["state"] == "succeeded"))


def wait_done(api: ApiClient, order_id: str) -> dict[str, object]:
    while True:
        order: dict[str, object] = api.get(f"/api/v1/orders/{order_id}")
        if order["state"] in ("succeeded", "failed", "expired"):
            if order["state"] != "succeeded":
                raise RuntimeError(f"order {order_id} {order['state']}: {order['error']}")
            return order
        time.sleep(0.002)


def through_the_stack(api: ApiClient, count: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create": [], "stop": [], "start": []}
    ids = []
    for i in range(count):
        t0 = time.time()
        made = api.post("/api/v1/vms", {"name": f"bench-{i}", "vcpus": 1, "memory_mib": 64})
        out["create"].append(finished_at(wait_done(api, made["order"])) - t0)
        ids.append(made["id"])
    for action in ("stop", "start"):
        for vm_id in ids:
            t0 = time.time()
            order = api.post(f"/api/v1/vms/{vm_id}/{action}", {})["order"]
            out[action].append(finished_at(wait_done(api, order)) - t0)
    return out


async def direct(count: int, work: Path) -> dict[str, list[float]]:
    profile = load_profile(default_profiles_dir() / "rack-server.toml")
    host = work / "direct-host.xml"
    host.write_text(host_xml(profile, "direct"))
    hv = await Hypervisor.open("test://" + str(host.resolve()), events=False)
    out: dict[str, list[float]] = {"create": [], "stop": [], "start": []}
    uuids = []
    try:
        for i in range(count):
            spec = VmSpec(uuid=str(uuid.uuid4()), name=f"direct-{i}", vcpus=1, memory_mib=64)
            t0 = time.perf_counter()
            await hv.define(domain_xml(spec, domain_type="test"))
            await hv.start(spec.uuid)
            out["create"].append(time.perf_counter() - t0)
            uuids.append(spec.uuid)
        for vm_uuid in uuids:
            t0 = time.perf_counter()
            await hv.shutdown(vm_uuid, 30)
            out["stop"].append(time.perf_counter() - t0)
        for vm_uuid in uuids:
            t0 = time.perf_counter()
            await hv.start(vm_uuid)
            out["start"].append(time.perf_counter() - t0)
    finally:
        hv.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    install_sigterm_as_interrupt()
    root = make_data_dir("orders")
    children = Children()
    try:
        api_port, broker_port, images_port = free_port(), free_port(), free_port()
        py = sys.executable
        subprocess.run([py, "-m", "aggregator", "init", "--data-dir", str(root / "agg"),
                        "--api-port", str(api_port), "--broker-port", str(broker_port),
                        "--images-port", str(images_port)], check=True, capture_output=True)
        logs = root / "logs"
        logs.mkdir()
        children.add("aggregator", subprocess.Popen(
            [py, "-m", "aggregator", "serve", "--data-dir", str(root / "agg")],
            stdout=(logs / "aggregator.log").open("wb"), stderr=subprocess.STDOUT))
        token = (root / "agg" / "admin-token").read_text().strip()
        api = ApiClient(f"http://127.0.0.1:{api_port}", token)
        deadline = time.monotonic() + 60
        while True:
            try:
                api.get("/healthz")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        grant = api.post("/api/v1/enrollment-tokens", {
            "site": "ljubljana-tower-7", "country": "SI", "provider": "telekom-slovenije",
            "profile": "rack-server"})
        home = root / "node"
        subprocess.run([py, "-m", "agent", "enroll", "--aggregator", api.base_url,
                        "--token", grant["token"], "--ca-fingerprint", grant["ca_fingerprint"],
                        "--node-id", "si-bench-01", "--config-dir", str(home / "etc"),
                        "--state-dir", str(home / "state"), "--simulate", "rack-server",
                        "--interval", "10"], check=True, capture_output=True)
        children.add("agent", subprocess.Popen(
            [py, "-m", "agent", "run", "--config", str(home / "etc" / "agent.toml")],
            stdout=(logs / "agent.log").open("wb"), stderr=subprocess.STDOUT))
        while api.get("/api/v1/nodes/si-bench-01")["status"] != "online":
            time.sleep(0.2)
        log(f"creating, stopping and starting {args.count} VMs through the stack")
        ours = through_the_stack(api, args.count)
        log("the same libvirt calls made directly")
        with tempfile.TemporaryDirectory() as work:
            mine = asyncio.run(direct(args.count, Path(work)))
        rows = []
        for action in ("create", "stop", "start"):
            rows.append(summary(f"{action}: API → succeeded", ours[action]))
            rows.append(summary(f"{action}: libvirt directly", mine[action]))
        print(table(["path", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
        over = []
        for action in ("create", "stop", "start"):
            over.append([action,
                         f"{(pct(ours[action], 50) - pct(mine[action], 50)) * 1000:.1f}",
                         f"{(pct(ours[action], 99) - pct(mine[action], 99)) * 1000:.1f}",
                         f"{statistics.mean(ours[action]) * 1000:.1f}"])
        print(table(["action", "overhead p50 ms", "overhead p99 ms", "ours mean ms"], over))
        print(json.dumps({a: {"ours_p99_ms": pct(ours[a], 99) * 1000,
                              "direct_p99_ms": pct(mine[a], 99) * 1000} for a in ours}))
        return 0
    finally:
        children.stop_all()
        if not args.keep:
            remove_data_dir(root)


if __name__ == "__main__":
    sys.exit(main())
