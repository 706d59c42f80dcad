"""Shared helpers for the hand-run benchmarks in bench/ (not imported by the product).

Child processes are tracked in a :class:`Children` registry and stopped by pid (SIGTERM, then
SIGKILL) when the benchmark ends, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import psutil

from contract.wire import (
    DiskSample,
    FilesystemSample,
    GuestSample,
    HostSample,
    NicSample,
    Telemetry,
    encode,
)

PORT_RANGE = range(21000, 22000)


# --- processes and cleanup ------------------------------------------------------------------


class Children:
    """Every process this benchmark started; :meth:`stop_all` ends them by pid."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, Any]] = []  # (label, Popen | multiprocessing.Process)

    def add(self, label: str, proc: Any) -> Any:
        self._procs.append((label, proc))
        return proc

    def stop(self, proc: Any, timeout: float = 10.0) -> None:
        """SIGTERM ``proc`` (and SIGCONT it, in case it was paused), wait, then SIGKILL.
        Descendants it leaves behind (e.g. a managed broker) are stopped by pid as well."""
        pid = proc.pid
        if pid is None:
            return
        try:
            descendants = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        for sig in (signal.SIGTERM, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if not _wait(proc, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait(proc, 5)
        for d in descendants:
            try:
                if d.is_running() and d.status() != psutil.STATUS_ZOMBIE:
                    d.terminate()
                    d.wait(5)
            except psutil.TimeoutExpired:
                d.kill()
            except psutil.Error:
                pass
        self._procs = [(label, p) for label, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for _label, proc in reversed(list(self._procs)):
            self.stop(proc, timeout=5)


def _wait(proc: Any, timeout: float) -> bool:
    if hasattr(proc, "join"):  # multiprocessing.Process
        proc.join(timeout)
        return proc.exitcode is not None
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def install_sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C so that ``finally`` blocks clean up; honour Ctrl-C / SIGINT
    even when started in the background (where it is inherited as ignored)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --- data dirs and ports --------------------------------------------------------------------


def make_data_dir(kind: str) -> Path:
    """A fresh ``/tmp/bench-<kind>-XXXX`` directory, mode 0755 (the broker user must reach it)."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-", dir="/tmp"))
    os.chmod(path, 0o755)  # noqa: S103 - the broker user must reach its files
    return path


def remove_data_dir(path: Path) -> None:
    if path.name.startswith("bench-") and path.parent == Path("/tmp"):  # noqa: S108
        shutil.rmtree(path, ignore_errors=True)


def check_port(port: int) -> None:
    if port not in PORT_RANGE:
        sys.exit(f"error: port {port} is outside {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            sys.exit(f"error: 127.0.0.1:{port} is in use; pick another port with the options")


def wait_for_port(port: int, timeout: float, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before "
                               f"listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# --- realistic telemetry --------------------------------------------------------------------


def host_sample(i: int, seq: int) -> HostSample:
    """A plausible host sample: one filesystem, one disk, two NICs (counters grow with seq)."""
    return HostSample(
        cpu_percent=12.5 + (seq % 50) * 0.7,
        cpu_count=16,
        load1=1.25 + (seq % 7) * 0.1,
        load5=1.1,
        load15=0.95,
        mem_total_bytes=68_719_476_736,
        mem_available_bytes=41_231_686_041 - seq * 4096,
        mem_used_bytes=27_487_790_695 + seq * 4096,
        swap_total_bytes=8_589_934_592,
        swap_used_bytes=0,
        uptime_s=86_400.0 * 12 + seq * 10.0,
        filesystems=(FilesystemSample("/", "ext4", 959_987_367_936, 312_456_789_012 + seq,
                                      647_530_578_924 - seq),),
        disks=(DiskSample("nvme0n1", 9_876_543_210 + seq * 65536, 12_345_678_901 + seq * 131072,
                          1_234_567 + seq * 16, 2_345_678 + seq * 32),),
        nics=(
            NicSample("eno1", 98_765_432_100 + seq * 1_000_000, 87_654_321_000 + seq * 900_000,
                      123_456_789 + seq * 800, 98_765_432 + seq * 700, 0, 0, 12, 0),
            NicSample("eno2", 1_234_567_890 + seq * 10_000, 2_345_678_901 + seq * 20_000,
                      3_456_789 + seq * 10, 4_567_890 + seq * 20, 0, 0, 0, 0),
        ),
    )


def guest_samples(i: int, seq: int) -> tuple[GuestSample, ...]:
    """One or two guests (alternating by node) with the figures a KVM host reports for a guest
    without per-disk / per-NIC detail."""
    return tuple(
        GuestSample(
            uuid=f"6f1c2e3a-{i:04x}-4b5c-8d9e-{g:012x}",
            name=f"vm-{i}-{g}",
            state="running",
            vcpus=2,
            cpu_time_ns=123_456_789_000 + seq * 2_000_000_000,
            memory_max_bytes=4_294_967_296,
            balloon_current_bytes=4_294_967_296,
            balloon_rss_bytes=2_147_483_648 + seq * 4096,
        )
        for g in range(1 + i % 2)
    )


def telemetry_payload(node: str, i: int, seq: int, ts: float, interval_s: float = 10.0) -> bytes:
    """One realistic telemetry message through the real encoder (slow: ~0.2 ms)."""
    return encode(Telemetry(node=node, seq=seq, ts=ts, interval_s=interval_s,
                            host=host_sample(i, seq), guests=guest_samples(i, seq)))


class PayloadFactory:
    """Fast payloads for one node: the envelope that ``contract.wire.encode`` makes for a template
    message, with seq, ts and a few counters changed per message (~10 us instead of ~200 us;
    the bytes are what ``encode`` would produce for the changed message)."""

    def __init__(self, node: str, i: int, interval_s: float = 10.0, guests: bool = True) -> None:
        tmpl = Telemetry(node=node, seq=1, ts=0.0, interval_s=interval_s,
                         host=host_sample(i, 1), guests=guest_samples(i, 1) if guests else ())
        self._body = msgpack.unpackb(encode(tmpl), raw=False)
        h = self._body["host"]
        self._nic = h["nics"][0]
        self._disk = h["disks"][0]
        self._base = (h["cpu_percent"], self._nic["rx_bytes"], self._nic["tx_bytes"],
                      self._disk["read_bytes"], self._disk["write_bytes"])

    def __call__(self, seq: int, ts: float) -> bytes:
        b, h = self._body, self._body["host"]
        cpu, rx, tx, rd, wr = self._base
        b["seq"] = seq
        b["ts"] = ts
        h["cpu_percent"] = cpu + (seq % 50) * 0.7
        h["uptime_s"] = 1_036_800.0 + seq * 10.0
        self._nic["rx_bytes"] = rx + seq * 1_000_000
        self._nic["tx_bytes"] = tx + seq * 900_000
        self._disk["read_bytes"] = rd + seq * 65536
        self._disk["write_bytes"] = wr + seq * 131072
        for g in b["guests"]:
            g["cpu_time_ns"] = 123_456_789_000 + seq * 2_000_000_000
        return msgpack.packb(b, use_bin_type=True)  # type: ignore[no-any-return]


def node_name(i: int) -> str:
    return f"bench-n{i:04d}"


# --- results --------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into bench/README.md)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_quiet(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


Cleanup = Callable[[], None]
