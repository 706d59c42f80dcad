"""The operators' CLI: ``node show NODE`` and its old form ``node NODE`` (the same output, and a
one-line note on stderr), the node actions' arguments, errors, and the extension interface
``virt8ra demo`` uses. Commands run against the API fixture's real server."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from aggregator.cli import operator
from aggregator.cli.operator import main, parser, with_node_show
from tests.conftest import Api


def _base(api: Api, role: str = "viewer") -> list[str]:
    return ["--api", str(api.client.make_url("")).rstrip("/"), "--token", api.tokens[role]]


async def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``virt8ra argv`` in a thread (its HTTP client blocks; the server runs on this loop)."""
    code = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


async def test_node_show_prints_the_node_and_its_vms(api: Api,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await _run([*_base(api), "node", "show", "si-rack-01"], capsys)
    assert code == 0, err
    assert err == ""
    assert out.startswith("si-rack-01 online — ljubljana-dc-1, SI, arnes (rack-server)")
    assert "┃ name ┃ uuid ┃ state ┃ vcpus ┃ cpu time ┃" in out  # the VMs it reports, none yet
    code, out, err = await _run([*_base(api), "node", "show", "si-rack-01", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["id"] == "si-rack-01"


async def test_the_old_form_still_shows_the_node_with_a_note_on_stderr(
        api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, shown, _ = await _run([*_base(api), "node", "show", "si-rack-01"], capsys)
    assert code == 0
    code, old, err = await _run([*_base(api), "node", "si-rack-01"], capsys)
    assert code == 0
    assert old == shown
    assert err.count("\n") == 1
    assert "deprecated" in err
    assert "node show NODE" in err
    code, out, err = await _run([*_base(api), "node", "--json", "si-rack-01"], capsys)
    assert code == 0
    assert json.loads(out)["id"] == "si-rack-01"
    assert err == operator.DEPRECATED_NODE_FORM + "\n"


async def test_an_unknown_node_is_an_error_on_stderr(api: Api,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await _run([*_base(api), "node", "show", "nowhere-01"], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")


def test_without_a_token_nothing_is_asked(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("VIRT8RA_TOKEN", raising=False)
    assert main(["nodes"]) == 2
    assert capsys.readouterr().err == "error: no API token: pass --token or set VIRT8RA_TOKEN\n"


@pytest.mark.parametrize(("argv", "expected"), [
    (["node", "si-01"], ["node", "show", "si-01"]),
    (["node", "si-01", "--json"], ["node", "show", "si-01", "--json"]),
    (["--api", "http://h:1", "--token", "t", "node", "--json", "si-01"],
     ["--api", "http://h:1", "--token", "t", "node", "show", "--json", "si-01"]),
    (["--api=http://h:1", "node", "si-01"], ["--api=http://h:1", "node", "show", "si-01"]),
    (["node", "show", "si-01"], None),
    (["node", "revoke", "si-01", "--reason", "stolen"], None),
    (["node", "drain", "--parallel", "3", "si-01"], None),
    (["node", "cordon", "si-01"], None),
    (["node"], None),
    (["node", "--help"], None),
    (["nodes"], None),
    (["vm", "show", "node"], None),
    (["--token"], None),
    ([], None),
])
def test_only_the_old_form_gets_show_put_in(argv: list[str],
                                            expected: list[str] | None) -> None:
    assert with_node_show(argv) == expected


@pytest.mark.parametrize(("argv", "action", "extra"), [
    (["node", "show", "si-01", "--json"], "show", {"json": True}),
    (["node", "revoke", "si-01", "--reason", "stolen"], "revoke",
     {"reason": "stolen", "json": False}),
    (["node", "cordon", "si-01", "--reason", "maintenance"], "cordon",
     {"reason": "maintenance"}),
    (["node", "uncordon", "si-01"], "uncordon", {"reason": ""}),
    (["node", "drain", "si-01", "--parallel", "3", "--mode", "cold", "--wait", "0"], "drain",
     {"parallel": 3, "mode": "cold", "timeout": 300, "wait": 0.0}),
])
def test_each_node_action_takes_the_node_and_its_options(argv: list[str], action: str,
                                                         extra: dict[str, object]) -> None:
    args = parser().parse_args(argv)
    assert (args.command, args.action, args.id) == ("node", action, "si-01")
    for name, value in extra.items():
        assert getattr(args, name) == value


def test_a_node_action_without_its_node_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["node", "revoke"])
    assert exited.value.code == 2
    assert "usage: virt8ra node revoke" in capsys.readouterr().err


def test_an_extension_adds_commands_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    def hello(args: argparse.Namespace, console: object) -> int:
        print(f"hello {args.who}")
        return 7

    def extend(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        sp = sub.add_parser("hello")
        sp.add_argument("who")
        sp.set_defaults(func=hello)

    assert main(["hello", "world"], extend=extend) == 7
    assert capsys.readouterr().out == "hello world\n"
