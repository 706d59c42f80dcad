"""``virt8ra nodes``, ``virt8ra node show|revoke|cordon|uncordon|drain NODE`` and
``virt8ra telemetry NODE``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Console

from aggregator.cli.client import connect
from aggregator.cli.output import ago, print_json, table

# ``virt8ra node ACTION NODE``; ``virt8ra node NODE`` (no action) is the old form of ``show``.
NODE_ACTIONS = ("show", "revoke", "cordon", "uncordon", "drain")

# The options ``virt8ra node`` took before it had actions, with a value after them.
OLD_VALUE_OPTIONS = ("--reason", "--parallel", "--mode", "--timeout", "--wait")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("nodes", help="the fleet's nodes")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_nodes)

    node = sub.add_parser("node", help="one node: `node show NODE` with its VMs and gaps;"
                                       " `node revoke NODE` cuts a node off the fleet")
    actions = node.add_subparsers(dest="action", required=True,
                                  metavar="{" + ",".join(NODE_ACTIONS) + "}")
    sp = actions.add_parser("show", help="one node with its VMs and gaps")
    sp.add_argument("id", help="the node")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_node_show)
    sp = actions.add_parser("revoke", help="cut a node off the fleet: its certificates in the"
                                           " CRL, its broker session dropped")
    sp.add_argument("id", help="the node")
    sp.add_argument("--reason", default="", help="why, for the audit trail")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_revoke)
    for action, what in (("cordon", "keep placement off a node"),
                         ("uncordon", "let placement use a node again")):
        sp = actions.add_parser(action, help=what)
        sp.add_argument("id", help="the node")
        sp.add_argument("--reason", default="", help="why, for the audit trail")
        sp.set_defaults(func=_cmd_cordon)
    _add_drain(actions)

    sp = sub.add_parser("telemetry", help="a node's telemetry as JSON")
    sp.add_argument("id")
    sp.add_argument("--metric", default="")
    sp.add_argument("--since", default="")
    sp.add_argument("--limit", type=int, default=20)
    sp.set_defaults(func=_cmd_telemetry)


def _add_drain(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = actions.add_parser("drain", help="move every VM off a node, then cordon it")
    sp.add_argument("id", help="the node")
    sp.add_argument("--parallel", type=int, default=2, help="VMs moved at once")
    sp.add_argument("--mode", default="auto", choices=["auto", "live", "cold"],
                    help="auto = live where possible")
    sp.add_argument("--timeout", type=int, default=300, help="per VM, seconds")
    sp.add_argument("--wait", type=float, default=1800,
                    help="seconds to follow it (0: don't)")
    sp.set_defaults(func=_cmd_drain)


def old_show_form(command: list[str]) -> bool:
    """Whether ``command`` (``node`` and what follows it) is the old ``node NODE`` form: its
    first operand is a node rather than an action."""
    if command[:1] != ["node"]:
        return False
    rest = iter(command[1:])
    for word in rest:
        if word in OLD_VALUE_OPTIONS:
            next(rest, None)
        elif not word.startswith("-"):
            return word not in NODE_ACTIONS
    return False


def _cmd_nodes(args: argparse.Namespace, console: Console) -> int:
    nodes = connect(args.api, args.token).get("/api/v1/nodes")["nodes"]
    if args.json:
        print_json(nodes)
        return 0
    rows = []
    for n in nodes:
        cap = n.get("capacity") or {}
        mem = cap.get("memory_bytes")
        style = "green" if n["status"] == "online" else "red"
        rows.append([n["id"], f"[{style}]{n['status']}[/]", n["country"], n["provider"],
                     n["site"], n["profile"], str(cap.get("cpus", "")),
                     f"{mem // 2**30} GiB" if isinstance(mem, int) else "",
                     ago(n["last_seen"])])
    console.print(table(["node", "status", "country", "provider", "site", "profile", "cpus",
                         "memory", "last seen"], rows))
    return 0


def _cmd_node_show(args: argparse.Namespace, console: Console) -> int:
    node = connect(args.api, args.token).get(f"/api/v1/nodes/{args.id}")
    if args.json:
        print_json(node)
        return 0
    console.print(f"[bold]{node['id']}[/] {node['status']} — {node['site']}, {node['country']}, "
                  f"{node['provider']} ({node['profile']}), last seen {ago(node['last_seen'])}")
    host = (node.get("latest") or {}).get("host") or {}
    if host:
        console.print(f"cpu {host['cpu_percent']:.1f}%  load {host['load1']:.2f}  memory "
                      f"{host['mem_available_bytes'] // 2**20} MiB free of "
                      f"{host['mem_total_bytes'] // 2**20} MiB")
    rows = []
    for vm in node.get("vms", []):
        cpu = vm.get("cpu_time_ns")
        rows.append([vm["name"], vm["uuid"], vm["state"], str(vm.get("vcpus") or ""),
                     f"{cpu / 1e9:.1f}s" if cpu else ""])
    console.print(table(["name", "uuid", "state", "vcpus", "cpu time"], rows, title="VMs"))
    for gap in node.get("gaps", []):
        console.print(f"[yellow]gap[/] {gap['channel']} {gap['first_seq']}..{gap['last_seq']}: "
                      f"{gap['reason']}")
    return 0


def _cmd_revoke(args: argparse.Namespace, console: Console) -> int:
    done = connect(args.api, args.token).post(f"/api/v1/nodes/{args.id}/revoke",
                                              {"reason": args.reason})
    if args.json:
        print_json(done)
        return 0
    console.print(f"[bold red]revoked[/] {done['node']}: {len(done['serials'])} certificate(s) "
                  "in the CRL; broker session "
                  + ("dropped" if done["session_dropped"] else "[yellow]not dropped[/] (see log)"))
    return 0


def _cmd_cordon(args: argparse.Namespace, console: Console) -> int:
    done = connect(args.api, args.token).post(f"/api/v1/nodes/{args.id}/{args.action}",
                                              {"reason": args.reason})
    console.print(f"{done['node']}: " + ("cordoned" if done["cordoned"] else "uncordoned"))
    return 0


def _cmd_drain(args: argparse.Namespace, console: Console) -> int:
    api = connect(args.api, args.token)
    body = {"parallel": args.parallel, "mode": args.mode, "timeout_s": args.timeout}
    drain = api.post(f"/api/v1/nodes/{args.id}/drain", body)
    console.print(f"draining {args.id} ({drain['id']}): {drain['vms_left']} VM(s),"
                  f" {args.parallel} at a time, {args.mode}")
    deadline = time.monotonic() + args.wait
    shown: dict[str, str] = {}
    while True:
        _show_drain(drain, shown, console)
        if drain["state"] != "running" or time.monotonic() > deadline or not args.wait:
            break
        time.sleep(0.5)
        drain = api.get(f"/api/v1/nodes/{args.id}/drain")
    if drain["state"] == "done":
        console.print(f"[green]{args.id} is empty and cordoned[/]")
        return 0
    if drain["state"] == "incomplete":
        console.print(f"[red]{args.id}: {len(drain['failed'])} VM(s) could not move[/]")
        return 1
    console.print(f"[yellow]{args.id}: still draining ({drain['vms_left']} left)[/]")
    return 1 if args.wait else 0


def _show_drain(drain: dict[str, Any], shown: dict[str, str], console: Console) -> None:
    """A line for each VM of the drain whose state changed since ``shown``."""
    for vm in drain["vms"]:
        line = f"{vm['state']}" + (f" to {vm['dest']}" if vm["dest"] else "") + (
            f" ({vm['mode']})" if vm["mode"] else "")
        if shown.get(vm["vm"]) != line + vm["error"]:
            shown[vm["vm"]] = line + vm["error"]
            style = {"moved": "green", "failed": "red"}.get(vm["state"], "yellow")
            console.print(f"  {vm['name']}: [{style}]{line}[/]"
                          + (f": {vm['error']}" if vm["error"] else ""))


def _cmd_telemetry(args: argparse.Namespace, console: Console) -> int:
    query = {"limit": str(args.limit)}
    if args.metric:
        query["metric"] = args.metric
    if args.since:
        query["since"] = args.since
    print_json(connect(args.api, args.token).get(f"/api/v1/nodes/{args.id}/telemetry", **query))
    return 0
