"""A tiny real guest built from Debian packages: a kernel and a busybox initramfs.

For tests and ``virt8ra demo --real``: no internet images, only the package registry. The
recipe (``apt-get download`` of the kernel that ``linux-image-amd64`` depends on and of
``busybox-static``; unpack without running their scripts; a gzip'd cpio ``newc`` initramfs
made here, whose ``/init`` is a busybox shell) boots under QEMU with direct kernel boot and
``console=ttyS0``: it loads the virtio modules, writes :data:`MARKER` to ``/dev/ttyS0``, then
``VIRT8RA-TICK <n>`` every 0.2 s. It has no ACPI handling: a shutdown request is ignored.

The result is cached in a directory of its own, one entry per kernel package version (and
busybox version and recipe revision); a build goes to a temporary directory and is renamed
into place, so a killed build leaves no half entry. A tool, not part of the service: it runs
``apt-get``, ``apt-cache``, ``dpkg-deb`` and ``tar``.

Errors::

    GuestImageError (RuntimeError)   a step failed; ``step`` names it, the message says why
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MARKER: Final = "VIRT8RA-GUEST-UP"
TICK_PREFIX: Final = "VIRT8RA-TICK"
RECIPE_REVISION: Final = 1  # bump whenever what goes into the image changes
META_PACKAGE: Final = "linux-image-amd64"
BUSYBOX_PACKAGE: Final = "busybox-static"
# In this order (each needs the ones before it); a module the kernel has built in is skipped.
VIRTIO_MODULES: Final = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_blk",
)
# What to unpack of the kernel package: the virtio drivers (a few MB of its ~400 MB).
_MODULE_MEMBERS: Final = ("./lib/modules/*/kernel/drivers/*virtio*",)
_APT_LISTS: Final = Path("/var/lib/apt/lists")
_RESOLVED: Final = "resolved.json"  # apt index fingerprint -> cache entry, for an instant hit
_STEP_TIMEOUT_S: Final = 600.0

INIT_SCRIPT: Final = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {' '.join(VIRTIO_MODULES)}; do
    f=/lib/modules/$m.ko
    [ -e "$f" ] && insmod "$f"
done
echo "{MARKER} $(uname -r)" > /dev/ttyS0
i=0
while :; do
    i=$((i + 1))
    echo "{TICK_PREFIX} $i" > /dev/ttyS0
    usleep 200000
done
"""


class GuestImageError(RuntimeError):
    """Building the tiny guest failed at ``step`` (``resolve``, ``download``, ``unpack``)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"tiny guest image, {step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TinyGuest:
    """A built image: boot ``kernel`` with ``initrd`` and ``console=ttyS0``; the serial
    console shows ``marker`` once the guest is up."""

    kernel: Path
    initrd: Path
    marker: str
    kernel_package: str  # e.g. linux-image-6.1.0-56-amd64
    kernel_version: str  # the package's version, e.g. 6.1.192-2


@dataclass(frozen=True, slots=True)
class _Packages:
    kernel: str
    kernel_version: str
    busybox_version: str

    @property
    def key(self) -> str:
        raw = f"{self.kernel}_{self.kernel_version}_busybox-{self.busybox_version}"
        return re.sub(r"[^A-Za-z0-9.+_-]", "-", raw) + f"_r{RECIPE_REVISION}"


def build_tiny_guest(cache_dir: Path) -> TinyGuest:
    """The tiny guest for the kernel the apt index offers now, from ``cache_dir`` if it was
    built before, else built (a minute at most; ~70 MB downloaded) and cached there.
    Older entries in ``cache_dir`` are removed after a new one is built."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _apt_index_fingerprint()
    hit = _cached_for(cache_dir, fingerprint)
    if hit is not None:
        return hit
    with _locked(cache_dir):
        packages = _resolve()
        entry = cache_dir / packages.key
        if not (entry / "meta.json").is_file():
            _build(cache_dir, packages, entry)
            for old in cache_dir.iterdir():
                if old.is_dir() and old != entry and (old / "meta.json").is_file():
                    shutil.rmtree(old, ignore_errors=True)
        _write_atomically(cache_dir / _RESOLVED,
                          json.dumps({"fingerprint": fingerprint, "entry": packages.key}))
        return _load(entry)


