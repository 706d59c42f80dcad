#!/usr/bin/env python3
"""Ingest throughput benchmark: how many telemetry messages per second get through the
aggregator's mutual-TLS Mosquitto to three consumers, on one freshly initialised data dir.

Consumers (same broker config: the aggregator's own DIR/broker/mosquitto.conf):
  c          mosquitto_sub (C) with the aggregator's identity, QoS 1: the broker path's ceiling
  aiomqtt    decode-only subscriber on aiomqtt 2.5, MQTT 3.1.1 (`async for message in
             client.messages: contract.wire.decode(message.payload)`)
  aggregator the real `virt8ra-aggregator serve` (managed broker + ingest + store):
             samples stored per second, from /metrics and the database

Load: --procs publisher processes simulate --nodes nodes, each node its own mTLS connection
(paho-mqtt, MQTT 3.1.1, QoS 1, max_inflight raised) publishing realistic telemetry with
contiguous sequence numbers, --messages in total, as fast as they can.

Modes:
  live   the consumer is subscribed while the publishers publish: the rate it sustains while
         sharing the machine with the publishers (bounded by what they can publish)
  drain  the consumer is paused (SIGSTOP) while the publishers publish, so the broker queues the
         load for it; then it is resumed (SIGCONT) and the rate at which it drains the backlog is
         measured, with the publishers gone: the consumer's own ceiling (what PLATFORM.md
         reports as "msgs/s drained")

The a/b consumers run against a mosquitto started here with DIR/broker/mosquitto.conf; it is
then stopped and `serve` starts its own with the same file. Medians of --repeat runs.
Everything started here is stopped by pid at the end, also on Ctrl-C; the data dir
(/tmp/bench-ingest-*) is removed unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import (
    Children,
    PayloadFactory,
    check_port,
    fmt,
    install_sigterm_as_interrupt,
    log,
    make_data_dir,
    median,
    node_name,
    remove_data_dir,
    run_quiet,
    table,
    wait_for_port,
)
from _publisher import PublisherJob
from _publisher import run as publisher_main

HERE = Path(__file__).resolve().parent
CONSUMERS = ("c", "aiomqtt", "aggregator")
MODES = ("live", "drain")
LABELS = {
    "c": "mosquitto_sub (C), QoS 1",
    "aiomqtt": "aiomqtt 2.5 MQTT 3.1.1, decode only",
    "aggregator": "virt8ra-aggregator serve (stored)",
}


@dataclass
class RunResult:
    consumer: str
    mode: str
    repeat: int
    expected: int
    published: int = 0
    publish_rate: float | None = None
    received: int = 0
    rate: float | None = None            # consumer msgs/s (stored samples/s for aggregator)
    received_rate: float | None = None   # aggregator only: msgs/s received by ingest
    consumer_cpu: float | None = None    # % of one core over the consumer's measured window
    broker_cpu: float | None = None
    shed: int = 0
    gaps: int = 0
    duplicates: int = 0
    max_backlog: int = 0
    notes: list[str] = field(default_factory=list)


# --- consumers ------------------------------------------------------------------------------


class LineCounter:
    """Counts newline-terminated records on a pipe (mosquitto_sub -F %t) in a thread."""

    def __init__(self, pipe: Any, expected: int) -> None:
        self.count = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.t_change = time.time()
        self._expected = expected
        self._pipe = pipe
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fd = self._pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            now = time.time()
            if self.t_first is None:
                self.t_first = now
            self.count += chunk.count(b"\n")
            self.t_change = now
            if self.t_last is None and self.count >= self._expected:
                self.t_last = now


class AiomqttReader:
    """Reads the lines of bench/_aiomqtt_sub.py."""

    def __init__(self, pipe: Any) -> None:
        self.ready = threading.Event()
        self.done = threading.Event()
        self.count = 0
        self.t_change = time.time()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.errors = 0
        self._pipe = pipe
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for raw in self._pipe:
            parts = raw.decode().split()
            if not parts:
                continue
            if parts[0] == "ready":
                self.ready.set()
            elif parts[0] == "progress":
                n = int(parts[1])
                if n != self.count:
                    self.count, self.t_change = n, time.time()
            elif parts[0] == "done":
                t_first, t_last = float(parts[1]), float(parts[2])
                self.count, self.errors = int(parts[3]), int(parts[4])
                self.t_first = t_first or None
                self.t_last = t_last
                self.done.set()


def wait_log_line(path: Path, offset: int, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        with open(path, errors="replace") as fh:
            fh.seek(offset)
            if rx.search(fh.read()):
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for /{pattern}/ in {path}")


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(path: Path, offset: int) -> str:
    try:
        with open(path, errors="replace") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return ""


def scrape(api_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def cpu_seconds(proc: psutil.Process | None) -> float | None:
    if proc is None:
        return None
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return None


# --- the benchmark --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, children: Children) -> None:
        self.args = args
        self.children = children
        self.dir = make_data_dir("ingest")
        self.pki = self.dir / "pki"
        self.certs = self.dir / "nodes"
        self.broker_log = self.dir / "mosquitto.log"
        self.serve_log = self.dir / "serve.log"
        self.nodes = [(i, node_name(i)) for i in range(args.nodes)]
        self.per_node = args.messages // args.nodes
        self.total = self.per_node * args.nodes
        self.broker: subprocess.Popen[bytes] | None = None
        self.broker_ps: psutil.Process | None = None
        self.serve: subprocess.Popen[bytes] | None = None
        self.serve_ps: psutil.Process | None = None
        self.stored_seq = 0  # per node: the aggregator has seen 1..stored_seq (contiguous)
        self.mp = mp.get_context("spawn")
        self.results: list[RunResult] = []
        self.observations: list[str] = []

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        log(f"data dir {self.dir}")
        run_quiet(["virt8ra-aggregator", "init", "--data-dir", str(self.dir),
                   "--api-port", str(a.api_port), "--broker-port", str(a.broker_port)])
        from aggregator.trust.pki import CertificateAuthority  # cryptography: parent process only

        ca = CertificateAuthority(self.pki)
        self.certs.mkdir()
        t = time.monotonic()
        for _i, node in self.nodes:
            ca.issue_to_files(node, self.certs / f"{node}.crt", self.certs / f"{node}.key",
                              server=False)
        log(f"issued {len(self.nodes)} node certificates in {time.monotonic() - t:.1f} s")
        sizes = [len(PayloadFactory(n, i, guests=not a.small)(1000, time.time()))
                 for i, n in self.nodes[:2]]
        self.payload_bytes = sum(sizes) / len(sizes)

    # --- broker / serve ---------------------------------------------------------------------

    def start_broker(self) -> None:
        conf = self.dir / "broker" / "mosquitto.conf"
        with open(self.broker_log, "ab") as fh:
            self.broker = self.children.add("mosquitto", subprocess.Popen(
                ["mosquitto", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                start_new_session=True))
        wait_for_port(self.args.broker_port, 10, self.broker)
        self.broker_ps = psutil.Process(self.broker.pid)
        log(f"mosquitto started (pid {self.broker.pid}) with {conf}")

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.children.stop(self.broker)
            log(f"mosquitto stopped (exit {self.broker.returncode})")
            self.broker = self.broker_ps = None

    def start_serve(self) -> None:
        with open(self.serve_log, "ab") as fh:
            self.serve = self.children.add("serve", subprocess.Popen(
                ["virt8ra-aggregator", "serve", "--data-dir", str(self.dir)],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True))
        wait_for_port(self.args.api_port, 30, self.serve)
        deadline = time.monotonic() + 30
        while scrape(self.args.api_port).get("virt8ra_ingest_connects_total", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest did not connect; see {self.serve_log}")
            time.sleep(0.1)
        time.sleep(1.0)  # subscriptions follow the connect
        self.serve_ps = psutil.Process(self.serve.pid)
        kids = [p for p in self.serve_ps.children() if p.name() == "mosquitto"]
        self.broker_ps = kids[0] if kids else None
        log(f"serve started (pid {self.serve.pid}, broker pid "
            f"{self.broker_ps.pid if self.broker_ps else '?'})")

    def stop_serve(self) -> None:
        if self.serve is not None:
            self.children.stop(self.serve, timeout=30)
            log(f"serve stopped (exit {self.serve.returncode})")
            self.serve = self.serve_ps = self.broker_ps = None

    # --- publishers -------------------------------------------------------------------------

    def start_publishers(self, seq_start: int) -> tuple[list[Any], Any, Any]:
        a = self.args
        out, go = self.mp.Queue(), self.mp.Event()
        procs = []
        for p in range(a.procs):
            job = PublisherJob(
                idx=p, nodes=self.nodes[p :: a.procs], certs_dir=str(self.certs),
                ca_file=str(self.pki / "ca.crt"), host="127.0.0.1", port=a.broker_port,
                seq_start=seq_start, per_node=self.per_node, guests=not a.small,
                max_inflight=a.max_inflight,
            )
            proc = self.mp.Process(target=publisher_main, args=(job, out, go), daemon=True)
            proc.start()
            procs.append(self.children.add(f"publisher-{p}", proc))
        ready = 0
        while ready < a.procs:
            msg = out.get(timeout=180)
            if msg[0] == "error":
                raise RuntimeError(f"publisher {msg[1]}: {msg[2]}")
            ready += 1
        return procs, out, go

    def collect_publishers(self, procs: list[Any], out: Any, r: RunResult) -> None:
        done: list[tuple[Any, ...]] = []
        while len(done) < len(procs):
            msg = out.get(timeout=600)
            if msg[0] == "error":
                raise RuntimeError(f"publisher {msg[1]}: {msg[2]}")
            done.append(msg)
        for p in procs:
            p.join(10)
            self.children.stop(p)
        r.published = sum(m[4] for m in done)
        failed = sum(m[5] for m in done)
        if failed:
            r.notes.append(f"{failed} publishes not acknowledged by the broker")
        t0, t1 = min(m[2] for m in done), max(m[3] for m in done)
        r.publish_rate = r.published / (t1 - t0) if t1 > t0 else None

    # --- one run ----------------------------------------------------------------------------

    def run_client(self, consumer: str, mode: str, repeat: int) -> RunResult:
        """mosquitto_sub or the aiomqtt subscriber against our own mosquitto."""
        a = self.args
        r = RunResult(consumer, mode, repeat, self.total)
        client_id = f"bench-{consumer}-{mode}-{repeat}"
        identity = ["--cafile", str(self.pki / "ca.crt"), "--cert",
                    str(self.pki / "aggregator.crt"), "--key", str(self.pki / "aggregator.key")]
        offset = log_size(self.broker_log)
        if consumer == "c":
            proc = subprocess.Popen(
                ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(a.broker_port), *identity,
                 "-q", "1", "-t", "v8/nodes/+/telemetry", "-i", client_id, "-k", "600",
                 "-F", "%t"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
            self.children.add("mosquitto_sub", proc)
            reader: Any = LineCounter(proc.stdout, self.total)
            # The broker names clients by their certificate (use_username_as_clientid).
            wait_log_line(self.broker_log, offset, re.escape("as aggregator "), 10)
            time.sleep(0.5)  # SUBSCRIBE follows CONNECT
        else:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "_aiomqtt_sub.py"), "--port", str(a.broker_port),
                 "--ca", identity[1], "--cert", identity[3], "--key", identity[5],
                 "--client-id", client_id, "--expect", str(self.total)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
            self.children.add("aiomqtt-sub", proc)
            reader = AiomqttReader(proc.stdout)
            if not reader.ready.wait(20):
                raise RuntimeError("the aiomqtt subscriber did not subscribe")
        ps = psutil.Process(proc.pid)
        try:
            self._drive(r, proc.pid, ps, reader, seq_start=0)
        finally:
            if consumer == "aiomqtt" and not reader.done.is_set():
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM)
                reader.done.wait(10)
            self.children.stop(proc)
            reader.thread.join(5)
        r.received = reader.count
        if reader.t_first and reader.t_last and reader.t_last > reader.t_first:
            r.rate = reader.count / (reader.t_last - reader.t_first)
        if consumer == "aiomqtt" and reader.errors:
            r.notes.append(f"{reader.errors} payloads failed to decode")
        self._broker_log_notes(r, log_since(self.broker_log, offset))
        return r

    def _drive(self, r: RunResult, pid: int, ps: psutil.Process, reader: Any,
               seq_start: int) -> None:
        """Publish the load and wait for the consumer (a/b), filling in CPU figures."""
        procs, out, go = self.start_publishers(seq_start)
        if r.mode == "drain":
            os.kill(pid, signal.SIGSTOP)
        cpu0, bcpu0 = cpu_seconds(ps), cpu_seconds(self.broker_ps)
        t0 = time.time()
        go.set()
        if r.mode == "drain":
            self.collect_publishers(procs, out, r)
            cpu0, bcpu0 = cpu_seconds(ps), cpu_seconds(self.broker_ps)
            t0 = time.time()
            os.kill(pid, signal.SIGCONT)
        while reader.t_last is None:
            if time.time() - max(reader.t_change, t0) > self.args.idle_timeout and (
                    r.mode == "drain" or all(not p.is_alive() for p in procs)):
                r.notes.append(f"stalled: no message for {self.args.idle_timeout:.0f} s")
                break
            time.sleep(0.05)
            if getattr(reader, "done", None) is not None and reader.done.is_set():
                break
        t1 = reader.t_last or time.time()
        cpu1, bcpu1 = cpu_seconds(ps), cpu_seconds(self.broker_ps)
        if r.mode == "live":
            self.collect_publishers(procs, out, r)
        if cpu0 is not None and cpu1 is not None:
            r.consumer_cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
        if bcpu0 is not None and bcpu1 is not None:
            r.broker_cpu = 100 * (bcpu1 - bcpu0) / (t1 - t0)

    def consumer_processes(self) -> list[psutil.Process]:
        """The aggregator and its ingest process (it receives in a child of its own); not the
        broker, which must keep queueing while the consumer is paused."""
        assert self.serve_ps is not None
        return [self.serve_ps,
                *(p for p in self.serve_ps.children() if p.name() != "mosquitto")]

    @staticmethod
    def consumer_cpu(consumers: list[psutil.Process]) -> float | None:
        seconds = [cpu_seconds(p) for p in consumers]
        return None if None in seconds else sum(s for s in seconds if s is not None)

    def run_aggregator(self, mode: str, repeat: int) -> RunResult:
        a = self.args
        r = RunResult("aggregator", mode, repeat, self.total)
        assert self.serve is not None
        assert self.serve_ps is not None
        offset = log_size(self.serve_log)
        base = scrape(a.api_port)
        seq_start = self.stored_seq
        procs, out, go = self.start_publishers(seq_start)
        consumers = self.consumer_processes()
        if mode == "drain":
            for proc in consumers:
                proc.send_signal(signal.SIGSTOP)
        t_go = time.time()
        cpu0, bcpu0 = self.consumer_cpu(consumers), cpu_seconds(self.broker_ps)
        go.set()
        if mode == "drain":
            self.collect_publishers(procs, out, r)
            cpu0, bcpu0 = self.consumer_cpu(consumers), cpu_seconds(self.broker_ps)
            t_go = time.time()
            for proc in consumers:
                proc.send_signal(signal.SIGCONT)

        def delta(m: dict[str, float], name: str) -> int:
            return int(m.get(name, 0) - base.get(name, 0))

        stored_at: float | None = None
        last_change, last_stored, last_received = time.time(), -1, -1
        m = base
        while True:
            time.sleep(a.poll)
            m = scrape(a.api_port)
            now = time.time()
            stored = delta(m, "virt8ra_store_samples_total")
            received = delta(m, "virt8ra_ingest_received_total")
            r.max_backlog = max(r.max_backlog, int(m.get("virt8ra_store_backlog", 0)))
            if (stored, received) != (last_stored, last_received):
                last_change, last_stored, last_received = now, stored, received
            if stored >= self.total:
                stored_at = now
                break
            publishers_gone = mode == "drain" or all(not p.is_alive() for p in procs)
            if publishers_gone and now - last_change > a.idle_timeout:
                r.notes.append(f"stalled at {stored} stored: no progress for "
                               f"{a.idle_timeout:.0f} s")
                stored_at = last_change
                break
        cpu1, bcpu1 = self.consumer_cpu(consumers), cpu_seconds(self.broker_ps)
        if mode == "live":
            self.collect_publishers(procs, out, r)
        # Exact first and last receive times of this run's samples, from the database.
        with sqlite3.connect(f"file:{self.dir / 'fleet.sqlite'}?mode=ro", uri=True) as db:
            first_rx, last_rx, rows = db.execute(
                "SELECT min(received_at), max(received_at), count(*) FROM telemetry "
                "WHERE received_at >= ?", (t_go - 1,)).fetchone()
        db.close()
        m = scrape(a.api_port)
        r.received = delta(m, "virt8ra_ingest_received_total")
        stored = delta(m, "virt8ra_store_samples_total")
        r.shed = delta(m, "virt8ra_ingest_shed_total")
        r.gaps = delta(m, "virt8ra_store_gaps_total")
        r.duplicates = delta(m, "virt8ra_store_duplicates_total")
        if first_rx is not None and stored_at is not None and stored_at > first_rx:
            r.rate = last_stored / (stored_at - first_rx)
        if first_rx is not None and last_rx is not None and last_rx > first_rx:
            r.received_rate = rows / (last_rx - first_rx)
        if cpu0 is not None and cpu1 is not None and stored_at:
            r.consumer_cpu = 100 * (cpu1 - cpu0) / (stored_at - t_go)
        if bcpu0 is not None and bcpu1 is not None and stored_at:
            r.broker_cpu = 100 * (bcpu1 - bcpu0) / (stored_at - t_go)
        if stored != rows:
            r.notes.append(f"/metrics says {stored} stored, the database has {rows} new rows")
        lost = self.total - r.received
        if lost > 0:
            r.notes.append(f"{lost} messages never reached ingest")
        self.stored_seq += self.per_node
        text = log_since(self.serve_log, offset)
        for pat in ("Message queue is full", "WARNING", "ERROR", "shed"):
            n = text.count(pat)
            if n:
                r.notes.append(f"serve log: {n} lines with {pat!r}")
        self._broker_log_notes(r, text)
        return r

    def _broker_log_notes(self, r: RunResult, text: str) -> None:
        n = len(re.findall(r"Outgoing messages are being dropped", text))
        if n:
            r.notes.append(f"broker log: {n} 'Outgoing messages are being dropped' lines")

    # --- the whole benchmark ----------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        self.setup()
        client_consumers = [c for c in a.consumers if c != "aggregator"]
        if client_consumers:
            self.start_broker()
            try:
                for mode in a.modes:
                    for consumer in client_consumers:
                        for rep in range(1, a.repeat + 1):
                            self._one(self.run_client(consumer, mode, rep))
            finally:
                self.stop_broker()
        if "aggregator" in a.consumers:
            self.start_serve()
            try:
                for mode in a.modes:
                    for rep in range(1, a.repeat + 1):
                        self._one(self.run_aggregator(mode, rep))
            finally:
                self.stop_serve()

    def _one(self, r: RunResult) -> None:
        self.results.append(r)
        log(f"{r.consumer:10} {r.mode:5} #{r.repeat}: {fmt(r.rate)} msgs/s "
            f"(received {r.received}/{r.expected}, publishers {fmt(r.publish_rate)} msgs/s, "
            f"consumer CPU {fmt(r.consumer_cpu)}%, broker CPU {fmt(r.broker_cpu)}%)"
            + (f" shed={r.shed} gaps={r.gaps} dup={r.duplicates} backlog<={r.max_backlog}"
               if r.consumer == "aggregator" else "")
            + ("; " + "; ".join(r.notes) if r.notes else ""))

    def report(self) -> str:
        a = self.args
        lines = [
            f"virt8ra ingest benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"{os.cpu_count()} CPUs",
            f"load: {self.total:,} messages = {len(self.nodes)} nodes x {self.per_node} "
            f"(one mTLS connection each) from {a.procs} publisher processes, QoS 1, "
            f"~{self.payload_bytes:.0f}-byte telemetry; medians of {a.repeat} runs",
            "",
        ]
        headers = ["consumer", "mode", "msgs/s", "runs", "received", "publish msgs/s",
                   "consumer CPU %", "broker CPU %", "shed", "gaps", "notes"]
        rows = []
        for mode in a.modes:
            for consumer in a.consumers:
                rs = [r for r in self.results if r.consumer == consumer and r.mode == mode]
                if not rs:
                    continue
                agg = consumer == "aggregator"
                notes = sorted({n for r in rs for n in r.notes})
                rows.append([
                    LABELS[consumer], mode,
                    fmt(median(r.rate for r in rs)),
                    " / ".join(fmt(r.rate) for r in rs),
                    f"{min(r.received for r in rs):,}/{self.total:,}",
                    fmt(median(r.publish_rate for r in rs)),
                    fmt(median(r.consumer_cpu for r in rs)),
                    fmt(median(r.broker_cpu for r in rs)),
                    fmt(median(r.shed for r in rs)) if agg else "-",
                    fmt(median(r.gaps for r in rs)) if agg else "-",
                    "; ".join(notes)[:200],
                ])
        lines.append(table(headers, rows))
        agg_rows = [r for r in self.results if r.consumer == "aggregator"]
        if agg_rows:
            lines += ["", "aggregator detail per run (stored/s measured from the first sample "
                      "received to /metrics reaching the total):"]
            lines.append(table(
                ["mode", "run", "stored/s", "received/s", "received", "shed", "gaps",
                 "duplicates", "max backlog"],
                [[r.mode, str(r.repeat), fmt(r.rate), fmt(r.received_rate), f"{r.received:,}",
                  f"{r.shed:,}", f"{r.gaps:,}", f"{r.duplicates:,}", f"{r.max_backlog:,}"]
                 for r in agg_rows]))
            best = median(r.rate for r in agg_rows if r.mode == "live")
            if best is not None:
                verdict = "meets" if best >= a.target else "MISSES"
                lines.append(f"\ntarget >= {a.target:,} samples/s stored (live): "
                             f"{fmt(best)} -> {verdict}")
            drain = median(r.rate for r in agg_rows if r.mode == "drain")
            if drain is not None:
                verdict = "meets" if drain >= a.target else "MISSES"
                lines.append(f"target >= {a.target:,} samples/s stored (drain): "
                             f"{fmt(drain)} -> {verdict}")
        return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/ingest.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=200_000,
                   help="messages per run, in total (default 200000)")
    p.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    p.add_argument("--procs", type=int, default=4, help="publisher processes (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="runs per consumer and mode (default 3)")
    p.add_argument("--consumers", default=",".join(CONSUMERS),
                   help=f"comma-separated subset of {','.join(CONSUMERS)} (default: all)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of live,drain (default: both)")
    p.add_argument("--broker-port", type=int, default=21883, help="default 21883")
    p.add_argument("--api-port", type=int, default=21480, help="default 21480")
    p.add_argument("--max-inflight", type=int, default=1000,
                   help="publisher-side paho max_inflight_messages per node (default 1000)")
    p.add_argument("--small", action="store_true",
                   help="host sample only, no guests: ~750-byte payloads instead of ~940-1130")
    p.add_argument("--idle-timeout", type=float, default=20.0,
                   help="end a run after this many seconds without progress (default 20)")
    p.add_argument("--poll", type=float, default=0.2,
                   help="/metrics polling interval for the aggregator, seconds (default 0.2)")
    p.add_argument("--target", type=float, default=10_000, help="stored samples/s target")
    p.add_argument("--keep", action="store_true", help="keep the data dir (logs, database)")
    args = p.parse_args(argv)
    args.consumers = [c for c in CONSUMERS if c in args.consumers.split(",")]
    args.modes = [m for m in MODES if m in args.modes.split(",")]
    if not args.consumers or not args.modes:
        p.error("no known consumer or mode selected")
    if args.messages < args.nodes or args.nodes < args.procs or args.procs < 1:
        p.error("need messages >= nodes >= procs >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for port in (args.broker_port, args.api_port):
        check_port(port)
    install_sigterm_as_interrupt()
    children = Children()
    bench: Bench | None = None
    try:
        bench = Bench(args, children)
        bench.run()
        print(bench.report())
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        if bench is not None and bench.results:
            print(bench.report())
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop_all()
        if bench is not None:
            if args.keep:
                log(f"kept {bench.dir}")
            else:
                remove_data_dir(bench.dir)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
