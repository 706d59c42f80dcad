"""``virt8ra``: the operators' CLI (aggregator/cli/operator.py) with ``virt8ra demo``, which
runs the whole system on this machine: it sits above both the aggregator and the agent."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from aggregator.cli import operator


def _cmd_demo(args: argparse.Namespace, console: Any) -> int:
    from demo.run import run_demo  # only the demo pays for the two-host rig's imports

    return run_demo(args.data_dir, args.nodes, args.api_port, args.broker_port, args.interval,
                    args.real)


def add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("demo", help="run the whole system on this machine")
    sp.add_argument("--data-dir", type=Path, required=True)
    sp.add_argument("--nodes", type=int, default=6)
    sp.add_argument("--api-port", type=int, default=8480)
    sp.add_argument("--broker-port", type=int, default=0, help="default: a free port")
    sp.add_argument("--interval", type=float, default=2.0, help="agents' telemetry interval")
    sp.add_argument("--real", action="store_true", help="two real libvirt hosts in network"
                    " namespaces, real QEMU guests and live migration (root; --nodes 2)")
    sp.set_defaults(func=_cmd_demo)


def main(argv: list[str] | None = None) -> int:
    return operator.main(argv, extend=add_demo)


if __name__ == "__main__":
    sys.exit(main())