def _apt_index_fingerprint() -> str:
    """Names, sizes and times of apt's package lists: changes whenever ``apt-get update``
    brings something new, costs no ``apt-cache`` run."""
    digest = hashlib.sha256()
    with contextlib.suppress(OSError):
        for path in sorted(_APT_LISTS.glob("*_Packages*")):
            st = path.stat()
            digest.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cached_for(cache_dir: Path, fingerprint: str) -> TinyGuest | None:
    try:
        resolved = json.loads((cache_dir / _RESOLVED).read_text())
        if resolved["fingerprint"] != fingerprint:
            return None
        return _load(cache_dir / str(resolved["entry"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load(entry: Path) -> TinyGuest:
    meta = json.loads((entry / "meta.json").read_text())
    return TinyGuest(
        kernel=entry / "vmlinuz",
        initrd=entry / "initrd.img",
        marker=str(meta["marker"]),
        kernel_package=str(meta["kernel_package"]),
        kernel_version=str(meta["kernel_version"]),
    )


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One builder per cache directory at a time (another test session may be building)."""
    with (cache_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(step: str, argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              timeout=_STEP_TIMEOUT_S)
    except FileNotFoundError:
        raise GuestImageError(step, f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise GuestImageError(step, f"{' '.join(argv)} took over {_STEP_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        raise GuestImageError(step, f"{' '.join(argv)} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def _stanzas(text: str) -> list[dict[str, str]]:
    """apt-cache's deb822 output as one dict per package (continuation lines dropped)."""
    out: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package"):
            out.append(fields)
    return out


def _resolve() -> _Packages:
    """Which kernel package ``linux-image-amd64`` depends on now, and the versions."""
    try:
        text = _run("resolve", ["apt-cache", "show", "--no-all-versions", META_PACKAGE,
                                BUSYBOX_PACKAGE])
    except GuestImageError as exc:
        raise GuestImageError(
            "resolve", f"apt has no index for {META_PACKAGE} or {BUSYBOX_PACKAGE}: "
            f"run apt-get update ({exc.reason})") from None
    found = {s["Package"]: s for s in _stanzas(text)}
    if META_PACKAGE not in found or BUSYBOX_PACKAGE not in found:
        raise GuestImageError("resolve", f"apt knows no {META_PACKAGE} or {BUSYBOX_PACKAGE}: "
                              "run apt-get update")
    depends = found[META_PACKAGE].get("Depends", "")
    match = re.search(r"(linux-image-[0-9][^\s,(]*)(?:\s*\(\s*=\s*([^)\s]+)\s*\))?", depends)
    if match is None:
        raise GuestImageError("resolve", f"{META_PACKAGE} depends on no kernel: {depends!r}")
    kernel, version = match.group(1), match.group(2)
    if version is None:
        stanzas = _stanzas(_run("resolve", ["apt-cache", "show", "--no-all-versions", kernel]))
        version = stanzas[0].get("Version", "") if stanzas else ""
    if not version:
        raise GuestImageError("resolve", f"apt knows no version of {kernel}")
    return _Packages(kernel, version, found[BUSYBOX_PACKAGE].get("Version", ""))


def _build(cache_dir: Path, packages: _Packages, entry: Path) -> None:
    for stale in cache_dir.glob(".build-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        debs, root, out = work / "debs", work / "root", work / "out"
        for d in (debs, root, out):
            d.mkdir()
        _run("download", ["apt-get", "download", "-q",
                          f"{packages.kernel}={packages.kernel_version}",
                          f"{BUSYBOX_PACKAGE}={packages.busybox_version}"], cwd=debs)
        kernel_deb = _one(debs.glob(f"{packages.kernel}_*.deb"), "kernel package")
        busybox_deb = _one(debs.glob(f"{BUSYBOX_PACKAGE}_*.deb"), "busybox package")
        # Only the members we need (the kernel package unpacks to ~400 MB); no scripts run.
        _unpack(kernel_deb, root, ["./boot/vmlinuz-*", *_MODULE_MEMBERS])
        _unpack(busybox_deb, root, ["./bin/busybox"])
        vmlinuz = _one(root.glob("boot/vmlinuz-*"), "boot/vmlinuz-* in the kernel package")
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        modules = _modules(root)
        (out / "initrd.img").write_bytes(initramfs(
            busybox=(root / "bin/busybox").read_bytes(),
            modules={m: modules[m] for m in VIRTIO_MODULES if m in modules},
        ))
        (out / "meta.json").write_text(json.dumps({
            "marker": MARKER, "kernel_package": packages.kernel,
            "kernel_version": packages.kernel_version,
            "busybox_version": packages.busybox_version, "recipe": RECIPE_REVISION,
            "built_at": time.time(),
        }, indent=1))
        for path in out.iterdir():
            os.chmod(path, 0o644)
        os.chmod(out, 0o755)  # noqa: S103 - QEMU runs as its own user and reads these
        os.rename(out, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _one(paths: Iterator[Path], what: str) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise GuestImageError("unpack", f"expected one {what}, found {len(found)}")
    return found[0]


def _modules(root: Path) -> dict[str, bytes]:
    """The unpacked kernel modules by name, uncompressed (busybox's insmod reads plain .ko)."""
    found: dict[str, bytes] = {}
    for path in root.glob("lib/modules/*/kernel/**/*.ko*"):
        name, _, suffix = path.name.partition(".ko")
        if suffix == "":
            found[name] = path.read_bytes()
        elif suffix == ".xz":
            found[name] = lzma.decompress(path.read_bytes())
        elif suffix == ".gz":
            found[name] = gzip.decompress(path.read_bytes())
    return found


def _unpack(deb: Path, dest: Path, members: list[str]) -> None:
    """Extract ``members`` (tar wildcards) of ``deb``'s data, as ``dpkg-deb -x`` would."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as dpkg:
        tar = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *members],
                             stdin=dpkg.stdout, capture_output=True, text=True, check=False,
                             timeout=_STEP_TIMEOUT_S)
        assert dpkg.stdout is not None
        assert dpkg.stderr is not None
        dpkg.stdout.close()
        dpkg_err = dpkg.stderr.read().decode(errors="replace")
    if dpkg.returncode != 0 or tar.returncode != 0:
        raise GuestImageError("unpack", f"{deb.name}: {(dpkg_err + tar.stderr).strip()[-800:]}")


# --- the initramfs: cpio "newc" written here, gzip'd ------------------------------------------

_S_IFDIR: Final = 0o040000
_S_IFREG: Final = 0o100000
_S_IFLNK: Final = 0o120000
_S_IFCHR: Final = 0o020000


def _cpio_entry(ino: int, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    pad_name = -(len(header) + len(encoded)) % 4
    return header + encoded + b"\0" * pad_name + data + b"\0" * (-len(data) % 4)


def initramfs(*, busybox: bytes, modules: dict[str, bytes]) -> bytes:
    """The gzip'd cpio (``newc``) initramfs: busybox, :data:`INIT_SCRIPT` as ``/init``,
    the given kernel modules as ``/lib/modules/<name>.ko``, and ``/dev/console``."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, _S_IFDIR | 0o755, b"", (0, 0)) for d in ("bin", "dev", "proc", "sys", "lib",
                                                     "lib/modules")
    ]
    entries += [
        ("dev/console", _S_IFCHR | 0o600, b"", (5, 1)),  # the kernel opens it before /init
        ("bin/busybox", _S_IFREG | 0o755, busybox, (0, 0)),
        ("bin/sh", _S_IFLNK | 0o777, b"busybox", (0, 0)),
        ("init", _S_IFREG | 0o755, INIT_SCRIPT.encode(), (0, 0)),
    ]
    entries += [(f"lib/modules/{name}.ko", _S_IFREG | 0o644, data, (0, 0))
                for name, data in modules.items()]
    archive = b"".join(_cpio_entry(i + 1, name, mode, data, rdev)
                       for i, (name, mode, data, rdev) in enumerate(entries))
    archive += _cpio_entry(0, "TRAILER!!!", 0)
    return gzip.compress(archive, compresslevel=6, mtime=0)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
