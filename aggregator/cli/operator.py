"""``virt8ra``: the operators' CLI over the REST API (``virt8ra demo`` is added by demo/cli.py).

The API address and token come from ``--api``/``--token`` or ``VIRT8RA_API``/``VIRT8RA_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from aggregator.cli.client import ApiClient, ApiClientError


def _client(args: argparse.Namespace) -> ApiClient:
    token = args.token or os.environ.get("VIRT8RA_TOKEN", "")
    if not token:
        raise ApiClientError("no API token: pass --token or set VIRT8RA_TOKEN")
    return ApiClient(args.api or os.environ.get("VIRT8RA_API", "http://127.0.0.1:8480"), token)


# Columns that hold identifiers: never cut, whatever the terminal's width.
_ID_COLUMNS = frozenset({"node", "id", "name", "vm_name", "vm", "source", "dest", "uuid",
                         "sha256", "site", "order"})


def _table(columns: list[str], rows: list[list[str]], **options: Any) -> Table:
    """A table whose identifier columns are never cut: the other columns wrap to make room."""
    table = Table(**options)
    for col in columns:
        if col in _ID_COLUMNS:
            width = max([len(col), *(len(r[columns.index(col)]) for r in rows)])
            table.add_column(col, no_wrap=True, min_width=width)
        else:
            table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def iso_time(ts: Any) -> str:
    """ISO 8601 UTC of unix seconds (``2026-12-04T17:40:00Z``); ``""`` for none."""
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _iso_times(value: Any, key: str = "") -> Any:
    """JSON with its times (``*_at``, ``ts``, ``from``, ``until``) in ISO 8601 UTC."""
    if isinstance(value, dict):
        return {k: _iso_times(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_iso_times(v, key) for v in value]
    if key.endswith("_at") or key in ("ts", "from", "until", "time"):
        return iso_time(value) or value
    return value


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
    rows = []
    for n in nodes:
        cap = n.get("capacity") or {}
        mem = cap.get("memory_bytes")
        style = "green" if n["status"] == "online" else "red"
        rows.append([n["id"], f"[{style}]{n['status']}[/]", n["country"], n["provider"],
                     n["site"], n["profile"], str(cap.get("cpus", "")),
                     f"{mem // 2**30} GiB" if isinstance(mem, int) else "",
                     _ago(n["last_seen"])])
    console.print(_table(["node", "status", "country", "provider", "site", "profile", "cpus",
                          "memory", "last seen"], rows))
    return 0


def _cmd_node(args: argparse.Namespace, console: Console) -> int:
    if args.id == "revoke":
        if not args.target:
            raise ApiClientError("usage: virt8ra node revoke NODE [--reason TEXT]")
        return _revoke(args, console)
    if args.id == "drain":
        if not args.target:
            raise ApiClientError("usage: virt8ra node drain NODE [--parallel N] [--mode M]")
        return _drain(args, console)
    if args.id in ("cordon", "uncordon"):
        if not args.target:
            raise ApiClientError(f"usage: virt8ra node {args.id} NODE [--reason TEXT]")
        done = _client(args).post(f"/api/v1/nodes/{args.target}/{args.id}",
                                  {"reason": args.reason})
        console.print(f"{done['node']}: " + ("cordoned" if done["cordoned"] else "uncordoned"))
        return 0
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
    rows = []
    for vm in node.get("vms", []):
        cpu = vm.get("cpu_time_ns")
        rows.append([vm["name"], vm["uuid"], vm["state"], str(vm.get("vcpus") or ""),
                     f"{cpu / 1e9:.1f}s" if cpu else ""])
    console.print(_table(["name", "uuid", "state", "vcpus", "cpu time"], rows, title="VMs"))
    for gap in node.get("gaps", []):
        console.print(f"[yellow]gap[/] {gap['channel']} {gap['first_seq']}..{gap['last_seq']}: "
                      f"{gap['reason']}")
    return 0


def _drain(args: argparse.Namespace, console: Console) -> int:
    api = _client(args)
    body = {"parallel": args.parallel, "mode": args.mode, "timeout_s": args.timeout}
    drain = api.post(f"/api/v1/nodes/{args.target}/drain", body)
    console.print(f"draining {args.target} ({drain['id']}): {drain['vms_left']} VM(s),"
                  f" {args.parallel} at a time, {args.mode}")
    deadline = time.monotonic() + args.wait
    shown: dict[str, str] = {}
    while True:
        for vm in drain["vms"]:
            line = f"{vm['state']}" + (f" to {vm['dest']}" if vm["dest"] else "") + (
                f" ({vm['mode']})" if vm["mode"] else "")
            if shown.get(vm["vm"]) != line + vm["error"]:
                shown[vm["vm"]] = line + vm["error"]
                style = {"moved": "green", "failed": "red"}.get(vm["state"], "yellow")
                console.print(f"  {vm['name']}: [{style}]{line}[/]"
                              + (f": {vm['error']}" if vm["error"] else ""))
        if drain["state"] != "running" or time.monotonic() > deadline or not args.wait:
            break
        time.sleep(0.5)
        drain = api.get(f"/api/v1/nodes/{args.target}/drain")
    if drain["state"] == "done":
        console.print(f"[green]{args.target} is empty and cordoned[/]")
        return 0
    if drain["state"] == "incomplete":
        console.print(f"[red]{args.target}: {len(drain['failed'])} VM(s) could not move[/]")
        return 1
    console.print(f"[yellow]{args.target}: still draining ({drain['vms_left']} left)[/]")
    return 1 if args.wait else 0


def _revoke(args: argparse.Namespace, console: Console) -> int:
    done = _client(args).post(f"/api/v1/nodes/{args.target}/revoke", {"reason": args.reason})
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    console.print(f"[bold red]revoked[/] {done['node']}: {len(done['serials'])} certificate(s) "
                  "in the CRL; broker session "
                  + ("dropped" if done["session_dropped"] else "[yellow]not dropped[/] (see log)"))
    return 0


def _rows(console: Console, rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = []
    for row in rows:
        line = []
        for col in columns:
            value = row.get(col)
            if col.endswith("_at") or col == "ts":
                value = iso_time(value)
            line.append("" if value is None else str(value))
        cells.append(line)
    console.print(_table(columns, cells))


def _cmd_token_list(args: argparse.Namespace, console: Console) -> int:
    tokens = _client(args).get("/api/v1/enrollment-tokens",
                               **({"state": args.state} if args.state else {}))["tokens"]
    if args.json:
        print(json.dumps(tokens, indent=2))
    else:
        _rows(console, tokens, ["id", "state", "site", "country", "provider", "profile",
                                "node_id", "expires_at", "used_by"])
    return 0


def _cmd_token_withdraw(args: argparse.Namespace, console: Console) -> int:
    row = _client(args).request("DELETE", f"/api/v1/enrollment-tokens/{args.id}")
    console.print(f"enrollment token {row['id']} is {row['state']}")
    return 0


def _cmd_apikey_create(args: argparse.Namespace, console: Console) -> int:
    made = _client(args).post("/api/v1/api-tokens", {"role": args.role, "name": args.name})
    print(json.dumps(made, indent=2) if args.json else made["token"])
    return 0


def _cmd_apikey_list(args: argparse.Namespace, console: Console) -> int:
    tokens = _client(args).get("/api/v1/api-tokens")["tokens"]
    if args.json:
        print(json.dumps(tokens, indent=2))
    else:
        _rows(console, tokens, ["id", "state", "role", "name", "created_at", "revoked_at"])
    return 0


def _cmd_apikey_revoke(args: argparse.Namespace, console: Console) -> int:
    row = _client(args).request("DELETE", f"/api/v1/api-tokens/{args.id}")
    console.print(f"API token {row['id']} ({row['role']}, {row['name']!r}) is revoked")
    return 0


def _cmd_audit(args: argparse.Namespace, console: Console) -> int:
    if args.verify:
        if args.verify != "verify":
            raise ApiClientError(f"unknown audit command {args.verify!r}: try `audit verify`")
        return _cmd_audit_verify(args, console)
    query = {"limit": str(args.limit)}
    for name in ("since", "action", "subject"):
        if getattr(args, name):
            query[name] = getattr(args, name)
    events = _client(args).get("/api/v1/audit", **query)["events"]
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for e in reversed(events):  # oldest first, like a log
        when = iso_time(e["ts"])
        style = "green" if e["outcome"] == "ok" else "red"
        detail = " ".join(f"{k}={v}" for k, v in sorted(e["detail"].items()) if v is not None)
        console.print(f"{when} [{style}]{e['outcome']:<9}[/] [bold]{e['action']}[/] "
                      f"{e['subject']} by {e['actor']}  [dim]{detail}[/]", highlight=False,
                      soft_wrap=True)
    return 0


def _cmd_vms(args: argparse.Namespace, console: Console) -> int:
    found = _client(args).get("/api/v1/vms", **({"node": args.node} if args.node else {}))
    if args.json:
        print(json.dumps(found["vms"], indent=2))
        return 0
    rows = []
    for vm in found["vms"]:
        style = "green" if vm["actual_state"] == "running" else "yellow"
        rows.append([vm["name"], vm["id"], vm["node"] or "", vm["desired_state"],
                     f"[{style}]{vm['actual_state']}[/]", str(vm["vcpus"]),
                     f"{vm['memory_mib']} MiB", vm["state_reason"]])
    console.print(_table(["name", "id", "node", "desired", "actual", "vcpus", "memory", "why"],
                         rows))
    return 0


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


def _cmd_vm(args: argparse.Namespace, console: Console) -> int:
    if args.action == "migrate":
        return _migrate(args, console)
    api = _client(args)
    if args.action == "create":
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
    if args.action == "show":
        vm = api.get(f"/api/v1/vms/{args.name}")
        print(json.dumps(vm, indent=2))
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


def _migrate(args: argparse.Namespace, console: Console) -> int:
    api = _client(args)
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
    api = _client(args)
    if args.id:
        move = api.get(f"/api/v1/moves/{args.id}")
        print(json.dumps(move, indent=2))
        return 0
    query = {k: v for k, v in (("vm", args.vm), ("state", args.state)) if v}
    found = api.get("/api/v1/moves", limit=str(args.limit), **query)["moves"]
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for m in found:
        m["downtime"] = m["result"].get("downtime_ms", "")
        m["duration"] = m["result"].get("duration_ms", "")
    _rows(console, found, ["id", "vm_name", "source", "dest", "mode", "state", "duration",
                           "downtime", "created_at", "error"])
    return 0


def _cmd_orders(args: argparse.Namespace, console: Console) -> int:
    query = {k: v for k, v in (("node", args.node), ("vm", args.vm), ("state", args.state))
             if v}
    found = _client(args).get("/api/v1/orders", limit=str(args.limit), **query)["orders"]
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    _rows(console, found, ["id", "node", "seq", "action", "state", "created_at", "error"])
    return 0


def _cmd_image(args: argparse.Namespace, console: Console) -> int:
    api = _client(args)
    if args.action == "list":
        found = api.get("/api/v1/images")["images"]
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            _rows(console, found, ["name", "format", "size", "sha256", "created_at"])
        return 0
    body = {"name": args.name, "path": str(Path(args.path).resolve())}
    if args.format:
        body["format"] = args.format
    print(json.dumps(api.post("/api/v1/images", body), indent=2))
    return 0


def _residency(found: dict[str, Any], args: argparse.Namespace, console: Console) -> int:
    """Where a VM lived, times in ISO 8601 UTC (the API gives unix seconds)."""
    if args.json:
        print(json.dumps(_iso_times(found), indent=2))
        return 0
    rows = [[e["node"], e["provider"], e["country"], e["site"], iso_time(e["from"]),
             iso_time(e["until"]) or "(still there)"] for e in found["entries"]]
    console.print(_table(["node", "provider", "country", "site", "from", "until"], rows,
                         title=f"residency of {found['vm']}"))
    console.print(f"{found['events']} entries: " + (
        "[green]chain intact[/]" if found["chain_valid"]
        else f"[red]chain broken at entry {found['broken_at']}[/]"))
    return 0 if found["chain_valid"] else 1


def _cmd_audit_verify(args: argparse.Namespace, console: Console) -> int:
    found = _client(args).get("/api/v1/residency/verify")
    for chain in found["chains"]:
        if chain["chain_valid"]:
            console.print(f"[green]ok[/]     {chain['vm']} ({chain['events']} entries)")
        else:
            console.print(f"[red]BROKEN[/] {chain['vm']}: the chain breaks at entry "
                          f"{chain['broken_at']}")
    console.print(f"{len(found['chains'])} residency record(s): "
                  + ("[green]all intact[/]" if found["all_valid"] else "[red]tampered[/]"))
    return 0 if found["all_valid"] else 1


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
    body: dict[str, Any] = {
        "site": args.site, "country": args.country, "provider": args.provider,
        "profile": args.profile, "ttl_seconds": args.ttl,
    }
    if args.node_id:
        body["node_id"] = args.node_id
    grant = _client(args).post("/api/v1/enrollment-tokens", body)
    print(json.dumps(grant, indent=2))
    return 0


# Adds commands of a layer above the API's (``virt8ra demo``: demo/cli.py).
Extension = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def parser(extend: Extension | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt8ra", description=__doc__)
    p.add_argument("--api", default="", help="aggregator URL (or VIRT8RA_API)")
    p.add_argument("--token", default="", help="bearer token (or VIRT8RA_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("nodes", help="the fleet's nodes")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_nodes)

    sp = sub.add_parser("node", help="one node with its VMs and gaps; `node revoke NODE` cuts"
                                     " a node off the fleet")
    sp.add_argument("id", help="a node id, or `revoke`, `cordon`, `uncordon`, `drain`")
    sp.add_argument("target", nargs="?", default="", help="with an action: the node")
    sp.add_argument("--reason", default="", help="with revoke: why, for the audit trail")
    sp.add_argument("--parallel", type=int, default=2, help="with drain: VMs moved at once")
    sp.add_argument("--mode", default="auto", choices=["auto", "live", "cold"],
                    help="with drain: auto = live where possible")
    sp.add_argument("--timeout", type=int, default=300, help="with drain: per VM, seconds")
    sp.add_argument("--wait", type=float, default=1800,
                    help="with drain: seconds to follow it (0: don't)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_node)

    sp = sub.add_parser("telemetry", help="a node's telemetry as JSON")
    sp.add_argument("id")
    sp.add_argument("--metric", default="")
    sp.add_argument("--since", default="")
    sp.add_argument("--limit", type=int, default=20)
    sp.set_defaults(func=_cmd_telemetry)

    tok = sub.add_parser("enrollment-token", help="one-time tokens that enroll nodes")
    tsub = tok.add_subparsers(dest="action", required=True)
    sp = tsub.add_parser("create", help="a one-time token to enroll a node")
    for name in ("site", "country", "provider", "profile"):
        sp.add_argument(f"--{name}", required=True)
    sp.add_argument("--ttl", type=int, default=7200, help="seconds (default 7200)")
    sp.add_argument("--node-id", default="", help="bind to this node id: re-enrolls it")
    sp.set_defaults(func=_cmd_token)
    sp = tsub.add_parser("list", help="every enrollment token and its state")
    sp.add_argument("--state", default="", choices=["", "active", "used", "expired",
                                                    "withdrawn"])
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_token_list)
    sp = tsub.add_parser("withdraw", help="withdraw an unused token")
    sp.add_argument("id", type=int)
    sp.set_defaults(func=_cmd_token_withdraw)

    key = sub.add_parser("api-token", help="API bearer tokens (admin)")
    ksub = key.add_subparsers(dest="action", required=True)
    sp = ksub.add_parser("create", help="a bearer token for a role")
    sp.add_argument("--role", required=True,
                    choices=["admin", "operator", "viewer", "technician"])
    sp.add_argument("--name", default="")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_apikey_create)
    sp = ksub.add_parser("list", help="every API token and its state")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_apikey_list)
    sp = ksub.add_parser("revoke", help="revoke an API token")
    sp.add_argument("id", type=int)
    sp.set_defaults(func=_cmd_apikey_revoke)

    sp = sub.add_parser("vms", help="every VM")
    sp.add_argument("--node", default="")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_vms)

    vm = sub.add_parser("vm", help="create and operate one VM").add_subparsers(
        dest="action", required=True)
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
    sp.set_defaults(func=_cmd_vm)
    for action in ("show", "start", "stop", "reboot", "delete", "residency"):
        sp = vm.add_parser(action, help=f"{action} a VM (by name or id)")
        sp.add_argument("name")
        sp.add_argument("--wait", type=float, default=60, help="seconds to wait (0: don't)")
        if action == "residency":
            sp.add_argument("--json", action="store_true",
                            help="as JSON (times in ISO 8601 UTC, as in the table)")
        sp.set_defaults(func=_cmd_vm)

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
    sp.set_defaults(func=_cmd_vm)

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

    sp = sub.add_parser("audit", help="the audit trail, newest first; `audit verify` checks"
                                      " every VM's residency record")
    sp.add_argument("--since", default="")
    sp.add_argument("--action", default="", help="e.g. node.revoke, or a prefix: node")
    sp.add_argument("--subject", default="", help="e.g. a node id")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("verify", nargs="?", default="", help="`verify`: check residency chains")
    sp.set_defaults(func=_cmd_audit)
    if extend is not None:
        extend(sub)
    return p


def main(argv: list[str] | None = None, extend: Extension | None = None) -> int:
    args = parser(extend).parse_args(argv)
    # Piped into a file or a pager: as wide as the lines are, so nothing is cut or wrapped.
    console = Console() if sys.stdout.isatty() else Console(width=1 << 16)
    try:
        return int(args.func(args, console))
    except ApiClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
