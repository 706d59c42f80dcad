#!/usr/bin/env python3
"""Agent footprint benchmark: RSS and CPU of `virt8ra-agent run` on a simulated 50-guest host.

Initialises an aggregator in a fresh /tmp/bench-footprint-* data dir and runs `serve` (its
managed Mosquitto is the broker). Each agent gets a certificate from the fleet CA
(aggregator.trust.pki.CertificateAuthority.issue_to_files, as enrollment would give it), a
config file
written by hand, and its own libvirt test-driver host (`test:///abs/path.xml`, built with
agent.host.simhost.host_xml) with --guests guests. Two agents run side by side, one per row:
  default            the environment as is
  MALLOC_ARENA_MAX=2 glibc limited to two malloc arenas
Each samples every --interval seconds for --duration seconds. Reported per agent: RSS (max over
the run, sampled every second, and final), USS and PSS at the end, threads, CPU as % of one
core averaged over the whole run (process CPU time / wall time, start-up included) and over the
steady part (after --warmup seconds), and the telemetry the aggregator stored from it.
Targets: RSS under 40 MB, CPU under 1% of one core.
Everything started here is stopped by pid at the end, also on Ctrl-C; the data dir is removed
unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _common import (
    Children,
    check_port,
    fmt,
    install_sigterm_as_interrupt,
    log,
    make_data_dir,
    remove_data_dir,
    run_quiet,
    table,
    wait_for_port,
)

from agent.host.simhost import host_xml
from contract.profiles import default_profiles_dir, load_profile

MB = 1024 * 1024
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "MALLOC_ARENA_MAX=2": {"MALLOC_ARENA_MAX": "2"},
}


@dataclass
class Agent:
    label: str
    node: str
    env: dict[str, str]
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    started: float = 0.0
    rss: list[int] = field(default_factory=list)
    cpu_at_warmup: float | None = None
    t_warmup: float | None = None
    final: dict[str, float] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/agent_footprint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds each agent runs (default 60)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="telemetry interval of the agents, seconds (default 10)")
    p.add_argument("--guests", type=int, default=50, help="guests on the simulated host (50)")
    p.add_argument("--warmup", type=float, default=15.0,
                   help="seconds excluded from the steady CPU figure (default 15)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--sequential", action="store_true",
                   help="run the agents one after the other instead of side by side")
    p.add_argument("--broker-port", type=int, default=21884, help="default 21884")
    p.add_argument("--api-port", type=int, default=21481, help="default 21481")
    p.add_argument("--rss-target-mb", type=float, default=40.0)
    p.add_argument("--cpu-target", type=float, default=1.0, help="%% of one core (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the data dir (logs, database)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.warmup >= args.duration:
        p.error("--warmup must be shorter than --duration")
    return args


def metrics(api_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def write_agent(root: Path, ca: object, node: str, args: argparse.Namespace) -> Path:
    """Certificate, simulated host and config for one agent, as enrollment would lay them out."""
    d = root / node
    d.mkdir()
    ca.issue_to_files(node, d / "node.crt", d / "node.key", server=False)  # type: ignore[attr-defined]
    profile = load_profile(default_profiles_dir() / "edge-server.toml")
    profile = dataclasses.replace(
        profile, simulation=dataclasses.replace(profile.simulation, guests=args.guests))
    (d / "host.xml").write_text(host_xml(profile, node))
    config = d / "agent.toml"
    config.write_text(f"""\
# written by bench/agent_footprint.py
[node]
id = "{node}"
profile = "edge-server"

[broker]
host = "127.0.0.1"
port = {args.broker_port}
ca_file = "{root.parent / 'pki' / 'ca.crt'}"
cert_file = "{d / 'node.crt'}"
key_file = "{d / 'node.key'}"

[libvirt]
uri = "test://{(d / 'host.xml').resolve()}"

[telemetry]
interval_s = {float(args.interval)}
spool_path = "{d / 'spool.sqlite'}"

