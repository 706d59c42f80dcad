"""``virt8ra demo``: the whole system on one machine, no hypervisor needed.

A managed Mosquitto with mutual TLS, the aggregator, and N agents, each enrolled through the
real path (token from the API → ``virt8ra-agent enroll`` → CSR → certificate) and each managing
its own libvirt test-driver host made from a hardware profile, spread over several countries
and providers. Runs until interrupted, then stops everything it started.

``--real`` (root): two real libvirt hosts instead, each in its own network namespace
(:mod:`demo.tworig`), as two nodes whose libvirt daemons migrate guests to each other
over TLS with the fleet's certificates; the tiny guest (a kernel and an initrd built from
Debian packages) is registered as images and one VM of it started on the first node. On exit
the guests, the libvirt daemons and the namespaces go too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from aggregator.cli.client import ApiClient, ApiClientError
from aggregator.config import Layout
from demo.guestimage import build_tiny_guest
from demo.tworig import Host, TwoHosts
from plumbing import configfile

# (country, provider, site, profile): a fleet spread over providers and countries.
FLEET: tuple[tuple[str, str, str, str], ...] = (
    ("SI", "telekom-slovenije", "ljubljana-tower-7", "tower-5g"),
    ("DE", "deutsche-telekom", "munich-mdc-2", "edge-server"),
    ("FR", "ovhcloud", "roubaix-rack-14", "rack-server"),
    ("AT", "a1-telekom", "graz-tower-3", "tower-5g"),
    ("IT", "aruba", "milan-mdc-1", "edge-server"),
    ("NL", "leaseweb", "amsterdam-rack-2", "rack-server"),
    ("HR", "hrvatski-telekom", "zagreb-tower-12", "tower-5g"),
    ("ES", "telefonica", "madrid-mdc-4", "edge-server"),
)


@dataclass(frozen=True)
class DemoNode:
    id: str
    country: str
    provider: str
    site: str
    profile: str


def demo_nodes(n: int) -> list[DemoNode]:
    nodes = []
    for i in range(n):
        country, provider, site, profile = FLEET[i % len(FLEET)]
        number = i // len(FLEET) + 1
        kind = {"tower-5g": "tower", "edge-server": "edge", "rack-server": "rack"}[profile]
        nodes.append(DemoNode(f"{country.lower()}-{kind}-{number:02d}", country, provider, site,
                              profile))
    return nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


# The real mode's two nodes, one per libvirt host of the rig.
REAL_NODES: tuple[DemoNode, ...] = (
    DemoNode("si-lab-01", "SI", "arnes", "ljubljana-lab", "lab-host"),
    DemoNode("at-lab-01", "AT", "a1-telekom", "graz-lab", "lab-host"),
)
REAL_RIG_NAME = "v8demo"
GUEST_CACHE = Path("/var/cache/virt8ra/tiny-guest")


class Demo:
    def __init__(self, data_dir: Path, nodes: int, api_port: int, broker_port: int,
                 interval_s: float, console: Console, real: bool = False) -> None:
        self.dir = data_dir.resolve()
        self.layout = Layout(self.dir)
        self.real = real
        self.rig: TwoHosts | None = None
        self.nodes = list(REAL_NODES) if real else demo_nodes(nodes)
        self.api_port = api_port
        self.broker_port = broker_port or free_port()
        self.interval_s = interval_s
        self.console = console
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        # Its own process group: what it starts in turn (the aggregator's broker, ingest
        # process and multiprocessing's resource tracker) is waited for with it in stop(),
        # and Ctrl-C reaches the demo alone, which stops the agents before the aggregator.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)
        self.procs[name] = proc
        return proc

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])} failed: {result.stderr.strip()}")

    def start(self) -> ApiClient:
        py = sys.executable
        if not self.layout.config.exists():
            self.console.print(f"initialising [bold]{self.dir}[/]")
            self._run([py, "-m", "aggregator", "init", "--data-dir", str(self.dir),
                       "--api-port", str(self.api_port), "--broker-port", str(self.broker_port),
                       "--images-port", str(free_port())])
        else:
            self.console.print(f"reusing [bold]{self.dir}[/] (already initialised)")
            self._use_api_port()
        self._spawn("aggregator", [py, "-m", "aggregator", "serve", "--data-dir", str(self.dir)])
        api = ApiClient(f"http://127.0.0.1:{self.api_port}",
                        self.layout.admin_token.read_text().strip())
        self._wait_healthy(api)
        if self.real:
            self._start_real(api)
            return api
        self._register_image(api)
        for node in self.nodes:
            self._start_agent(api, node)
        return api

    def _start_real(self, api: ApiClient) -> None:
        """Two libvirt hosts, their agents, the tiny guest's images, and one VM of it."""
        with self.console.status("building the tiny guest from Debian packages (cached)"):
            guest = build_tiny_guest(GUEST_CACHE)
        self.console.print(f"tiny guest: {guest.kernel_package} {guest.kernel_version}")
        workdir = self.dir / "hosts"
        workdir.mkdir(parents=True, exist_ok=True)
        self.rig = TwoHosts(workdir, name=REAL_RIG_NAME)
        with self.console.status("starting two libvirt hosts in network namespaces"):
            self.rig.setup()
        for node, host in zip(self.nodes, self.rig.hosts, strict=True):
            self.console.print(f"  libvirt host [cyan]{host.name}[/] at {host.address} (inside"
                               f" its namespace) for node {node.id}")
        names = {i["name"] for i in api.get("/api/v1/images")["images"]}
        for name, path, fmt in (("tiny-kernel", guest.kernel, "kernel"),
                                ("tiny-initrd", guest.initrd, "initrd")):
            if name not in names:
                api.post("/api/v1/images", {"name": name, "path": str(path), "format": fmt})
        for node, host in zip(self.nodes, self.rig.hosts, strict=True):
            self._start_agent(api, node, host)
        self.wait_online(api, timeout_s=60)
        if any(v["name"] == REAL_VM for v in api.get("/api/v1/vms")["vms"]):
            return
        first, second = self.nodes
        api.post(f"/api/v1/nodes/{second.id}/cordon", {"reason": "demo: the first VM on"
                                                                 f" {first.id}"})
        try:
            made = api.post("/api/v1/vms", {
                "name": REAL_VM, "vcpus": 1, "memory_mib": 128,
                "boot": {"kernel": "tiny-kernel", "initrd": "tiny-initrd",
                         "cmdline": "console=ttyS0"}})
        finally:
            api.post(f"/api/v1/nodes/{second.id}/uncordon", {})
        with self.console.status(f"booting {REAL_VM} on {made['node']}"):
            deadline = time.monotonic() + 120
            while api.get(f"/api/v1/vms/{REAL_VM}")["actual_state"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{REAL_VM} did not start; see {self.dir / 'logs'}")
                time.sleep(0.5)
        self.console.print(f"[green]{REAL_VM}[/] runs on {made['node']}; its console:"
                           f" {self.dir / 'nodes' / made['node'] / 'state' / 'disks'}"
                           f"/{made['id']}/serial.log")

    def _register_image(self, api: ApiClient) -> None:
        """A small disk image, so VMs can be created at once (test-driver nodes fetch and
        check it like any image; they run no disks)."""
        if any(i["name"] == DEMO_IMAGE for i in api.get("/api/v1/images")["images"]):
            return
        image = b"virt8ra demo image\n".ljust(1 << 20, b"\0")
        api.request("POST", "/api/v1/images", query={"name": DEMO_IMAGE, "format": "raw"},
                    raw=image)
        self.console.print(f"registered image [cyan]{DEMO_IMAGE}[/] (1 MiB)")

    def _use_api_port(self) -> None:
        """Serve on the port asked for now, whatever the directory was made with."""
        with self.layout.config.open("rb") as fh:
            table = tomllib.load(fh)
        if table.get("api", {}).get("port") != self.api_port:
            table.setdefault("api", {})["port"] = self.api_port
            self.layout.config.write_text(configfile.dump_toml(table))

    def _wait_healthy(self, api: ApiClient, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                api.get("/healthz")
                return
            except ApiClientError:
                proc = self.procs["aggregator"]
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the aggregator did not start; see {self.dir / 'logs/aggregator.log'}"
                    ) from None
                time.sleep(0.2)

    def _start_agent(self, api: ApiClient, node: DemoNode, host: Host | None = None) -> None:
        home = self.dir / "nodes" / node.id
        config = home / "etc" / "agent.toml"
        py = sys.executable
        if not config.exists():
            grant = api.post("/api/v1/enrollment-tokens", {
                "site": node.site, "country": node.country, "provider": node.provider,
                "profile": node.profile, "ttl_seconds": 600,
            })
            where = ["--simulate", node.profile] if host is None else [
                "--libvirt-uri", host.uri, "--profile", node.profile, "--domain-type", "qemu",
                "--migration-address", host.address, "--tls-dir", str(host.tls_dir),
                "--libvirt-admin-uri", host.admin_uri]
            self._run([
                py, "-m", "agent", "enroll", "--aggregator", api.base_url,
                "--token", grant["token"], "--ca-fingerprint", grant["ca_fingerprint"],
                "--node-id", node.id, "--config-dir", str(home / "etc"),
                "--state-dir", str(home / "state"), *where,
                "--interval", str(self.interval_s),
            ])
            if host is not None:  # the tiny guest ignores ACPI: stop it after 3 s
                with config.open("rb") as fh:
                    table = tomllib.load(fh)
                table["orders"]["shutdown_timeout_s"] = 3.0
                config.write_text(configfile.dump_toml(table))
            self.console.print(f"  enrolled [cyan]{node.id}[/] ({node.profile}, {node.site}, "
                               f"{node.country}, {node.provider})")
        self._spawn(node.id, [py, "-m", "agent", "run", "--config", str(config)])

    def wait_online(self, api: ApiClient, timeout_s: float = 30) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout_s
        while True:
            nodes: list[dict[str, object]] = api.get("/api/v1/nodes")["nodes"]
            wanted = {n.id for n in self.nodes}
            online = {str(n["id"]) for n in nodes if n["status"] == "online"}
            if wanted <= online or time.monotonic() > deadline:
                return nodes
            time.sleep(0.3)

    @contextlib.contextmanager
    def reaping(self) -> Iterator[None]:
        """Collect each child as it exits (on SIGCHLD), so none stays a zombie that looks
        alive while start-up goes on. Safe inside a signal handler: ``poll`` never blocks,
        and gives up at once if a ``wait`` holds the lock."""

        def reap(signum: int, frame: FrameType | None) -> None:
            for proc in list(self.procs.values()):
                proc.poll()

        previous = signal.signal(signal.SIGCHLD, reap)
        try:
            yield
        finally:
            signal.signal(signal.SIGCHLD, previous)

    def supervise(self) -> None:
        """Block until interrupted; report children that die."""
        reported: set[str] = set()
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in reported:
                    reported.add(name)
                    self.console.print(f"[red]{name} exited ({proc.returncode}); see "
                                       f"{self.dir / 'logs' / (name + '.log')}[/]")
            time.sleep(0.5)

    def stop(self) -> None:
        agents = [p for n, p in self.procs.items() if n != "aggregator"]
        for proc in [*agents, self.procs.get("aggregator")]:
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            if proc is self.procs.get("aggregator"):
                for p in agents:  # agents first, so each says offline itself
                    _wait(p)
        for proc in self.procs.values():
            _wait(proc)
            _wait_group(proc.pid)
        for log in self._logs:
            log.close()
        if self.rig is not None:  # the guests, the libvirt daemons, the namespaces
            self.rig.teardown()


DEMO_IMAGE = "tiny"
REAL_VM = "demo-1"


def _wait(proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _wait_group(pgid: int, timeout_s: float = 15) -> None:
    """Until every process of the group is gone; past the timeout they are killed."""
    deadline, killed = time.monotonic() + timeout_s, False
    while _group_members(pgid):
        if time.monotonic() > deadline:
            if killed:
                return  # unkillable (stuck in the kernel): nothing more to do
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 5, True
        time.sleep(0.05)


def _summary(console: Console, nodes: list[dict[str, object]]) -> None:
    table = Table(title="virt8ra demo fleet")
    for col in ("node", "status", "country", "provider", "site", "profile", "cpus", "memory"):
        table.add_column(col)
    for n in nodes:
        cap = n.get("capacity") or {}
        assert isinstance(cap, dict)
        mem = cap.get("memory_bytes")
        table.add_row(
            str(n["id"]), str(n["status"]), str(n["country"]), str(n["provider"]), str(n["site"]),
            str(n["profile"]), str(cap.get("cpus", "")),
            f"{int(mem) // 2**30} GiB" if isinstance(mem, int) else "",
        )
    console.print(table)


class _SignalSafeConsole(Console):
    """A console whose printing Ctrl-C and SIGTERM do not cut in half: the demo stops by an
    exception raised from the signal handler, and one raised inside rich's print leaves its
    output buffer open, so nothing printed after it would ever show. The signals wait (they
    are blocked in this thread) until the print is done."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        blocked = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            super().print(*objects, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _next_steps(demo: Demo, api_port: int, real: bool) -> str:
    token_file = demo.layout.admin_token
    api = f"http://127.0.0.1:{api_port}"
    return (
        f"\nAPI: {api}  (admin token in {token_file})\n"
        f"  curl -H \"Authorization: Bearer $(cat {token_file})\" "
        f"127.0.0.1:{api_port}/api/v1/nodes\n"
        f"  export VIRT8RA_API={api} VIRT8RA_TOKEN=$(cat {token_file})\n"
        f"  virt8ra nodes\n"
        + (f"  virt8ra vm migrate {REAL_VM} --to {REAL_NODES[1].id}\n"
           f"  virt8ra vm create tiny-2 --memory 128 --kernel tiny-kernel --initrd"
           f" tiny-initrd --cmdline console=ttyS0\n"
           f"  virt8ra node drain {REAL_NODES[0].id}; virt8ra moves;"
           f" virt8ra vm residency {REAL_VM}\n"
           if real else
           f"  virt8ra vm create cam-7 --image {DEMO_IMAGE} --disk 1 --country SI\n"
           f"  virt8ra vms; virt8ra orders; virt8ra vm residency cam-7\n")
        + f"logs in {demo.dir / 'logs'}; Ctrl-C stops everything."
    )


def run_demo(data_dir: Path, nodes: int, api_port: int, broker_port: int = 0,
             interval_s: float = 2.0, real: bool = False) -> int:
    console = _SignalSafeConsole()
    if nodes < 1:
        console.print("[red]--nodes must be at least 1[/]")
        return 2
    if real and nodes != 2:
        console.print("[red]--real runs two nodes (two libvirt hosts): --nodes 2[/]")
        return 2
    if real and os.geteuid() != 0:
        console.print("[red]--real needs root: it starts libvirt daemons in network"
                      " namespaces[/]")
        return 2
    demo = Demo(data_dir, nodes, api_port, broker_port, interval_s, console, real)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    with demo.reaping():
        try:
            api = demo.start()
            _summary(console, demo.wait_online(api))
            print(_next_steps(demo, api_port, real), flush=True)
            demo.supervise()
        except (KeyboardInterrupt, _Stop):
            console.print("\nstopping…")
        except (RuntimeError, ApiClientError, OSError) as exc:
            console.print(f"[red]demo failed: {exc}[/]")
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            demo.stop()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    console.print("stopped")
    return 0

