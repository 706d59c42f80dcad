"""``virt8ra-agent``: run the daemon, check this host against a hardware profile, or enroll it.

The daemon's imports stay lean: enrollment (and cryptography with it) is imported only by the
enroll command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

from plumbing.configfile import ConfigError

DEFAULT_CONFIG_DIR = Path("/etc/virt8ra")
DEFAULT_STATE_DIR = Path("/var/lib/virt8ra")


def _cmd_run(args: argparse.Namespace) -> int:
    from agent import config, daemon
    from agent.host.hypervisor import HypervisorError
    from agent.identity.certificates import IdentityExpired
    from agent.orders.runner import OrderKeyError

    try:
        daemon.run(config.load(args.config))
    except HypervisorError as exc:
        print(f"error: libvirt: {exc}", file=sys.stderr)
        return 2
    except OrderKeyError as exc:
        print(f"error: the order-signing key: {exc}", file=sys.stderr)
        return 2
    except IdentityExpired as exc:  # systemd: RestartPreventExitStatus=3
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """0: the host meets the profile; 1: a requirement failed; 2: usage (unknown profile)."""
    from agent.host import hostcheck, simhost
    from contract.profiles import default_profiles_dir

    directory = args.profiles_dir or default_profiles_dir()
    name = args.profile or args.simulate
    if not name:
        print("error: --profile: name the hardware profile to check against", file=sys.stderr)
        return 2
    try:
        profile = hostcheck.find_profile(directory, name)
        simulated = hostcheck.find_profile(directory, args.simulate) if args.simulate else None
    except hostcheck.UnknownProfile as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="virt8ra-check-") as tmp:
        target = hostcheck.Target(args.libvirt_uri)
        if simulated is not None:
            uri = simhost.write_host(simulated, "check", Path(tmp) / "simulated-host.xml")
            target = hostcheck.Target(uri, simulation=simulated)
        report = asyncio.run(hostcheck.check(profile, target))
    print(json.dumps(report.to_plain(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


def _cmd_enroll(args: argparse.Namespace) -> int:
    from agent.identity.enroll import EnrollError, EnrollOptions, default_node_id, enroll

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
            profile=args.profile,
            profiles_dir=args.profiles_dir,
            interval_s=args.interval,
            force=args.force,
            group=args.group,
            domain_type=args.domain_type,
            migration_address=args.migration_address,
            migration_transport=args.migration_transport,
            tls_dir=args.tls_dir,
            admin_uri=args.libvirt_admin_uri,
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

    sp = sub.add_parser("check", help="does this host meet a hardware profile? (exit 0: yes, "
                        "1: a requirement fails, 2: usage error)")
    sp.add_argument("--profile", default="", help="the hardware profile to check against "
                    "(default: the --simulate profile)")
    sp.add_argument("--json", action="store_true", help="print the checklist as JSON")
    host = sp.add_mutually_exclusive_group()
    host.add_argument("--libvirt-uri", default="qemu:///system",
                      help="the libvirt host the agent manages (default: qemu:///system)")
    host.add_argument("--simulate", default="", metavar="PROFILE",
                      help="check a simulated libvirt test-driver host of this profile")
    sp.add_argument("--profiles-dir", type=Path, default=None,
                    help="directory of hardware profiles (default: the installed ones)")
    sp.set_defaults(func=_cmd_check)

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
    sp.add_argument("--profile", default="", help="the hardware profile named in the token; "
                    "the host is checked against it before the token is sent "
                    "(default: the --simulate profile)")
    sp.add_argument("--profiles-dir", type=Path, default=None,
                    help="directory of hardware profiles (default: the installed ones)")
    sp.add_argument("--interval", type=float, default=10.0, help="telemetry interval, seconds")
    sp.add_argument("--force", action="store_true", help="re-enroll an enrolled node")
    sp.add_argument("--domain-type", default="auto", choices=["auto", "kvm", "qemu"],
                    help="the guests' domain type (default: what the host offers)")
    sp.add_argument("--group", default="",
                    help="the agent service's group, allowed to read the key (e.g. virt8ra)")
    sp.add_argument("--migration-address", default="",
                    help="where other nodes' libvirtd reach this node's for live migration"
                    " (an IP address or DNS name; it goes into the certificate)")
    sp.add_argument("--migration-transport", default="tls", choices=["tls", "tcp"],
                    help="tls (default): libvirt's TLS port with fleet certificates; tcp: a"
                    " closed lab network only")
    sp.add_argument("--tls-dir", type=Path, default=Path("/etc/pki"),
                    help="where libvirt reads its TLS files (CA/, libvirt/, qemu/)")
    sp.add_argument("--libvirt-admin-uri", default="libvirtd:///system",
                    help="libvirtd's admin URI, to reload its TLS files after a renewal")
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
