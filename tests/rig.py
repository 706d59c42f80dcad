"""Real parts for tests: a fleet data directory, Mosquitto, the aggregator and agents as
processes. Each part is stopped by the pid it was started with."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.identity.enroll import EnrollOptions, enroll
from aggregator import service
from aggregator.cli.client import ApiClient
from aggregator.config import Layout
from plumbing import configfile

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout_s: float = 20.0, interval_s: float = 0.1,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class Process:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    """An initialised aggregator data directory with its own ports."""

    dir: Path
    api_port: int
    broker_port: int
    admin_token: str
    ca_fingerprint: str
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(self.dir)

    @classmethod
    def create(cls, directory: Path, *, managed_broker: bool = False,
               overrides: dict[str, dict[str, Any]] | None = None) -> Fleet:
        api_port, broker_port = free_port(), free_port()
        result = service.init(directory, api_port=api_port, broker_port=broker_port,
                              images_port=free_port())
        layout = Layout(directory)
        with layout.config.open("rb") as fh:
            table = tomllib.load(fh)
        table["broker"]["managed"] = managed_broker
        table.setdefault("liveness", {}).update({"min_timeout_s": 2.0})
        for section, values in (overrides or {}).items():
            table.setdefault(section, {}).update(values)
        layout.config.write_text(configfile.dump_toml(table))
        return cls(directory, api_port, broker_port, result.admin_token, result.ca_fingerprint)

    @property
    def url(self) -> str:
        with self.layout.config.open("rb") as fh:
            https = tomllib.load(fh)["api"].get("tls") == "on"
        return f"{'https' if https else 'http'}://127.0.0.1:{self.api_port}"

    def api(self, token: str | None = None) -> ApiClient:
        return ApiClient(self.url, token or self.admin_token)

    def broker(self) -> Process:
        conf = self.layout.broker / "mosquitto.conf"
        return Process(["mosquitto", "-c", str(conf)], self.dir / "logs" / "broker.log")

    def aggregator(self) -> Process:
        return Process([sys.executable, "-m", "aggregator", "serve", "--data-dir", str(self.dir)],
                       self.dir / "logs" / "aggregator.log")

    def enroll_node(self, node_id: str, *, profile: str = "tower-5g", country: str = "SI",
                    provider: str = "telekom-slovenije", site: str = "ljubljana-tower-7",
                    interval_s: float = 0.5) -> Path:
        """Enroll a simulated node through the real HTTP path; returns its agent config."""
        grant = self.api().post("/api/v1/enrollment-tokens", {
            "site": site, "country": country, "provider": provider, "profile": profile,
        })
        home = self.dir / "nodes" / node_id
        config = enroll(EnrollOptions(
            aggregator=self.url, token=grant["token"], node_id=node_id,
            config_dir=home / "etc", state_dir=home / "state",
            ca_fingerprint=grant["ca_fingerprint"], simulate_profile=profile,
            interval_s=interval_s,
        ))
        # Tests restart brokers and aggregators on purpose: reconnect within seconds, not the
        # minute a real node backs off to.
        with config.open("rb") as fh:
            table = tomllib.load(fh)
        table["broker"]["backoff_max_s"] = 4.0
        config.write_text(configfile.dump_toml(table))
        return config

    def agent(self, node_id: str) -> Process:
        config = self.dir / "nodes" / node_id / "etc" / "agent.toml"
        return Process([sys.executable, "-m", "agent", "run", "--config", str(config)],
                       self.dir / "logs" / f"{node_id}.log")

    def node(self, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api().get(f"/api/v1/nodes/{node_id}")
        return result

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            try:
                self.api().get("/healthz")
                return True
            except Exception:
                return False

        wait_for(healthy, what="the aggregator's API")


def tweak_config(config: Path, **sections: dict[str, Any]) -> None:
    """Change keys of an agent config written by enrollment."""
    with config.open("rb") as fh:
        table = tomllib.load(fh)
    for section, values in sections.items():
        table.setdefault(section, {}).update(values)
    config.write_text(configfile.dump_toml(table))


class Cutter:
    """A TCP relay on 127.0.0.1 in front of one port: one node's way to the broker, which a
    test cuts (every connection closed, nothing accepted) and restores, while the others
    keep theirs. ``hold`` stops what comes back from the target (acknowledgements stay
    unanswered) until ``cut``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._flowing.set()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def hold(self) -> None:
        self._flowing.clear()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._flowing.set()  # held pumps find their sockets closed

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b, back in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, back), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, back: bool) -> None:
        try:
            while data := src.recv(65536):
                if back:
                    self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:  # each socket is the source of one pump, which closes it
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            src.close()


class FleetApi:
    """The API calls the full-stack test rigs share; ``fleet`` is set by the rig."""

    fleet: Fleet

    @property
    def api(self) -> ApiClient:
        return self.fleet.api()

    def vm(self, ref: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api.get(f"/api/v1/vms/{ref}")
        return found

    def wait_move(self, move_id: str, timeout_s: float = 120) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            move: dict[str, Any] = self.api.get(f"/api/v1/moves/{move_id}")
            return move if move["finished_at"] is not None else None

        return wait_for(ended, timeout_s=timeout_s, interval_s=0.2,
                        what=f"move {move_id} to end")
