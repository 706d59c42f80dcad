"""``virt8ra``: the operators' CLI over the REST API (``virt8ra demo`` is added by demo/cli.py).

The API address and token come from ``--api``/``--token`` or ``VIRT8RA_API``/``VIRT8RA_TOKEN``.
"""

# The commands live by resource, as the API's handlers do: cli/nodes.py, cli/workloads.py,
# cli/trust.py; what they print with, cli/output.py; the HTTP client, cli/client.py.

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rich.console import Console

from aggregator.cli import nodes, trust, workloads
from aggregator.cli.client import ApiClientError

# Adds commands of a layer above the API's (``virt8ra demo``: demo/cli.py).
Extension = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

DEPRECATED_NODE_FORM = ("virt8ra: `virt8ra node NODE` is deprecated and will go in a later"
                        " release; use `virt8ra node show NODE`")


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default="", help="aggregator URL (or VIRT8RA_API)")
    p.add_argument("--token", default="", help="bearer token (or VIRT8RA_TOKEN)")


def parser(extend: Extension | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt8ra", description=__doc__)
    _add_connection(p)
    sub = p.add_subparsers(dest="command", required=True)
    nodes.add_commands(sub)
    trust.add_token_commands(sub)
    workloads.add_commands(sub)
    trust.add_audit_command(sub)
    if extend is not None:
        extend(sub)
    return p


def with_node_show(argv: list[str]) -> list[str] | None:
    """``argv`` with ``show`` put in when it is the old ``virt8ra node NODE``; None when it is
    not that form."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    _add_connection(pre)
    pre.add_argument("command", nargs=argparse.REMAINDER)
    try:
        command = pre.parse_known_args(argv)[0].command
    except argparse.ArgumentError:  # not ours to report: the real parser says what is wrong
        return None
    if not nodes.old_show_form(command):
        return None
    at = len(argv) - len(command) + 1  # just after ``node``
    return [*argv[:at], "show", *argv[at:]]


def main(argv: list[str] | None = None, extend: Extension | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if (rewritten := with_node_show(argv)) is not None:
        print(DEPRECATED_NODE_FORM, file=sys.stderr)
        argv = rewritten
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
