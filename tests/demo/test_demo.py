"""``virt8ra demo`` as README shows it: enrolled agents report, Ctrl-C stops everything."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from aggregator.cli.client import ApiClient
from demo.run import Demo
from tests.rig import free_port, wait_for


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _demo(data_dir: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "demo.cli", "demo", "--data-dir", str(data_dir),
         "--nodes", "4", "--api-port", str(port), "--interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _online(api: ApiClient, count: int) -> list[dict[str, object]]:
    try:
        nodes: list[dict[str, object]] = api.get("/api/v1/nodes")["nodes"]
    except Exception:
        return []
    return nodes if sum(n["status"] == "online" for n in nodes) == count else []


def _descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (children, theirs, and so on)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if state != "Z":
            parents[int(entry.name)] = int(ppid)
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _interrupt(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped" in out
    return out


def test_demo_runs_a_fleet_and_stops_cleanly(workdir: Path) -> None:
    data_dir = workdir / "demo"
    port = free_port()
    proc = _demo(data_dir, port)
    try:
        token_file = wait_for(lambda: (data_dir / "admin-token").exists()
                              and data_dir / "admin-token", what="the admin token")
        api = ApiClient(f"http://127.0.0.1:{port}", token_file.read_text().strip())

        nodes = wait_for(lambda: _online(api, 4), timeout_s=60, what="four demo nodes online")
        assert len({n["country"] for n in nodes}) == 4
        assert len({n["provider"] for n in nodes}) == 4
        assert {n["profile"] for n in nodes} == {"tower-5g", "edge-server", "rack-server"}
        assert all(n["capacity"] for n in nodes)
        assert len(_processes_mentioning(str(data_dir))) >= 6  # aggregator, broker, 4 agents

        # The operators' CLI over the same API.
        env = {**os.environ, "VIRT8RA_API": api.base_url, "VIRT8RA_TOKEN": api.token,
               "COLUMNS": "200"}
        cli = [sys.executable, "-m", "aggregator.cli.operator"]
        table = subprocess.run([*cli, "nodes"], env=env, capture_output=True, text=True,
                               check=True).stdout
        assert all(str(n["id"]) in table for n in nodes)
        assert table.count("online") == 4
        first = str(nodes[0]["id"])
        shown = subprocess.run([*cli, "node", first], env=env, capture_output=True, text=True,
                               check=True).stdout
        assert f"{first}-guest-1" in shown
        # A VM from the image the demo registered, where its policy allows.
        country = str(nodes[0]["country"])
        made = subprocess.run([*cli, "vm", "create", "cam-7", "--image", "tiny", "--disk", "1",
                               "--country", country, "--wait", "30"], env=env,
                              capture_output=True, text=True, check=False)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "create succeeded" in made.stdout
        vm = api.get("/api/v1/vms/cam-7")
        assert vm["actual_state"] == "running"
        assert api.get(f"/api/v1/nodes/{vm['node']}")["country"] == country
        refused = subprocess.run([*cli, "--token", "wrong", "nodes"], env=env,
                                 capture_output=True, text=True, check=False)
        assert refused.returncode == 2
        assert "bearer token" in refused.stderr
        started = _descendants(proc.pid)  # the aggregator's helpers, the broker, the agents
        assert len(started) >= 8
    finally:
        _interrupt(proc)
    assert _processes_mentioning(str(data_dir)) == []
    assert [pid for pid in started if _alive(pid)] == []  # all gone when the demo returns

    # The same command again reuses the directory (here on another port): same fleet, no
    # new enrollment, telemetry numbering carried on.
    port = free_port()
    proc = _demo(data_dir, port)
    try:
        api = ApiClient(f"http://127.0.0.1:{port}", token_file.read_text().strip())
        again = wait_for(lambda: _online(api, 4), timeout_s=60, what="the fleet back online")
        assert {n["id"] for n in again} == {n["id"] for n in nodes}
        for n in again:
            assert api.get(f"/api/v1/nodes/{n['id']}")["gaps"] == []
    finally:
        out = _interrupt(proc)
    assert "reusing" in out
    assert "enrolled" not in out
    assert _processes_mentioning(str(data_dir)) == []


def test_the_demo_reaps_a_child_that_dies_while_it_starts(tmp_path: Path) -> None:
    """No zombie that looks alive to ``kill -0`` while start-up is still busy."""
    demo = Demo(tmp_path, 1, free_port(), free_port(), 1.0, Console(file=io.StringIO()))
    with demo.reaping():
        proc = demo._spawn("short-lived", ["true"])
        deadline = time.monotonic() + 10
        while _alive(proc.pid) or Path(f"/proc/{proc.pid}").exists():
            assert time.monotonic() < deadline, "the child stayed a zombie"
            time.sleep(0.05)  # busy elsewhere: only the SIGCHLD handler reaps
    assert proc.returncode == 0
    demo.stop()
