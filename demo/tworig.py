"""Two real libvirt hosts on one machine, for live migration: tests and ``virt8ra demo --real``.

libvirt refuses to migrate a guest to the host it runs on (it compares host UUIDs), so each
"host" here is its own ``libvirtd`` (and ``virtlogd``) with its own host UUID, in its own
network namespace and mount namespace::

        root namespace (agents, broker: 127.0.0.1)
          |  unix socket <workdir>/<host>/run/libvirt-sock   (Host.uri)
          v
    +-- netns v8mig-a ------------+        +-- netns v8mig-b ------------+
    | libvirtd, virtlogd, QEMU    |  veth  | libvirtd, virtlogd, QEMU    |
    | 10.250.0.1/24 (v8mig-a0) ---+--------+-- 10.250.0.2/24 (v8mig-b0)  |
    +-----------------------------+        +-----------------------------+

The addresses exist only inside the two namespaces: libvirt's and QEMU's migration traffic
crosses the veth pair and nothing else. Each host bind-mounts private directories of the
work directory over ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt`` and ``/etc/pki``, and a hosts file over ``/etc/hosts`` (the mounts live
and die with the host's processes). ``/var/cache/libvirt`` stays shared: QEMU's capabilities
are probed once.
Peer-to-peer migration goes to ``Host.tls_migration_uri`` (``qemu+tls://10.250.0.x/system``)
once a node's agent has written the fleet's certificates into ``Host.tls_dir`` (the host's
``/etc/pki``; libvirtd starts on a placeholder and reloads them through ``Host.admin_uri``),
or to ``Host.migration_uri`` (``qemu+tcp://``, no authentication: for tests of migration
itself).

Guest files go in ``Host.images_dir``, a directory of the work directory with the same path
inside the host and outside it; it is the host's ``dir`` storage pool ``images`` (a copy of a
non-shared disk is created there by libvirt), and its guests' serial logs can go there too.
Give a guest migrating from one host to the other a destination XML with the other host's
paths.

Setup takes a lock per rig name (``/run/lock/<name>.lock``); namespaces left with the rig's
exact names by a killed run are stale then: their processes are stopped and the namespaces
removed first. Teardown stops what the rig started: every process in its namespaces (guests,
then ``libvirtd``, then ``virtlogd``, each by pid), then removes the namespaces (which takes
the veth pair with them). The work directory is left to its owner. Needs root, ``ip``
(iproute2), ``unshare`` (util-linux) and the light set of libvirt and QEMU packages.

Errors::

    RigError (RuntimeError)   a step of setup failed; ``step`` names it, the message says why
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Final

from agent.identity.libvirttls import write_tls_files
from aggregator.trust.pki import placeholder_tls

DEFAULT_NAME: Final = "v8mig"
SUBNET: Final = "10.250.0"  # /24; exists only inside the rig's namespaces
HOST_LETTERS: Final = ("a", "b")
LOCK_DIR: Final = Path("/run/lock")
# What libvirt-daemon-system creates; libvirtd looks its compiled-in QEMU user up at start.
_GROUPS: Final = ("kvm", "libvirt-qemu")
_QEMU_USER: Final = "libvirt-qemu"
_CACHE_DIR: Final = Path("/var/cache/libvirt/qemu")
# Inside the host -> the work directory's subdirectory mounted there.
_PRIVATE_DIRS: Final = (
    ("/etc/libvirt", "etc"),
    ("/etc/pki", "pki"),  # libvirt's and QEMU's TLS files (libvirt reloads only these paths)
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/var/log/libvirt", "log"),
)
_START_TIMEOUT_S: Final = 30.0
_STOP_TIMEOUT_S: Final = 10.0
_POLL_S: Final = 0.02
# libvirtd on CPU 0 only: its QEMU capability probe records the CPUID of the CPU it ran on,
# which differs between this kind of VM's CPUs, so a libvirtd elsewhere would probe again
# (~5 s). Guests are not bound by it: libvirt gives QEMU all host CPUs.
_LIBVIRTD_CPUS: Final = "0"


class RigError(RuntimeError):
    """Setting the two hosts up failed at ``step`` (``lock``, ``users``, ``network``,
    ``start``); the message says why."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"two-host rig, {step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Host:
    """One libvirt host of the rig, as seen from the root namespace."""

    name: str  # also its hostname and network namespace, e.g. v8mig-a
    address: str  # inside its namespace only, e.g. 10.250.0.1
    host_uuid: str
    root: Path  # its private directories live here
    uri: str  # qemu+unix:///system?socket=...: reachable from the root namespace
    migration_uri: str  # qemu+tcp://<address>/system: reachable from the other host only
    images_dir: Path  # its dir storage pool ``images``; same path inside and outside

    @property
    def tls_dir(self) -> Path:
        """Its ``/etc/pki`` as seen from outside: where an agent writes libvirt's TLS files
        (libvirtd starts on a placeholder certificate and reloads the real one)."""
        return self.root / "pki"

    @property
    def admin_uri(self) -> str:
        """Its libvirtd's admin URI (``virt-admin``), reachable from the root namespace."""
        return f"libvirtd:///system?socket={self.root / 'run' / 'libvirt-admin-sock'}"

    @property
    def tls_migration_uri(self) -> str:
        return f"qemu+tls://{self.address}/system"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    def path(self, inside: str | Path) -> Path:
        """Where a path the host sees (``/var/log/libvirt/qemu/x.log``) is from outside."""
        text = str(inside)
        for mount, sub in _PRIVATE_DIRS:
            if text == mount or text.startswith(mount + "/"):
                return self.root / sub / text[len(mount):].lstrip("/")
        return Path(text)


class TwoHosts:
    """Two libvirt hosts in network namespaces, as a context manager::

        with TwoHosts(workdir) as rig:
            a, b = rig.hosts
            ...  # define a guest at a.uri, migrate it to b.migration_uri

    ``workdir`` must exist (it gets one directory per host, and :attr:`shared_dir`, which
    both hosts see at the same path: the place for files both need, like a kernel).
    ``name`` prefixes the namespaces, hostnames and interfaces (at most 12 characters); two
    rigs with different names can run side by side (the subnet exists only inside each
    rig's namespaces). :attr:`setup_s` and :attr:`teardown_s` say how long each took.
    """

    def __init__(self, workdir: Path, *, name: str = DEFAULT_NAME) -> None:
        if not 1 <= len(name) <= 12 or not name.replace("-", "").isalnum():
            raise ValueError(f"rig name {name!r}: 1 to 12 letters, digits or '-'")
        self.workdir = workdir
        self.name = name
        self.hosts: tuple[Host, ...] = tuple(
            self._host(letter, i + 1) for i, letter in enumerate(HOST_LETTERS))
        self.shared_dir = workdir / "shared"
        self.setup_s: float | None = None
        self.teardown_s: float | None = None
        self._lock: IO[bytes] | None = None
        self._namespaces: list[str] = []
        self._daemons: list[tuple[str, int]] = []  # (namespace, pid), in start order

    def _host(self, letter: str, number: int) -> Host:
        name = f"{self.name}-{letter}"
        root = self.workdir / name
        address = f"{SUBNET}.{number}"
        return Host(
            name=name,
            address=address,
            host_uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{name}.virt8ra.invalid")),
            root=root,
            uri=f"qemu+unix:///system?socket={root / 'run' / 'libvirt-sock'}",
            migration_uri=f"qemu+tcp://{address}/system",
            images_dir=root / "images",
        )

    def __enter__(self) -> TwoHosts:
        self.setup()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Start both hosts; on failure, tear down what was started and raise RigError."""
        started = time.monotonic()
        try:
            self._take_lock()
            prepare_libvirt_users()
            for host in self.hosts:
                _remove_stale_namespace(host.name)
            self._network()
            self.shared_dir.mkdir(exist_ok=True)
            for host in self.hosts:
                self._write_host_files(host)
            launches = [(host, self._launch(host)) for host in self.hosts]
            for host, proc in launches:
                self._await_host(host, proc)
        except BaseException:
            self.teardown()
            raise
        self.setup_s = time.monotonic() - started

    def _take_lock(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        lock = (LOCK_DIR / f"{self.name}.lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RigError("lock", f"a rig named {self.name!r} is running") from None
        self._lock = lock

    def _network(self) -> None:
        a, b = self.hosts
        for host in self.hosts:
            _run("network", ["ip", "netns", "add", host.name])
            self._namespaces.append(host.name)
        # Created inside the namespaces: the pair never appears in the root namespace.
        _run("network", ["ip", "link", "add", f"{a.name}0", "netns", a.name, "type", "veth",
                         "peer", "name", f"{b.name}0", "netns", b.name])
        for host in self.hosts:
            ns = ["ip", "-n", host.name]
            _run("network", [*ns, "link", "set", "lo", "up"])
            _run("network", [*ns, "addr", "add", f"{host.address}/24", "dev", f"{host.name}0"])
            _run("network", [*ns, "link", "set", f"{host.name}0", "up"])

    def _write_host_files(self, host: Host) -> None:
        for _mount, sub in _PRIVATE_DIRS:
            (host.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("lib/qemu", "lib/images", "log/qemu", "etc/storage/autostart"):
            (host.root / sub).mkdir(parents=True, exist_ok=True)
        host.images_dir.mkdir(parents=True, exist_ok=True)
        etc = host.root / "etc"
        _placeholder_tls(host)
        (etc / "libvirtd.conf").write_text(
            # TLS with libvirt's default file paths (the only ones it reloads), and plain
            # TCP for tests of migration itself.
            "listen_tls = 1\n"
            "listen_tcp = 1\n"
            f'listen_addr = "{host.address}"\n'
            'auth_tcp = "none"\n'
            'auth_unix_rw = "none"\n'
            f'host_uuid = "{host.host_uuid}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        (etc / "qemu.conf").write_text(
            'user = "root"\n'
            'group = "root"\n'
            "cgroup_controllers = [ ]\n"
            "namespaces = [ ]\n"
            f'migration_host = "{host.address}"\n'
            # Both hosts see the shared files (kernel, initrd): no owner bookkeeping in
            # their extended attributes, which two daemons would count against each other.
            "remember_owner = 0\n")
        (etc / "storage" / "images.xml").write_text(
            "<pool type='dir'>\n"
            "  <name>images</name>\n"
            f"  <target><path>{host.images_dir}</path></target>\n"
            "</pool>\n")
        autostart = etc / "storage" / "autostart" / "images.xml"
        if not autostart.is_symlink():
            autostart.symlink_to(etc / "storage" / "images.xml")
        (host.root / "hosts").write_text(
            "127.0.0.1 localhost\n"
            + "".join(f"{h.address} {h.name}\n" for h in self.hosts))

    def _launch(self, host: Host) -> subprocess.Popen[bytes]:
        mounts = "".join(
            f"mkdir -p {mount} && mount --bind {shlex.quote(str(host.root / sub))} {mount}\n"
            for mount, sub in _PRIVATE_DIRS)
        run = host.root / "pids"
        run.mkdir(exist_ok=True)
        script = (
            "set -e\n"
            + mounts
            + f"mount --bind {shlex.quote(str(host.root / 'hosts'))} /etc/hosts\n"
            f"hostname {host.name}\n"
            f"virtlogd -d -p {shlex.quote(str(run / 'virtlogd.pid'))}\n"
            f"taskset -c {_LIBVIRTD_CPUS} libvirtd -d -l"
            f" -p {shlex.quote(str(run / 'libvirtd.pid'))}\n")
        log = (host.root / "start.log").open("ab")
        with log:
            return subprocess.Popen(
                ["ip", "netns", "exec", host.name,
                 "unshare", "--mount", "--uts", "--propagation", "private",
                 "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def _await_host(self, host: Host, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait(timeout=_START_TIMEOUT_S)
        for daemon in ("virtlogd", "libvirtd"):
            pidfile = host.root / "pids" / f"{daemon}.pid"
            with contextlib.suppress(OSError, ValueError):
                self._daemons.append((host.name, int(pidfile.read_text().strip())))
        if code != 0:
            raise RigError("start", f"{host.name}: exit status {code}; see "
                           f"{host.root / 'start.log'}")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not socket_answers(host.socket):
            if time.monotonic() > deadline:
                raise RigError("start", f"{host.name}: {host.socket} does not answer; see "
                               f"{host.root / 'log' / 'libvirtd.log'}")
            time.sleep(_POLL_S)

    # --- teardown ------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop what the rig started and remove its namespaces; safe to call twice."""
        started = time.monotonic()
        daemons = {pid for _ns, pid in self._daemons}
        for ns in self._namespaces:
            # The guests first (their libvirtd is still there to notice), then the daemons.
            guests = [pid for pid in _namespace_pids(ns) if pid not in daemons]
            _stop_pids(guests)
        _stop_pids([pid for _ns, pid in reversed(self._daemons) if _named(pid, "libvirtd")])
        _stop_pids([pid for _ns, pid in reversed(self._daemons)])
        for ns in self._namespaces:
            _stop_pids(_namespace_pids(ns))  # anything a daemon left behind
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        self._daemons.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        if self.setup_s is not None and self.teardown_s is None:
            self.teardown_s = time.monotonic() - started


def _placeholder_tls(host: Host) -> None:
    """A throwaway certificate (of a throwaway CA) where libvirt looks for its TLS files: libvirtd
    with TLS does not start without them. A node's agent writes the fleet's over it."""
    if (host.tls_dir / "libvirt" / "servercert.pem").exists():
        return
    ca_pem, pem, key_pem = placeholder_tls(host.name)
    write_tls_files(host.tls_dir, ca_pem=ca_pem, cert_pem=pem, key_pem=key_pem, layout="system")


def _run(step: str, argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RigError(step, f"{shlex.join(argv)}: {done.stderr.strip() or done.returncode}")


def prepare_libvirt_users() -> None:
    """The groups, user and cache directory libvirt-daemon-system would have created."""
    for group in _GROUPS:
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            _run("users", ["groupadd", "--system", group])
    if subprocess.run(["getent", "passwd", _QEMU_USER], capture_output=True).returncode:
        _run("users", ["useradd", "--system", "--gid", _QEMU_USER, "--groups", "kvm",
                       "--home-dir", "/var/lib/libvirt", "--no-create-home",
                       "--shell", "/usr/sbin/nologin", _QEMU_USER])
    _CACHE_DIR.mkdir(parents=True, exist_ok=True)


def _remove_stale_namespace(name: str) -> None:
    """A namespace with our exact name while we hold the lock is left by a killed run."""
    if not Path("/run/netns", name).exists():
        return
    _stop_pids(_namespace_pids(name))
    _run("network", ["ip", "netns", "del", name])


def _namespace_pids(name: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def _named(pid: int, command: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == command
    except OSError:
        return False


def _stop_pids(pids: list[int]) -> None:
    """SIGTERM each, then SIGKILL whatever still runs after the timeout."""
    pids = [pid for pid in pids if pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(_POLL_S)


def running(pid: int) -> bool:
    """Whether ``pid`` is alive (an exited daemon not yet reaped by init counts as gone)."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return line.rpartition(")")[2].split()[0] != "Z"


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
