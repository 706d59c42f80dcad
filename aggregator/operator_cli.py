"""``virt8ra``: the operators' CLI over the REST API, and ``virt8ra demo``.

The API address and token come from ``--api``/``--token`` or ``VIRT8RA_API``/``VIRT8RA_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aggregator.client import ApiClient, ApiClientError


def _client(args: argparse.Namespace) -> ApiClient:
    token = args.token or os.environ.get("VIRT8RA_TOKEN", "")
    if not token:
        raise ApiClientError("no API token: pass --token or set VIRT8RA_TOKEN")
    return ApiClient(args.api or os.environ.get("VIRT8RA_API", "http://127.0.0.1:8480"), token)


def _ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "never"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _cmd_nodes(args: argparse.Namespace, console: Console) -> int:
    nodes = _client(args).get("/api/v1/nodes")["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    table = Table()
    for col in ("node", "status", "country", "provider", "site", "profile", "cpus", "memory",
                "last seen"):
        table.add_column(col)
    for n in nodes:
        cap = n.get("capacity") or {}
        mem = cap.get("memory_bytes")
        style = "green" if n["status"] == "online" else "red"
        table.add_row(n["id"], f"[{style}]{n['status']}[/]", n["country"], n["provider"],
                      n["site"], n["profile"], str(cap.get("cpus", "")),
                      f"{mem // 2**30} GiB" if isinstance(mem, int) else "", _ago(n["last_seen"]))
    console.print(table)
    return 0


def _cmd_node(args: argparse.Namespace, console: Console) -> int:
    node = _client(args).get(f"/api/v1/nodes/{args.id}")
    if args.json:
        print(json.dumps(node, indent=2))
        return 0
    console.print(f"[bold]{node['id']}[/] {node['status']} — {node['site']}, {node['country']}, "
                  f"{node['provider']} ({node['profile']}), last seen {_ago(node['last_seen'])}")
    host = (node.get("latest") or {}).get("host") or {}
    if host:
        console.print(f"cpu {host['cpu_percent']:.1f}%  load {host['load1']:.2f}  memory "
                      f"{host['mem_available_bytes'] // 2**20} MiB free of "
                      f"{host['mem_total_bytes'] // 2**20} MiB")
    table = Table(title="VMs")
    for col in ("name", "uuid", "state", "vcpus", "cpu time"):
        table.add_column(col)
    for vm in node.get("vms", []):
        cpu = vm.get("cpu_time_ns")
        table.add_row(vm["name"], vm["uuid"], vm["state"], str(vm.get("vcpus") or ""),
                      f"{cpu / 1e9:.1f}s" if cpu else "")
    console.print(table)
    for gap in node.get("gaps", []):
        console.print(f"[yellow]gap[/] {gap['channel']} {gap['first_seq']}..{gap['last_seq']}: "
                      f"{gap['reason']}")
    return 0


def _cmd_telemetry(args: argparse.Namespace, console: Console) -> int:
    query = {"limit": str(args.limit)}
    if args.metric:
        query["metric"] = args.metric
    if args.since:
        query["since"] = args.since
    data = _client(args).get(f"/api/v1/nodes/{args.id}/telemetry", **query)
    print(json.dumps(data, indent=2))
    return 0


def _cmd_token(args: argparse.Namespace, console: Console) -> int:
    grant = _client(args).post("/api/v1/enrollment-tokens", {
        "site": args.site, "country": args.country, "provider": args.provider,
        "profile": args.profile, "ttl_seconds": args.ttl,
    })
    print(json.dumps(grant, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from aggregator.demo import run_demo

    return run_demo(args.data_dir, args.nodes, args.api_port, args.broker_port, args.interval)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt8ra", description=__doc__)
    p.add_argument("--api", default="", help="aggregator URL (or VIRT8RA_API)")
    p.add_argument("--token", default="", help="bearer token (or VIRT8RA_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("nodes", help="the fleet's nodes")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_nodes)

    sp = sub.add_parser("node", help="one node with its VMs and gaps")
    sp.add_argument("id")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_node)

    sp = sub.add_parser("telemetry", help="a node's telemetry as JSON")
    sp.add_argument("id")
    sp.add_argument("--metric", default="")
    sp.add_argument("--since", default="")
    sp.add_argument("--limit", type=int, default=20)
    sp.set_defaults(func=_cmd_telemetry)

    sp = sub.add_parser("enrollment-token", help="a one-time token to enroll a node")
    for name in ("site", "country", "provider", "profile"):
        sp.add_argument(f"--{name}", required=True)
    sp.add_argument("--ttl", type=int, default=7200, help="seconds (default 7200)")
    sp.set_defaults(func=_cmd_token)

    sp = sub.add_parser("demo", help="run the whole system on this machine")
    sp.add_argument("--data-dir", type=Path, required=True)
    sp.add_argument("--nodes", type=int, default=6)
    sp.add_argument("--api-port", type=int, default=8480)
    sp.add_argument("--broker-port", type=int, default=0, help="default: a free port")
    sp.add_argument("--interval", type=float, default=2.0, help="agents' telemetry interval")
    sp.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    try:
        return int(args.func(args, console))
    except ApiClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