[orders]
signing_key_file = "{root.parent / 'pki' / 'order-signing.pub'}"
journal_path = "{d / 'orders.sqlite'}"
images_dir = "{d / 'images'}"
disks_dir = "{d / 'disks'}"
""")
    return config


def start_agent(agent: Agent, children: Children, logdir: Path) -> None:
    env = {**os.environ, **agent.env}
    with open(logdir / f"{agent.node}.log", "ab") as fh:
        agent.proc = children.add(agent.label, subprocess.Popen(
            ["virt8ra-agent", "run", "--config", str(agent.config)], env=env,
            stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True))
    agent.started = time.time()
    agent.ps = psutil.Process(agent.proc.pid)


def sample(agent: Agent, now: float, warmup: float) -> None:
    assert agent.ps is not None
    assert agent.proc is not None
    if agent.proc.poll() is not None:
        raise RuntimeError(f"agent {agent.label} exited with {agent.proc.returncode}; "
                           f"see its log")
    agent.rss.append(agent.ps.memory_info().rss)
    if agent.t_warmup is None and now - agent.started >= warmup:
        t = agent.ps.cpu_times()
        agent.cpu_at_warmup, agent.t_warmup = t.user + t.system, now


def finish(agent: Agent) -> None:
    """Final figures, read while the agent is still running."""
    assert agent.ps is not None
    now = time.time()
    t = agent.ps.cpu_times()
    cpu = t.user + t.system
    full = agent.ps.memory_full_info()
    # CPU time since the process was created (Popen is a few ms after fork: negligible).
    wall = now - agent.ps.create_time()
    agent.rss.append(full.rss)
    agent.final = {
        "rss_final": full.rss,
        "rss_max": max(agent.rss),
        "uss": full.uss,
        "pss": full.pss,
        "threads": agent.ps.num_threads(),
        "cpu_total": 100 * cpu / wall,
        "cpu_steady": (100 * (cpu - agent.cpu_at_warmup) / (now - agent.t_warmup)
                       if agent.t_warmup is not None and agent.cpu_at_warmup is not None
                       and now > agent.t_warmup else float("nan")),
        "wall": wall,
    }


def run(args: argparse.Namespace, children: Children, root: Path) -> list[Agent]:
    log(f"data dir {root}")
    run_quiet(["virt8ra-aggregator", "init", "--data-dir", str(root),
               "--api-port", str(args.api_port), "--broker-port", str(args.broker_port)])
    from aggregator.trust.pki import CertificateAuthority

    ca = CertificateAuthority(root / "pki")
    agents_dir = root / "agents"
    agents_dir.mkdir()
    agents = []
    for i, variant in enumerate(args.variants):
        node = f"bench-agent-{i + 1}"
        agents.append(Agent(variant, node, VARIANTS[variant],
                            write_agent(agents_dir, ca, node, args)))

    with open(root / "serve.log", "ab") as fh:
        serve = children.add("serve", subprocess.Popen(
            ["virt8ra-aggregator", "serve", "--data-dir", str(root)], stdin=subprocess.DEVNULL,
            stdout=fh, stderr=fh, start_new_session=True))
    wait_for_port(args.api_port, 30, serve)
    deadline = time.monotonic() + 30
    while metrics(args.api_port).get("virt8ra_ingest_connects_total", 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"aggregator ingest did not connect; see {root / 'serve.log'}")
        time.sleep(0.2)
    log(f"aggregator serving (pid {serve.pid}); broker on 127.0.0.1:{args.broker_port}")

    batches = [[a] for a in agents] if args.sequential else [agents]
    for batch in batches:
        for agent in batch:
            start_agent(agent, children, agents_dir)
            log(f"agent {agent.node} ({agent.label}) started, pid {agent.proc.pid}; "  # type: ignore[union-attr]
                f"{args.guests} guests, interval {args.interval:g} s, {args.duration:g} s")
        end = time.time() + args.duration
        while (now := time.time()) < end:
            for agent in batch:
                sample(agent, now, args.warmup)
            time.sleep(min(1.0, max(0.0, end - time.time())))
        for agent in batch:
            finish(agent)
            children.stop(agent.proc)
            log(f"agent {agent.node} stopped (exit {agent.proc.returncode})")  # type: ignore[union-attr]

    with sqlite3.connect(f"file:{root / 'fleet.sqlite'}?mode=ro", uri=True) as db:
        for agent in agents:
            n, size = db.execute(
                "SELECT count(*), coalesce(avg(length(payload)), 0) FROM telemetry "
                "WHERE node_id = ?", (agent.node,)).fetchone()
            agent.final["stored"] = n
            agent.final["payload"] = size
    children.stop(serve, timeout=30)
    return agents


def report(args: argparse.Namespace, agents: list[Agent]) -> str:
    lines = [
        f"virt8ra agent footprint, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}",
        f"virt8ra-agent run: libvirt test driver host with {args.guests} guests, telemetry every "
        f"{args.interval:g} s, {args.duration:g} s per agent"
        f" ({'one after the other' if args.sequential else 'both agents side by side'})",
        "",
    ]
    rows = []
    for a in agents:
        f = a.final
        rows.append([
            a.label, fmt(f["rss_max"] / MB, 1), fmt(f["rss_final"] / MB, 1),
            fmt(f["uss"] / MB, 1), fmt(f["pss"] / MB, 1), str(int(f["threads"])),
            fmt(f["cpu_total"], 2), fmt(f["cpu_steady"], 2),
            f"{int(f['stored'])} x {f['payload']:,.0f} B",
        ])
    lines.append(table(
        ["agent env", "RSS max MB", "RSS final MB", "USS MB", "PSS MB", "threads",
         "CPU % (whole run)", f"CPU % (after {args.warmup:g} s)", "telemetry stored"],
        rows))
    lines.append("")
    for a in agents:
        f = a.final
        rss_ok = f["rss_max"] / MB < args.rss_target_mb
        cpu_ok = f["cpu_total"] < args.cpu_target
        lines.append(
            f"{a.label}: RSS max {f['rss_max'] / MB:.1f} MB "
            f"{'<' if rss_ok else '>='} {args.rss_target_mb:g} MB -> "
            f"{'meets' if rss_ok else 'MISSES'}; CPU {f['cpu_total']:.2f}% "
            f"{'<' if cpu_ok else '>='} {args.cpu_target:g}% of one core -> "
            f"{'meets' if cpu_ok else 'MISSES'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for port in (args.broker_port, args.api_port):
        check_port(port)
    install_sigterm_as_interrupt()
    children = Children()
    root = make_data_dir("footprint")
    try:
        agents = run(args, children, root)
        print(report(args, agents))
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop_all()
        if args.keep:
            log(f"kept {root}")
        else:
            remove_data_dir(root)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
