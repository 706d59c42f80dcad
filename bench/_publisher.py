"""A publisher process for bench/ingest.py: many simulated nodes, one mTLS paho client each.

Runs single-threaded: every client's socket is driven from one select() loop (paho's
loop_read / loop_write / loop_misc), which is much faster than one network thread per client.
Protocol with the parent: put ("ready", idx) once connected and payloads are prepared, wait for
the ``go`` event, publish everything with QoS 1 as fast as possible, put ("done", idx, t_first,
t_last_ack, acked, failed).
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from _common import PayloadFactory
from paho.mqtt.enums import CallbackAPIVersion

from contract.wire import topic
from plumbing.tls import client_context

API_V2 = CallbackAPIVersion.VERSION2


@dataclass(frozen=True)
class PublisherJob:
    idx: int
    nodes: list[tuple[int, str]]  # (global index, node id)
    certs_dir: str                # holds <node>.crt / <node>.key
    ca_file: str
    host: str
    port: int
    seq_start: int                # this run publishes seq_start+1 .. seq_start+per_node
    per_node: int
    guests: bool = True
    max_inflight: int = 1000
    connect_timeout_s: float = 60.0


def run(job: PublisherJob, out: Any, go: Any) -> None:
    try:
        _run(job, out, go)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report, so the parent does not wait forever
        out.put(("error", job.idx, f"{type(exc).__name__}: {exc}"))


def _run(job: PublisherJob, out: Any, go: Any) -> None:
    certs = Path(job.certs_dir)
    clients: list[mqtt.Client] = []
    topics: list[str] = []
    state = {"connected": 0, "acked": 0, "refused": 0}

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc == 0:
            state["connected"] += 1
        else:
            state["refused"] += 1

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        state["acked"] += 1

    # Payloads are made before the clock starts (the generator is not what we measure).
    payloads: list[list[bytes]] = []
    now = time.time()
    for gi, node in job.nodes:
        make = PayloadFactory(node, gi, guests=job.guests)
        payloads.append([make(job.seq_start + k + 1, now + k * 10.0) for k in range(job.per_node)])
        topics.append(topic(node, "telemetry"))

    for _gi, node in job.nodes:
        c = mqtt.Client(API_V2, client_id=node,
                        protocol=mqtt.MQTTv311, clean_session=True)
        c.tls_set_context(client_context(Path(job.ca_file), certs / f"{node}.crt",
                                         certs / f"{node}.key"))
        c.max_inflight_messages_set(job.max_inflight)
        c.max_queued_messages_set(0)
        c.on_connect = on_connect
        c.on_publish = on_publish
        c.connect(job.host, job.port, keepalive=120)
        clients.append(c)
    by_sock = {c.socket(): c for c in clients}
    deadline = time.monotonic() + job.connect_timeout_s
    while state["connected"] + state["refused"] < len(clients):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {state['connected']} of {len(clients)} clients connected")
        _pump(by_sock, 0.2)
    if state["refused"]:
        raise RuntimeError(f"{state['refused']} connections refused by the broker")

    out.put(("ready", job.idx))
    go.wait()
    total = len(clients) * job.per_node
    t_first = time.time()
    last_misc = time.monotonic()
    for k in range(job.per_node):
        for c, t, p in zip(clients, topics, payloads, strict=True):
            c.publish(t, p[k], qos=1)
        _pump(by_sock, 0.0)
        if time.monotonic() - last_misc > 1.0:
            for c in clients:
                c.loop_misc()
            last_misc = time.monotonic()
    stall_deadline = time.monotonic() + 120
    last_acked = -1
    while state["acked"] < total:
        if state["acked"] != last_acked:
            last_acked = state["acked"]
            stall_deadline = time.monotonic() + 120
        elif time.monotonic() > stall_deadline:
            break
        _pump(by_sock, 0.2)
        if time.monotonic() - last_misc > 1.0:
            for c in clients:
                c.loop_misc()
            last_misc = time.monotonic()
    t_last = time.time()
    out.put(("done", job.idx, t_first, t_last, state["acked"], total - state["acked"]))
    for c in clients:
        c.disconnect()  # written at once (no network thread); closes the socket


def _pump(by_sock: dict[Any, mqtt.Client], timeout: float) -> None:
    """One pass of reading what arrived and writing what is queued, on every client."""
    readers = list(by_sock)
    writers = [s for s, c in by_sock.items() if c.want_write()]
    ready = [s for s in readers if s.pending()]  # TLS records already decrypted
    if ready:
        timeout = 0.0
    r, w, _ = select.select(readers, writers, [], timeout)
    for s in set(r) | set(ready):
        by_sock[s].loop_read(max_packets=1000)
    for s in w:
        by_sock[s].loop_write()
