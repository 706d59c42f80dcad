"""``virt8ra demo`` as README shows it: enrolled agents report, Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from aggregator.client import ApiClient
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
        [sys.executable, "-m", "aggregator.operator_cli", "demo", "--data-dir", str(data_dir),
         "--nodes", "4", "--api-port", str(port), "--interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _online(api: ApiClient, count: int) -> list[dict[str, object]]:
    try:
        nodes: list[dict[str, object]] = api.get("/api/v1/nodes")["nodes"]
    except Exception:
        return []
    return nodes if sum(n["status"] == "online" for n in nodes) == count else []


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
        cli = [sys.executable, "-m", "aggregator.operator_cli"]
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
    finally:
        _interrupt(proc)
    assert _processes_mentioning(str(data_dir)) == []

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
