"""``virt8ra vms``, ``virt8ra vm ...`` (create, operate, migrate one VM), ``virt8ra moves``,
``virt8ra orders`` and ``virt8ra image``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TypeAlias

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from aggregator.cli.client import ApiClient, ApiClientError, connect
from aggregator.cli.output import iso_time, iso_times, print_json, print_rows, table

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

VM_ACTIONS = ("show", "start", "stop", "reboot", "delete", "residency")


def add_commands(sub: Subparsers) -> None:
    sp = sub.add_parser("vms", help="every VM")
    sp.add_argument("--node", default="")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_vms)

    vm = sub.add_parser("vm", help="create and operate one VM").add_subparsers(
        dest="action", required=True)
    _add_vm_create(vm)
    for action in VM_ACTIONS:
        sp = vm.add_parser(action, help=f"{action} a VM (by name or id)")
        sp.add_argument("name")
        sp.add_argument("--wait", type=float, default=60, help="seconds to wait (0: don't)")
        if action == "residency":
            sp.add_argument("--json", action="store_true",
                            help="as JSON (times in ISO 8601 UTC, as in the table)")
        sp.set_defaults(func=_cmd_vm_action)
    _add_vm_migrate(vm)

    sp = sub.add_parser("moves", help="moves of VMs, newest first; `moves ID`: one")
    sp.add_argument("id", nargs="?", default="")
    sp.add_argument("--vm", default="")
    sp.add_argument("--state", default="")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_moves)

    sp = sub.add_parser("orders", help="orders, newest first")
    sp.add_argument("--node", default="")
    sp.add_argument("--vm", default="")
    sp.add_argument("--state", default="")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_orders)

    _add_image(sub)


def _add_vm_create(vm: Subparsers) -> None:
    sp = vm.add_parser("create", help="place a VM under its policy and create it")
    sp.add_argument("name")
    sp.add_argument("--vcpus", type=int, default=1)
    sp.add_argument("--memory", type=int, default=256, help="MiB")
    sp.add_argument("--disk", type=int, default=0, help="GiB")
    sp.add_argument("--image", default="")
    sp.add_argument("--kernel", default="")
    sp.add_argument("--initrd", default="")
    sp.add_argument("--cmdline", default="")
    sp.add_argument("--country", action="append", default=[], help="allowed (repeatable)")
    sp.add_argument("--provider", action="append", default=[], help="allowed (repeatable)")
    sp.add_argument("--site", action="append", default=[], help="allowed (repeatable)")
    sp.add_argument("--profile", default="")
    sp.add_argument("--anti-affinity", default="", help="never on a node with this group")
    sp.add_argument("--restart-on-node-loss", action="store_true",
                    help="if its node is lost, restart it elsewhere once that is safe")
    sp.add_argument("--wait", type=float, default=60, help="seconds to wait (0: don't)")
    sp.set_defaults(func=_cmd_vm_create)


def _add_vm_migrate(vm: Subparsers) -> None:
    sp = vm.add_parser("migrate", help="move a VM to another node (live unless --cold)")
    sp.add_argument("name")
    sp.add_argument("--to", default="", help="the node (default: placement picks)")
    sp.add_argument("--cold", action="store_true", help="stop, copy, start there")
    sp.add_argument("--max-downtime-ms", type=int, default=300)
    sp.add_argument("--bandwidth", type=int, default=0, help="MiB/s (0: no limit)")
    sp.add_argument("--timeout", type=int, default=300, help="abort after this many seconds")
    sp.add_argument("--no-auto-converge", action="store_true")
    sp.add_argument("--postcopy", action="store_true", help="switch to post-copy after the"
                    " first pass (a network failure then loses the VM)")
    sp.add_argument("--wait", type=float, default=600, help="seconds to follow it (0: don't)")
    sp.set_defaults(func=_cmd_vm_migrate)


def _add_image(sub: Subparsers) -> None:
    img = sub.add_parser("image", help="the fleet's images").add_subparsers(
        dest="action", required=True)
    sp = img.add_parser("list", help="every image")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_image)
    sp = img.add_parser("add", help="register a file on the aggregator host as an image")
    sp.add_argument("name")
    sp.add_argument("path")
    sp.add_argument("--format", default="", choices=["", "raw", "qcow2", "kernel", "initrd"])
    sp.set_defaults(func=_cmd_image)


def _cmd_vms(args: argparse.Namespace, console: Console) -> int:
    found = connect(args.api, args.token).get("/api/v1/vms",
                                              **({"node": args.node} if args.node else {}))
    if args.json:
        print_json(found["vms"])
        return 0
    rows = []
    for vm in found["vms"]:
        style = "green" if vm["actual_state"] == "running" else "yellow"
        rows.append([vm["name"], vm["id"], vm["node"] or "", vm["desired_state"],
                     f"[{style}]{vm['actual_state']}[/]", str(vm["vcpus"]),
                     f"{vm['memory_mib']} MiB", vm["state_reason"]])
    console.print(table(["name", "id", "node", "desired", "actual", "vcpus", "memory", "why"],
                        rows))
    return 0


def _cmd_vm_create(args: argparse.Namespace, console: Console) -> int:
    api = connect(args.api, args.token)
    body: dict[str, Any] = {"name": args.name, "vcpus": args.vcpus,
                            "memory_mib": args.memory, "disk_gib": args.disk,
                            "boot": {}, "placement": {
                                "countries": args.country, "providers": args.provider,
                                "sites": args.site, "profile": args.profile or None,
                                "anti_affinity": args.anti_affinity or None},
                            "on_node_loss": "restart" if args.restart_on_node_loss
                            else "wait"}
    for key in ("image", "kernel", "initrd", "cmdline"):
        if getattr(args, key):
            body["boot"][key] = getattr(args, key)
    try:
        made = api.post("/api/v1/vms", body)
    except ApiClientError as exc:
        if exc.code == "no_placement":
            console.print(f"[red]{exc}[/]")
        raise
    console.print(f"{args.name} ({made['id']}) goes to [bold]{made['node']}[/]")
    return _wait_order(api, made["order"], console, args.wait) if args.wait else 0


def _cmd_vm_action(args: argparse.Namespace, console: Console) -> int:
    api = connect(args.api, args.token)
    if args.action == "show":
        print_json(api.get(f"/api/v1/vms/{args.name}"))
        return 0
    if args.action == "residency":
        return _residency(api.get(f"/api/v1/vms/{args.name}/residency"), args, console)
    if args.action == "delete":
        done = api.request("DELETE", f"/api/v1/vms/{args.name}")
    else:
        done = api.post(f"/api/v1/vms/{args.name}/{args.action}", {})
    if done["order"] is None:
        console.print(f"{args.name}: {args.action} done")
        return 0
    return _wait_order(api, done["order"], console, args.wait) if args.wait else 0


def _wait_order(api: ApiClient, order_id: str, console: Console, timeout_s: float) -> int:
    with console.status(f"order {order_id} ...") as status:
        deadline = time.monotonic() + timeout_s
        while True:
            order = api.get(f"/api/v1/orders/{order_id}")
            status.update(f"order {order_id}: {order['state']}")
            if order["state"] in ("succeeded", "failed", "expired"):
                break
            if time.monotonic() > deadline:
                console.print(f"[yellow]order {order_id} still {order['state']}[/]")
                return 1
            time.sleep(0.3)
    if order["state"] == "succeeded":
        console.print(f"[green]{order['action']} succeeded[/] on {order['node']}: "
                      f"{json.dumps(order['result'])}")
        return 0
    console.print(f"[red]{order['action']} {order['state']}[/] on {order['node']}: "
                  f"{order['error']}")
    return 1


def _residency(found: dict[str, Any], args: argparse.Namespace, console: Console) -> int:
    """Where a VM lived, times in ISO 8601 UTC (the API gives unix seconds)."""
    if args.json:
        print_json(iso_times(found))
        return 0
    rows = [[e["node"], e["provider"], e["country"], e["site"], iso_time(e["from"]),
             iso_time(e["until"]) or "(still there)"] for e in found["entries"]]
    console.print(table(["node", "provider", "country", "site", "from", "until"], rows,
                        title=f"residency of {found['vm']}"))
    console.print(f"{found['events']} entries: " + (
        "[green]chain intact[/]" if found["chain_valid"]
        else f"[red]chain broken at entry {found['broken_at']}[/]"))
    return 0 if found["chain_valid"] else 1


def _cmd_vm_migrate(args: argparse.Namespace, console: Console) -> int:
    api = connect(args.api, args.token)
    body: dict[str, Any] = {"mode": "cold" if args.cold else "live",
                            "max_downtime_ms": args.max_downtime_ms,
                            "bandwidth_mib_s": args.bandwidth, "timeout_s": args.timeout,
                            "auto_converge": not args.no_auto_converge,
                            "postcopy": args.postcopy}
    if args.to:
        body["to"] = args.to
    try:
        move = api.post(f"/api/v1/vms/{args.name}/migrate", body)
    except ApiClientError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    console.print(f"{args.name}: {move['mode']} move {move['source']} → [bold]{move['dest']}[/]"
                  f" ({move['move']})")
    if not args.wait:
        return 0
    return _follow_move(api, move["move"], console, args.wait)


def _follow_move(api: ApiClient, move_id: str, console: Console, timeout_s: float) -> int:
    """Show a move's progress bar until it ends."""
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("preparing", total=None)
        while True:
            move = api.get(f"/api/v1/moves/{move_id}")
            figures = move.get("progress") or {}
            total = figures.get("data_total_bytes")
            bar.update(task, description=f"{move['state']}"
                       + (f" (pass {figures['memory_iteration']})"
                          if figures.get("memory_iteration") else ""),
                       total=total, completed=figures.get("data_processed_bytes", 0))
            if move["finished_at"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    if move["state"] == "succeeded":
        r = move["result"]
        parts = [f"{k.removesuffix('_ms')} {r[k]} ms" for k in ("duration_ms", "downtime_ms")
                 if k in r]
        if "transferred_bytes" in r:
            parts.append(f"{r['transferred_bytes'] / 2**20:.1f} MiB sent")
        console.print(f"[green]moved[/] to {move['dest']}: " + ", ".join(parts))
        return 0
    if move["finished_at"] is None:
        console.print(f"[yellow]still {move['state']}[/] (virt8ra move {move_id})")
        return 1
    console.print(f"[red]not moved[/]: {move['error']}")
    return 1


def _cmd_moves(args: argparse.Namespace, console: Console) -> int:
    api = connect(args.api, args.token)
    if args.id:
        print_json(api.get(f"/api/v1/moves/{args.id}"))
        return 0
    query = {k: v for k, v in (("vm", args.vm), ("state", args.state)) if v}
    found = api.get("/api/v1/moves", limit=str(args.limit), **query)["moves"]
    if args.json:
        print_json(found)
        return 0
    for m in found:
        m["downtime"] = m["result"].get("downtime_ms", "")
        m["duration"] = m["result"].get("duration_ms", "")
    print_rows(console, found, ["id", "vm_name", "source", "dest", "mode", "state", "duration",
                                "downtime", "created_at", "error"])
    return 0


def _cmd_orders(args: argparse.Namespace, console: Console) -> int:
    query = {k: v for k, v in (("node", args.node), ("vm", args.vm), ("state", args.state))
             if v}
    found = connect(args.api, args.token).get("/api/v1/orders", limit=str(args.limit),
                                              **query)["orders"]
    if args.json:
        print_json(found)
        return 0
    print_rows(console, found, ["id", "node", "seq", "action", "state", "created_at", "error"])
    return 0


def _cmd_image(args: argparse.Namespace, console: Console) -> int:
    api = connect(args.api, args.token)
    if args.action == "list":
        found = api.get("/api/v1/images")["images"]
        if args.json:
            print_json(found)
        else:
            print_rows(console, found, ["name", "format", "size", "sha256", "created_at"])
        return 0
    body = {"name": args.name, "path": str(Path(args.path).resolve())}
    if args.format:
        body["format"] = args.format
    print_json(api.post("/api/v1/images", body))
    return 0
