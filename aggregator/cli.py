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

import sqlite_utils

from agent.configfile import ConfigError
from agent.profiles import default_profiles_dir, load_profiles
from aggregator import service
from aggregator.auth import ROLES, create_api_token
from aggregator.broker import BrokerError
from aggregator.config import Layout
from aggregator.enrollment import EnrollmentError, TokenScope, create_token
from aggregator.pki import CertificateAuthority
from aggregator.store import Store

T = TypeVar("T")
DEFAULT_DATA_DIR = Path("/var/lib/virt8ra-aggregator")


def _with_store(data_dir: Path, fn: Callable[[sqlite_utils.Database], T]) -> T:
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
                          broker_port=args.broker_port, broker_user=args.broker_user)
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
        args.data_dir, lambda db: create_token(db, scope, parse_ttl(args.ttl), now)
    )
    result["ca_fingerprint"] = CertificateAuthority(Layout(args.data_dir).pki).fingerprint()
    print(json.dumps(result, indent=2) if args.json else
          f"token:          {result['token']}\nexpires at:     "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(result['expires_at']))}\n"
          f"ca fingerprint: {result['ca_fingerprint']}")
    return 0


def _cmd_apikey_create(args: argparse.Namespace) -> int:
    now = time.time()
    token = _with_store(args.data_dir, lambda db: create_api_token(db, args.role, args.name, now))
    print(token)
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
    sp.set_defaults(func=_cmd_init)

    sp = sub.add_parser("serve", help="run the aggregator (and its managed broker)")
    data_dir(sp)
    sp.set_defaults(func=_cmd_serve)

    tok = sub.add_parser("token", help="enrollment tokens").add_subparsers(dest="action",
                                                                         required=True)
    sp = tok.add_parser("create", help="a one-time token that enrolls one node")
    data_dir(sp)
    sp.add_argument("--site", required=True)
    sp.add_argument("--country", required=True)
    sp.add_argument("--provider", required=True)
    sp.add_argument("--profile", required=True)
    sp.add_argument("--ttl", default="2h", help="lifetime: 90s, 30m, 2h, 7d (default 2h)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_token_create)

    key = sub.add_parser("apikey", help="API bearer tokens").add_subparsers(dest="action",
                                                                           required=True)
    sp = key.add_parser("create", help="a bearer token for a role")
    data_dir(sp)
    sp.add_argument("--role", required=True, choices=ROLES)
    sp.add_argument("--name", default="")
    sp.set_defaults(func=_cmd_apikey_create)
    return p


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
