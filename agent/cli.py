"""``virt8ra-agent``: run the daemon, or enroll this node.

The daemon's imports stay lean: enrollment (and cryptography with it) is imported only by the
enroll command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agent.configfile import ConfigError

DEFAULT_CONFIG_DIR = Path("/etc/virt8ra")
DEFAULT_STATE_DIR = Path("/var/lib/virt8ra")


def _cmd_run(args: argparse.Namespace) -> int:
    from agent import config, daemon
    from agent.hypervisor import HypervisorError

    try:
        daemon.run(config.load(args.config))
    except HypervisorError as exc:
        print(f"error: libvirt: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enroll import EnrollError, EnrollOptions, default_node_id, enroll

    try:
        path = enroll(EnrollOptions(
            aggregator=args.aggregator,
            token=args.token,
            node_id=args.node_id or default_node_id(),
            config_dir=args.config_dir,
            state_dir=args.state_dir,
            libvirt_uri=args.libvirt_uri,
            ca_fingerprint=args.ca_fingerprint,
            simulate_profile=args.simulate,
            interval_s=args.interval,
            force=args.force,
            group=args.group,
        ))
    except EnrollError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"enrolled; config written to {path}")
    print(f"next: virt8ra-agent run --config {path}  (or: systemctl enable --now virt8ra-agent)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt8ra-agent", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("run", help="run the agent daemon")
    sp.add_argument("--config", type=Path, default=DEFAULT_CONFIG_DIR / "agent.toml")
    sp.set_defaults(func=_cmd_run)

    sp = sub.add_parser("enroll", help="enroll this node with a one-time token")
    sp.add_argument("--aggregator", required=True, help="the aggregator's URL")
    sp.add_argument("--token", required=True, help="the one-time enrollment token")
    sp.add_argument("--ca-fingerprint", required=True,
                    help="sha256:... of the fleet CA, as given with the token")
    sp.add_argument("--node-id", default="", help="this node's id (default: host name)")
    sp.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR)
    sp.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    sp.add_argument("--libvirt-uri", default="qemu:///system")
    sp.add_argument("--simulate", default="", metavar="PROFILE",
                    help="manage a simulated libvirt test-driver host of this hardware profile")
    sp.add_argument("--interval", type=float, default=10.0, help="telemetry interval, seconds")
    sp.add_argument("--force", action="store_true", help="re-enroll an enrolled node")
    sp.add_argument("--group", default="",
                    help="the agent service's group, allowed to read the key (e.g. virt8ra)")
    sp.set_defaults(func=_cmd_enroll)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
