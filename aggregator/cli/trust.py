"""``virt8ra enrollment-token``, ``virt8ra api-token`` and ``virt8ra audit [verify]``."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from aggregator.cli.client import ApiClientError, connect
from aggregator.cli.output import iso_time, print_json, print_rows

ROLES = ["admin", "operator", "viewer", "technician"]
TOKEN_STATES = ["", "active", "used", "expired", "withdrawn"]


def add_token_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tok = sub.add_parser("enrollment-token", help="one-time tokens that enroll nodes")
    tsub = tok.add_subparsers(dest="action", required=True)
    sp = tsub.add_parser("create", help="a one-time token to enroll a node")
    for name in ("site", "country", "provider", "profile"):
        sp.add_argument(f"--{name}", required=True)
    sp.add_argument("--ttl", type=int, default=7200, help="seconds (default 7200)")
    sp.add_argument("--node-id", default="", help="bind to this node id: re-enrolls it")
    sp.set_defaults(func=_cmd_token_create)
    sp = tsub.add_parser("list", help="every enrollment token and its state")
    sp.add_argument("--state", default="", choices=TOKEN_STATES)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_token_list)
    sp = tsub.add_parser("withdraw", help="withdraw an unused token")
    sp.add_argument("id", type=int)
    sp.set_defaults(func=_cmd_token_withdraw)

    key = sub.add_parser("api-token", help="API bearer tokens (admin)")
    ksub = key.add_subparsers(dest="action", required=True)
    sp = ksub.add_parser("create", help="a bearer token for a role")
    sp.add_argument("--role", required=True, choices=ROLES)
    sp.add_argument("--name", default="")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_apikey_create)
    sp = ksub.add_parser("list", help="every API token and its state")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_apikey_list)
    sp = ksub.add_parser("revoke", help="revoke an API token")
    sp.add_argument("id", type=int)
    sp.set_defaults(func=_cmd_apikey_revoke)


def add_audit_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("audit", help="the audit trail, newest first; `audit verify` checks"
                                      " every VM's residency record")
    sp.add_argument("--since", default="")
    sp.add_argument("--action", default="", help="e.g. node.revoke, or a prefix: node")
    sp.add_argument("--subject", default="", help="e.g. a node id")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("verify", nargs="?", default="", help="`verify`: check residency chains")
    sp.set_defaults(func=_cmd_audit)


def _cmd_token_create(args: argparse.Namespace, console: Console) -> int:
    body: dict[str, Any] = {
        "site": args.site, "country": args.country, "provider": args.provider,
        "profile": args.profile, "ttl_seconds": args.ttl,
    }
    if args.node_id:
        body["node_id"] = args.node_id
    print_json(connect(args.api, args.token).post("/api/v1/enrollment-tokens", body))
    return 0


def _cmd_token_list(args: argparse.Namespace, console: Console) -> int:
    tokens = connect(args.api, args.token).get(
        "/api/v1/enrollment-tokens", **({"state": args.state} if args.state else {}))["tokens"]
    if args.json:
        print_json(tokens)
    else:
        print_rows(console, tokens, ["id", "state", "site", "country", "provider", "profile",
                                     "node_id", "expires_at", "used_by"])
    return 0


def _cmd_token_withdraw(args: argparse.Namespace, console: Console) -> int:
    row = connect(args.api, args.token).request("DELETE",
                                                f"/api/v1/enrollment-tokens/{args.id}")
    console.print(f"enrollment token {row['id']} is {row['state']}")
    return 0


def _cmd_apikey_create(args: argparse.Namespace, console: Console) -> int:
    made = connect(args.api, args.token).post("/api/v1/api-tokens",
                                              {"role": args.role, "name": args.name})
    if args.json:
        print_json(made)
    else:
        print(made["token"])
    return 0


def _cmd_apikey_list(args: argparse.Namespace, console: Console) -> int:
    tokens = connect(args.api, args.token).get("/api/v1/api-tokens")["tokens"]
    if args.json:
        print_json(tokens)
    else:
        print_rows(console, tokens, ["id", "state", "role", "name", "created_at", "revoked_at"])
    return 0


def _cmd_apikey_revoke(args: argparse.Namespace, console: Console) -> int:
    row = connect(args.api, args.token).request("DELETE", f"/api/v1/api-tokens/{args.id}")
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
    events = connect(args.api, args.token).get("/api/v1/audit", **query)["events"]
    if args.json:
        print_json(events)
        return 0
    for e in reversed(events):  # oldest first, like a log
        when = iso_time(e["ts"])
        style = "green" if e["outcome"] == "ok" else "red"
        detail = " ".join(f"{k}={v}" for k, v in sorted(e["detail"].items()) if v is not None)
        console.print(f"{when} [{style}]{e['outcome']:<9}[/] [bold]{e['action']}[/] "
                      f"{e['subject']} by {e['actor']}  [dim]{detail}[/]", highlight=False,
                      soft_wrap=True)
    return 0


def _cmd_audit_verify(args: argparse.Namespace, console: Console) -> int:
    found = connect(args.api, args.token).get("/api/v1/residency/verify")
    for chain in found["chains"]:
        if chain["chain_valid"]:
            console.print(f"[green]ok[/]     {chain['vm']} ({chain['events']} entries)")
        else:
            console.print(f"[red]BROKEN[/] {chain['vm']}: the chain breaks at entry "
                          f"{chain['broken_at']}")
    console.print(f"{len(found['chains'])} residency record(s): "
                  + ("[green]all intact[/]" if found["all_valid"] else "[red]tampered[/]"))
    return 0 if found["all_valid"] else 1
