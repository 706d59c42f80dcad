"""Host figures from psutil, copied field by field into wire samples with units in the names.

The only module of the agent that imports psutil.
"""

from __future__ import annotations

import time

import psutil

from contract.wire import DiskSample, FilesystemSample, HostSample, NicSample, TemperatureSample

# Pseudo and container filesystems say nothing about the host's storage.
_SKIP_FSTYPES = frozenset({"squashfs", "overlay", "tmpfs", "devtmpfs", "nsfs", "autofs"})


class HostSampler:
    """Samples the host; the first ``cpu_percent`` is measured since construction."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # start the CPU measurement window

    def sample(self) -> HostSample:
        load1, load5, load15 = psutil.getloadavg()
        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        return HostSample(
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            cpu_count=psutil.cpu_count() or 1,
            load1=float(load1),
            load5=float(load5),
            load15=float(load15),
            mem_total_bytes=int(mem.total),
            mem_available_bytes=int(mem.available),
            mem_used_bytes=int(mem.used),
            swap_total_bytes=int(swap.total),
            swap_used_bytes=int(swap.used),
            uptime_s=max(0.0, time.time() - psutil.boot_time()),
            filesystems=_filesystems(),
            disks=_disks(),
            nics=_nics(),
            temperatures=_temperatures(),
        )


def _filesystems() -> tuple[FilesystemSample, ...]:
    out = []
    seen = set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _SKIP_FSTYPES or part.device in seen:
            continue
        seen.add(part.device)
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:  # vanished or unreadable mount
            continue
        out.append(
            FilesystemSample(
                mountpoint=part.mountpoint,
                fstype=part.fstype,
                total_bytes=int(usage.total),
                used_bytes=int(usage.used),
                free_bytes=int(usage.free),
            )
        )
    return tuple(out)


def _disks() -> tuple[DiskSample, ...]:
    counters = psutil.disk_io_counters(perdisk=True, nowrap=True) or {}
    return tuple(
        DiskSample(
            name=name,
            read_bytes=int(c.read_bytes),
            write_bytes=int(c.write_bytes),
            read_ops=int(c.read_count),
            write_ops=int(c.write_count),
        )
        for name, c in sorted(counters.items())
        if not name.startswith(("loop", "ram"))
    )


def _nics() -> tuple[NicSample, ...]:
    counters = psutil.net_io_counters(pernic=True, nowrap=True) or {}
    return tuple(
        NicSample(
            name=name,
            rx_bytes=int(c.bytes_recv),
            tx_bytes=int(c.bytes_sent),
            rx_packets=int(c.packets_recv),
            tx_packets=int(c.packets_sent),
            rx_errors=int(c.errin),
            tx_errors=int(c.errout),
            rx_drops=int(c.dropin),
            tx_drops=int(c.dropout),
        )
        for name, c in sorted(counters.items())
    )


def _temperatures() -> tuple[TemperatureSample, ...]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return ()
    try:
        sensors = reader()
    except OSError:
        return ()
    return tuple(
        TemperatureSample(sensor=sensor, label=t.label or sensor, celsius=float(t.current))
        for sensor, readings in sorted(sensors.items())
        for t in readings
    )
