"""Real guests for tests: the system libvirtd (started here if none runs) and the tiny guest.

Session fixtures, registered in ``tests/conftest.py``:

- ``system_libvirt``: the URI ``qemu:///system``. If ``/run/libvirt/libvirt-sock`` answers, that
  libvirtd is used; else this creates what the ``libvirt-daemon-system`` package would (users,
  groups, directories), starts ``virtlogd`` and ``libvirtd`` as daemons and, at the end of the
  session, stops what it started, by pid.
- ``tiny_guest``: the busybox guest of ``demo.guestimage``, built once per machine into
  :data:`IMAGE_CACHE` (~8 s cold, instant after), copied where QEMU's user can read it.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from demo.guestimage import TinyGuest, build_tiny_guest
from demo.tworig import prepare_libvirt_users, running, socket_answers

SYSTEM_URI: Final = "qemu:///system"
LIBVIRT_SOCKET: Final = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET: Final = Path("/run/libvirt/virtlogd-sock")
KVM_DEVICE: Final = Path("/dev/kvm")
IMAGE_CACHE: Final = Path("/var/cache/virt8ra-tests/tiny-guest")
# What libvirt-daemon-system creates; libvirtd looks its compiled-in QEMU user up at start.
LIBVIRT_DIRS: Final = ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu",
                       "/var/lib/libvirt/images", "/var/cache/libvirt/qemu")


def prepare_libvirt_host() -> None:
    """Users, groups and directories libvirtd needs, as libvirt-daemon-system makes them."""
    prepare_libvirt_users()
    for d in LIBVIRT_DIRS:
        Path(d).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def kvm_device_for_group_kvm() -> Iterator[None]:
    """Give ``/dev/kvm`` to group ``kvm`` (0660) as udev does on an ordinary host, and put it
    back afterwards. libvirtd probes QEMU as root but checks KVM as QEMU's user: if the two
    disagree it throws its cached QEMU capabilities away and probes again (~4 s) on every
    define. (Guests here still use ``type='qemu'``: this /dev/kvm boots nothing.)"""
    try:
        st = KVM_DEVICE.stat()
    except OSError:
        yield
        return
    kvm_gid = grp.getgrnam("kvm").gr_gid
    changed = st.st_gid != kvm_gid or stat.S_IMODE(st.st_mode) & 0o060 != 0o060
    if changed:
        os.chown(KVM_DEVICE, -1, kvm_gid)
        os.chmod(KVM_DEVICE, stat.S_IMODE(st.st_mode) | 0o060)
    try:
        yield
    finally:
        if changed:
            os.chown(KVM_DEVICE, -1, st.st_gid)
            os.chmod(KVM_DEVICE, stat.S_IMODE(st.st_mode))


def start_daemon(argv: list[str], pidfile: Path, sock: Path, timeout_s: float = 10.0) -> int:
    """Start a daemon that forks itself (``-d``); return its pid once ``sock`` answers."""
    subprocess.run([*argv, "-d", "-p", str(pidfile)], check=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not socket_answers(sock):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(argv)} started but {sock} does not answer")
        time.sleep(0.05)
    return int(pidfile.read_text().strip())


def stop_daemon(pid: int, timeout_s: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not running(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def system_libvirt() -> Iterator[str]:
    """``qemu:///system``, with libvirtd started for the session if none answers."""
    if socket_answers(LIBVIRT_SOCKET):
        yield SYSTEM_URI
        return
    prepare_libvirt_host()
    started: list[int] = []
    with kvm_device_for_group_kvm():
        try:
            if not socket_answers(VIRTLOGD_SOCKET):
                started.append(start_daemon(["virtlogd"], Path("/run/virtlogd.pid"),
                                            VIRTLOGD_SOCKET))
            # On one CPU: libvirtd's QEMU probe records the host's CPUID, which differs
            # between this VM's CPUs, so a libvirtd on another CPU would probe again (~4 s).
            # Guests are not bound by it: libvirt gives QEMU all host CPUs.
            started.append(start_daemon(["taskset", "-c", "0", "libvirtd"],
                                        Path("/run/libvirtd.pid"), LIBVIRT_SOCKET))
            yield SYSTEM_URI
        finally:
            for pid in reversed(started):  # libvirtd first, then the virtlogd it writes to
                stop_daemon(pid)


@pytest.fixture(scope="session")
def tiny_guest() -> Iterator[TinyGuest]:
    """The tiny guest's kernel and initrd in a session directory QEMU's user can read (libvirt
    relabels the files it boots: they are copies, the cache stays as it is)."""
    built = build_tiny_guest(IMAGE_CACHE)
    images = Path("/var/lib/libvirt/images")
    images.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="virt8ra-tiny-guest-", dir=images))
    os.chmod(where, 0o755)  # noqa: S103 - QEMU runs as libvirt-qemu
    # Plain copies: libvirt keeps the owner it changes in the file's extended attributes,
    # which must not travel with it (copy2 would copy them).
    kernel = Path(shutil.copyfile(built.kernel, where / "vmlinuz"))
    initrd = Path(shutil.copyfile(built.initrd, where / "initrd.img"))
    for path in (kernel, initrd):
        os.chmod(path, 0o644)
    try:
        yield TinyGuest(kernel=kernel, initrd=initrd, marker=built.marker,
                        kernel_package=built.kernel_package, kernel_version=built.kernel_version)
    finally:
        shutil.rmtree(where, ignore_errors=True)
