"""Two real libvirt hosts in network namespaces (``demo.tworig``) and a raw live
migration of the tiny guest between them through ``Hypervisor.migrate``: there and back with
the serial counter continuing, a disk copied with the guest, and a timeout that aborts and
leaves the guest running at the source."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent.host.domainxml import domain_xml
from agent.host.hypervisor import Hypervisor, MigrationProgress, MigrationTimeoutError
from contract.wire import VmSpec
from demo.guestimage import TICK_PREFIX, TinyGuest
from demo.tworig import SUBNET, Host, TwoHosts
from tests.guests import running

TICK = re.compile(rf"{TICK_PREFIX} (\d+)\n")


@pytest.fixture(scope="module")
def rig(root_dir: Path, tiny_guest: TinyGuest) -> Iterator[TwoHosts]:
    workdir = Path(tempfile.mkdtemp(prefix="tworig-", dir=root_dir))
    with TwoHosts(workdir) as rig:
        for path in (tiny_guest.kernel, tiny_guest.initrd):
            shutil.copyfile(path, rig.shared_dir / path.name)
        yield rig
    print(f"\ntwo-host rig: setup {rig.setup_s:.2f} s, teardown {rig.teardown_s:.2f} s")


@pytest.fixture(scope="module")
async def hypervisors(rig: TwoHosts) -> AsyncIterator[tuple[Hypervisor, Hypervisor]]:
    a = await Hypervisor.open(rig.hosts[0].uri, events=False)
    b = await Hypervisor.open(rig.hosts[1].uri, events=False)
    yield a, b
    a.close()
    b.close()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   check=True)


def _ticks(text: str) -> list[int]:
    return [int(n) for n in TICK.findall(text)]


def _moved(xml: str, src: Host, dst: Host, serial: Path) -> str:
    """The guest's migratable XML with the destination's paths: its serial log and disks."""
    src_serial = re.search(r"<serial type=.file.>\s*<source path='([^']+)'", xml)
    assert src_serial is not None
    return xml.replace(src_serial.group(1), str(serial)).replace(
        str(src.images_dir), str(dst.images_dir))


async def _started(hv: Hypervisor, rig: TwoHosts, host: Host, name: str,
                   disk: Path | None = None) -> tuple[str, Path]:
    spec = VmSpec(uuid=str(uuid.uuid4()), name=name, vcpus=1, memory_mib=128)
    serial = host.images_dir / f"{name}.serial-1.log"
    vm = await hv.define(domain_xml(
        spec, domain_type="qemu", kernel=rig.shared_dir / "vmlinuz",
        initrd=rig.shared_dir / "initrd.img", serial_log=serial, disk=disk))
    await hv.start(vm)
    return vm, serial


def test_the_hosts_are_two_with_their_addresses_only_inside(rig: TwoHosts) -> None:
    a, b = rig.hosts
    assert a.host_uuid != b.host_uuid
    assert rig.setup_s is not None
    assert rig.setup_s < 10
    root_addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                                    check=True).stdout
    assert SUBNET not in root_addresses
    for host in rig.hosts:
        inside = subprocess.run(["ip", "-n", host.name, "-o", "addr"], capture_output=True,
                                text=True, check=True).stdout
        assert f"{host.address}/24" in inside
        hostname = subprocess.run(["virsh", "-c", host.uri, "hostname"], capture_output=True,
                                  text=True, check=True).stdout.strip()
        assert hostname == host.name
    # Each reaches the other's libvirtd over the veth, as peer-to-peer migration will.
    reached = subprocess.run(["ip", "netns", "exec", a.name, "virsh", "-c", b.migration_uri,
                              "hostname"], capture_output=True, text=True, check=True)
    assert reached.stdout.strip() == b.name


async def test_a_running_guest_moves_there_and_back_and_its_counter_goes_on(
        rig: TwoHosts, hypervisors: tuple[Hypervisor, Hypervisor]) -> None:
    a, b = rig.hosts
    hv_a, hv_b = hypervisors
    vm, serial_a1 = await _started(hv_a, rig, a, "tiny-mover")
    await _until(lambda: len(_ticks(_text(serial_a1))) >= 3, 60, "the guest's counter on A")

    seen: list[MigrationProgress] = []
    serial_b = b.images_dir / "tiny-mover.serial-2.log"
    there = await hv_a.migrate(
        vm, b.migration_uri, dest_xml=_moved(await hv_a.migratable_xml(vm), a, b, serial_b),
        max_downtime_ms=300, timeout_s=30, progress=seen.append)
    assert await hv_a.state(vm) is None  # undefined at the source
    assert await hv_b.state(vm) == "running"
    assert f"'{serial_b}'" in await hv_b.domain_xml(vm)
    persistent = (await _run("virsh", "-c", b.uri, "dumpxml", "--inactive", vm)).stdout
    assert str(a.images_dir) not in persistent  # B's definition has B's own paths
    before = _ticks(_text(serial_a1))[-1]
    await _until(lambda: len(_ticks(_text(serial_b))) >= 3, 10, "the counter on B")

    serial_a2 = a.images_dir / "tiny-mover.serial-3.log"
    back = await hv_b.migrate(
        vm, a.migration_uri, dest_xml=_moved(await hv_b.migratable_xml(vm), b, a, serial_a2))
    assert await hv_b.state(vm) is None
    assert await hv_a.state(vm) == "running"
    await _until(lambda: len(_ticks(_text(serial_a2))) >= 3, 10, "the counter on A again")

    # One boot, and one counter with no step missed or repeated across the three logs.
    whole = _text(serial_a1) + _text(serial_b) + _text(serial_a2)
    ticks = _ticks(whole)
    assert whole.count("VIRT8RA-GUEST-UP") == 1
    assert ticks == list(range(ticks[0], ticks[-1] + 1))
    assert _ticks(_text(serial_b))[0] <= before + 1
    for result in (there, back):
        assert 0 < result.duration_ms < 15_000
        assert result.downtime_ms is not None
        assert 0 < result.downtime_ms < 2_000
        assert result.transferred_bytes is not None
        assert result.transferred_bytes > 10 << 20
        assert result.memory_iterations is not None
        assert result.memory_iterations >= 1
        assert result.disk_bytes is None
    print(f"\nA->B {there}\nB->A {back}\nprogress samples: {len(seen)}")

    # Past its timeout (at 1 MiB/s it would take minutes) the move is aborted; A keeps it.
    started = time.monotonic()
    with pytest.raises(MigrationTimeoutError) as err:
        await hv_a.migrate(
            vm, b.migration_uri, bandwidth_mib_s=1, timeout_s=1.0,
            dest_xml=_moved(await hv_a.migratable_xml(vm), a, b, serial_b))
    aborted_after = time.monotonic() - started
    assert err.value.timeout_s == 1.0
    assert aborted_after < 10
    assert await hv_a.state(vm) == "running"
    assert await hv_b.state(vm) is None
    last = _ticks(_text(serial_a2))[-1]
    await _until(lambda: _ticks(_text(serial_a2))[-1] > last + 2, 10, "the counter going on")
    print(f"timeout 1 s: aborted after {aborted_after:.2f} s")
    assert await hv_a.undefine(vm)


async def test_a_guest_with_a_disk_moves_with_its_data(
        rig: TwoHosts, hypervisors: tuple[Hypervisor, Hypervisor]) -> None:
    a, b = rig.hosts
    hv_a, hv_b = hypervisors
    disk = a.images_dir / "tiny-disk.qcow2"
    await _run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M")
    await _run("qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 2M", str(disk))
    vm, serial_a = await _started(hv_a, rig, a, "tiny-disk", disk=disk)
    await _until(lambda: len(_ticks(_text(serial_a))) >= 1, 60, "the guest's counter on A")

    serial_b = b.images_dir / "tiny-disk.serial-2.log"
    result = await hv_a.migrate(
        vm, b.migration_uri, copy_storage=True, timeout_s=60,
        dest_xml=_moved(await hv_a.migratable_xml(vm), a, b, serial_b))
    assert await hv_b.state(vm) == "running"
    copied = b.images_dir / disk.name
    assert f"'{copied}'" in await hv_b.domain_xml(vm)
    # The data written at A is at B (read while the guest runs: -U shares its lock).
    check = await _run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0xa5 1M 2M",
                       str(copied))
    assert "Pattern verification failed" not in check.stdout
    assert result.disk_bytes == 64 << 20  # the disk's whole virtual size, zeros included
    assert result.transferred_bytes is not None
    assert result.memory_bytes is not None
    assert result.transferred_bytes == result.memory_bytes + result.disk_bytes
    await _until(lambda: len(_ticks(_text(serial_b))) >= 2, 10, "the counter on B")
    print(f"\nA->B with a disk: {result}")
    assert await hv_b.undefine(vm)


def test_a_rig_left_by_a_killed_run_is_cleared_by_the_next(root_dir: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tworig-killed-", dir=root_dir))
    name = "v8mig-kill"
    script = ("import sys, time; from pathlib import Path; from demo.tworig import "
              f"TwoHosts; TwoHosts(Path({str(workdir)!r}), name={name!r}).setup(); "
              "print('up', flush=True); time.sleep(120)")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).parents[2]) as run:
        try:
            assert run.stdout is not None
            assert run.stdout.readline() == "up\n"
        finally:
            run.send_signal(signal.SIGKILL)
    stale = [int((workdir / f"{name}-{x}" / "pids" / "libvirtd.pid").read_text())
             for x in "ab"]
    assert all(running(pid) for pid in stale)
    with TwoHosts(workdir, name=name) as again:
        assert not any(running(pid) for pid in stale)
        assert subprocess.run(["virsh", "-c", again.hosts[1].uri, "hostname"],
                              capture_output=True, check=True).returncode == 0
    gone = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in gone
    assert again.teardown_s is not None
    assert again.teardown_s < 10
