"""Images on the node: fetched from the aggregator's image service over HTTPS with the node's
own certificate, checked by sha256 while they stream in, and kept by digest, so a corrupt or
partial download is never used (it never gets its final name). VM disks are made from them
with ``qemu-img`` (a copy-on-write overlay of the image, or a blank disk)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from plumbing.tls import TlsContext

SHA256 = re.compile(r"[0-9a-f]{64}")
IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20


class ImageError(Exception):
    """An image cannot be had or used; the message says why."""


PASSABLE: int = 0o711  # QEMU's user may pass through to the files it is given, not list them


def passable_dir(path: Path) -> None:
    """Make ``path`` a directory QEMU's own user can pass through, whatever the agent's umask
    (its unit's is 0077): the images and disks QEMU opens lie below it (libvirt hands each
    file to QEMU's user, not the directories on the way). What is created here, missing
    ancestors too, gets mode 0711; ``path`` itself, if it is ours, becomes passable (one
    made 0700 by an older agent); what else was there keeps its mode."""
    missing: list[Path] = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir()
            os.chmod(p, PASSABLE)
    if not path.is_dir():
        raise ImageError(f"{path} is not a directory")
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o011 != 0o011:  # made 0700 before
        os.chmod(path, (st.st_mode & 0o7777) | 0o011)  # noqa: S103 - pass, not list


async def fetch(base_url: str, name: str, sha256: str, directory: Path,
                tls: Callable[[], TlsContext]) -> Path:
    """The image ``name`` with digest ``sha256``: from ``directory`` if it is there, else
    downloaded from ``base_url``; raises ImageError."""
    if not IMAGE_NAME.fullmatch(name):
        raise ImageError(f"{name!r} is not an image name")
    if not SHA256.fullmatch(sha256):
        raise ImageError(f"image {name}: {sha256!r} is not a sha256 digest")
    path = directory / sha256
    if await asyncio.to_thread(path.exists):
        return path
    if not base_url:
        raise ImageError(f"image {name} is not here and no images_url is configured")
    return await asyncio.to_thread(_download, base_url, name, sha256, path, tls())


def _download(base_url: str, name: str, sha256: str, path: Path, tls: TlsContext) -> Path:
    passable_dir(path.parent)
    url = f"{base_url.rstrip('/')}/images/{urllib.parse.quote(name)}"
    partial = path.with_name(f".{sha256}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60, context=tls) as resp, \
                partial.open("wb") as out:  # noqa: S310 - the fleet's own image service
            while chunk := resp.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise ImageError(f"image {name}: downloaded sha256 {digest.hexdigest()}, the order"
                             f" says {sha256}: not used")
        os.replace(partial, path)
        return path
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"cannot fetch image {name} from {url}: {reason}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


async def fetch_crl(base_url: str, tls: Callable[[], TlsContext]) -> str:
    """The fleet's CRL (PEM) from the image service; raises ImageError."""
    url = f"{base_url.rstrip('/')}/crl"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=30, context=tls()) as resp:  # noqa: S310
            return str(resp.read(1 << 22).decode("ascii"))

    try:
        pem = await asyncio.to_thread(get)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ImageError(f"cannot fetch the CRL from {url}: {getattr(exc, 'reason', exc)}"
                         ) from None
    if not pem.startswith("-----BEGIN X509 CRL-----"):
        raise ImageError(f"{url} did not answer with a PEM CRL")
    return pem


async def make_disk(path: Path, image: Path | None, size_gib: int) -> Path:
    """A qcow2 disk at ``path``: an overlay of ``image`` (grown to ``size_gib`` if given), or a
    blank one of ``size_gib``. Kept if it exists (an order finished after a restart)."""
    if await asyncio.to_thread(path.exists):
        return path
    tmp = path.with_name(path.name + ".tmp")
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if image is not None:
        fmt = await _format(image)
        argv += ["-b", str(image), "-F", fmt, str(tmp)]
        if size_gib:
            argv.append(f"{size_gib}G")
    else:
        argv += [str(tmp), f"{max(size_gib, 1)}G"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise ImageError(f"qemu-img create failed: {err.decode(errors='replace').strip()}")
    os.replace(tmp, path)
    return path


async def _format(image: Path) -> str:
    """``qcow2`` or ``raw``; a qcow2 image with a backing file is refused: the guest could
    read whatever file it names on this node."""
    def header() -> bytes:
        with image.open("rb") as fh:
            return fh.read(20)

    head = await asyncio.to_thread(header)
    if head[:4] != b"QFI\xfb":
        return "raw"
    if len(head) < 20 or struct.unpack(">Q", head[8:16])[0] != 0:
        raise ImageError(f"{image.name}: a qcow2 image with a backing file is not used")
    return "qcow2"


async def backing_file(disk: Path) -> str | None:
    """The backing file a qcow2 disk of ours names, or None (raw, or no backing file)."""
    def read() -> str | None:
        with disk.open("rb") as fh:
            head = fh.read(20)
            if head[:4] != b"QFI\xfb" or len(head) < 20:
                return None
            offset = struct.unpack(">Q", head[8:16])[0]
            size = struct.unpack(">I", head[16:20])[0]
            if not offset or not 0 < size <= 1023:
                return None
            fh.seek(offset)
            return fh.read(size).decode(errors="replace")

    try:
        return await asyncio.to_thread(read)
    except OSError as exc:
        raise ImageError(f"{disk}: {exc.strerror}") from None
