"""``virt8ra-aggregator``: init, serve, and offline token commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from aggregator import service
from aggregator.config import Layout
from aggregator.fleet.broker import BrokerError
from aggregator.store.tx import Tx
from aggregator.store.writer import Store
from aggregator.trust import nodes as trust
from aggregator.trust.enrollment import (
    EnrollmentError,
    TokenScope,
    create_token,
    list_tokens,
    withdraw_token,
)
from aggregator.trust.pki import CertificateAuthority
from aggregator.trust.tokens import ROLES, create_api_token
from contract.profiles import default_profiles_dir, load_profiles
from plumbing.configfile import ConfigError

T = TypeVar("T")
DEFAULT_DATA_DIR = Path("/var/lib/virt8ra-aggregator")


def _with_store(data_dir: Path, fn: Callable[[Tx], T]) -> T:
    layout = Layout(data_dir)
    if not layout.config.exists():
        raise ConfigError(layout.config, "", "not initialised: run `virt8ra-aggregator init`")
    store = Store(layout.database)
    store.start()
    try:
        return asyncio.run(store.write(fn))
    finally:
        store.stop()


def _cmd_init(args: argparse.Namespace) -> int:
    result = service.init(args.data_dir, api_host=args.api_host, api_port=args.api_port,
                          broker_port=args.broker_port, broker_user=args.broker_user,
                          images_port=args.images_port)
    print(f"initialised {result.data_dir}")
    print(f"  CA fingerprint: {result.ca_fingerprint}")
    print(f"  admin token:    {Layout(result.data_dir).admin_token}")
    print(f"next: virt8ra-aggregator serve --data-dir {result.data_dir}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    service.serve(args.data_dir)
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    profiles = load_profiles(default_profiles_dir())
    if args.profile not in profiles:
        print(f"error: no hardware profile {args.profile!r}; known: {', '.join(sorted(profiles))}",
              file=sys.stderr)
        return 2
    scope = TokenScope(args.site, args.country, args.provider, args.profile)
    now = time.time()
    result: dict[str, Any] = _with_store(
        args.data_dir,
        lambda db: create_token(db, scope, parse_ttl(args.ttl), now, actor="cli",
                                node_id=args.node_id or None),
    )
    result["ca_fingerprint"] = CertificateAuthority(Layout(args.data_dir).pki).fingerprint()
    print(json.dumps(result, indent=2) if args.json else
          f"token:          {result['token']}\nexpires at:     "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(result['expires_at']))}\n"
          f"ca fingerprint: {result['ca_fingerprint']}")
    return 0


def _when(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _table(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(*columns, box=None)
    for row in rows:
        table.add_row(*(
            _when(row[c]) if c.endswith("_at") else str("" if row[c] is None else row[c])
            for c in columns
        ))
    Console().print(table)


def _cmd_token_list(args: argparse.Namespace) -> int:
    now = time.time()
    rows = _with_store(args.data_dir, lambda db: list_tokens(db, now, args.state))
    _table(args, rows, ["id", "state", "site", "country", "provider", "profile", "node_id",
                        "expires_at", "used_by"])
    return 0


def _cmd_token_withdraw(args: argparse.Namespace) -> int:
    now = time.time()
    row = _with_store(args.data_dir, lambda db: withdraw_token(db, args.id, now, "cli"))
    print(f"enrollment token {row['id']} is {row['state']}")
    return 0


def _cmd_apikey_create(args: argparse.Namespace) -> int:
    now = time.time()
    _, token = _with_store(
        args.data_dir, lambda db: create_api_token(db, args.role, args.name, now, actor="cli")
    )
    print(token)
    return 0


def _cmd_apikey_list(args: argparse.Namespace) -> int:
    rows = _with_store(args.data_dir, lambda db: trust.list_api_tokens(db))
    _table(args, rows, ["id", "state", "role", "name", "created_at", "revoked_at"])
    return 0


def _cmd_apikey_revoke(args: argparse.Namespace) -> int:
    now = time.time()
    row = _with_store(args.data_dir, lambda db: trust.revoke_api_token(db, args.id, now, "cli"))
    print(f"API token {row['id']} ({row['role']}, {row['name']!r}) is revoked")
    return 0


def parse_ttl(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d`` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt8ra-aggregator", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)

    sp = sub.add_parser("init", help="create the CA, broker config, database and admin token")
    data_dir(sp)
    sp.add_argument("--api-host", default="127.0.0.1")
    sp.add_argument("--api-port", type=int, default=8480)
    sp.add_argument("--broker-port", type=int, default=8883)
    sp.add_argument("--broker-user", default="mosquitto")
    sp.add_argument("--images-port", type=int, default=8481,
                    help="the image service nodes fetch from (HTTPS, node certificates)")
    sp.set_defaults(func=_cmd_init)

    sp = sub.add_parser("serve", help="run the aggregator (and its managed broker)")
    data_dir(sp)
    sp.set_defaults(func=_cmd_serve)

    _add_token_commands(sub, data_dir)
    _add_apikey_commands(sub, data_dir)
    return p


DataDir = Callable[[argparse.ArgumentParser], None]


def _add_token_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        data_dir: DataDir) -> None:
    tok = sub.add_parser("token", help="enrollment tokens").add_subparsers(dest="action",
                                                                         required=True)
    sp = tok.add_parser("create", help="a one-time token that enrolls one node")
    data_dir(sp)
    sp.add_argument("--site", required=True)
    sp.add_argument("--country", required=True)
    sp.add_argument("--provider", required=True)
    sp.add_argument("--profile", required=True)
    sp.add_argument("--ttl", default="2h", help="lifetime: 90s, 30m, 2h, 7d (default 2h)")
    sp.add_argument("--node-id", default="",
                    help="bind the token to this node id: re-enrolls an enrolled node")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_token_create)
    sp = tok.add_parser("list", help="every enrollment token and its state")
    data_dir(sp)
    sp.add_argument("--state", default="", choices=["", "active", "used", "expired", "withdrawn"])
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_token_list)
    sp = tok.add_parser("withdraw", help="withdraw an unused enrollment token")
    data_dir(sp)
    sp.add_argument("id", type=int)
    sp.set_defaults(func=_cmd_token_withdraw)


def _add_apikey_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                         data_dir: DataDir) -> None:
    key = sub.add_parser("apikey", help="API bearer tokens").add_subparsers(dest="action",
                                                                           required=True)
    sp = key.add_parser("create", help="a bearer token for a role")
    data_dir(sp)
    sp.add_argument("--role", required=True, choices=ROLES)
    sp.add_argument("--name", default="")
    sp.set_defaults(func=_cmd_apikey_create)
    sp = key.add_parser("list", help="every API token and its state")
    data_dir(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_apikey_list)
    sp = key.add_parser("revoke", help="revoke an API token")
    data_dir(sp)
    sp.add_argument("id", type=int)
    sp.set_defaults(func=_cmd_apikey_revoke)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ConfigError, service.InitError, service.ServiceError, BrokerError,
            EnrollmentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
