"""The fleet's images: registered from a file on the aggregator or uploaded, kept by digest in
the data directory, and served to nodes over HTTPS that requires a node certificate from the
fleet CA (not revoked: the CRL is checked), whatever the operators' API listens on. Their
records are read and written through :mod:`aggregator.store.images`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import struct
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

from aggregator.errors import Refused
from aggregator.store import images as repo
from aggregator.store.tx import Tx

IMAGE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMATS: Final = ("raw", "qcow2", "kernel", "initrd")
MAX_IMAGE_BYTES: Final = 64 << 30


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name):
        raise Refused("invalid_name", "image name: letters, digits, . _ - (at most 128)")
    return name


def check_format(fmt: Any) -> str:
    if fmt not in FORMATS:
        raise Refused("invalid_format", f"format must be one of {', '.join(FORMATS)}")
    return str(fmt)


def sniff_format(path: Path) -> str:
    """``qcow2`` or ``raw``; refuses a qcow2 image with a backing file (a guest could read
    whatever file it names on the node)."""
    with path.open("rb") as fh:
        header = fh.read(20)
    if header[:4] != b"QFI\xfb":
        return "raw"
    if len(header) < 20 or struct.unpack(">Q", header[8:16])[0] != 0:
        raise Refused("backing_file", "qcow2 images with a backing file are refused: flatten"
                      " it first (qemu-img convert -O qcow2 IN OUT)")
    return "qcow2"


def take_file(source: str, data_dir: Path, directory: Path,
              limit: int = MAX_IMAGE_BYTES) -> tuple[str, int, Path]:
    """Copy a file of the aggregator host into ``directory`` under its sha256;
    ``(sha256, size, path)``. Blocking: run it in a thread.

    The one place a file on the host becomes an image: whatever the filesystem says on the
    way (no such file, a NUL byte in the path, a read error, not a regular file, past the
    limit) is a :class:`Refused`, and nothing is left behind."""
    try:
        return _copy_in(_check_source(Path(source), data_dir), directory, limit)
    except Refused:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise Refused("unreadable", f"{source!r} cannot be read: {reason}", 422) from None


def _check_source(source: Path, data_dir: Path) -> Path:
    """Never a file inside the data directory (its keys, database, other images)."""
    if "\0" in str(source):
        raise Refused("invalid_path", "the path contains a NUL character")
    if not source.is_absolute():  # relative to what? not to the aggregator's own directory
        raise Refused("invalid_path", "the path must be absolute")
    try:
        resolved = source.resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused("invalid_path", f"{str(source)!r} is not a file on the aggregator") from None
    if resolved.is_relative_to(data_dir.resolve()):
        raise Refused("invalid_path", "files inside the aggregator's data directory cannot be"
                      " images", 403)
    return resolved


def _copy_in(source: Path, directory: Path, limit: int) -> tuple[str, int, Path]:
    # O_NONBLOCK: a FIFO opens without waiting for a writer, and is then refused below.
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)  # of what was opened, not of a name that may change meanwhile
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused("invalid_path", f"{str(source)!r} is not a regular file")
    with os.fdopen(fd, "rb") as src:
        if st.st_size > limit:
            raise Refused("too_large", f"images are limited to {limit} bytes", 413)
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp_fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upload-")
        try:
            size = 0
            with os.fdopen(tmp_fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > limit:  # the size it claimed was not the size it has
                        raise Refused("too_large", f"images are limited to {limit} bytes", 413)
                    digest.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise Refused("empty", f"{str(source)!r} is empty")
            return _keep(Path(tmp), digest.hexdigest(), directory)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


async def store_stream(chunks: AsyncIterator[bytes], directory: Path,
                       limit: int = MAX_IMAGE_BYTES) -> tuple[str, int, Path]:
    """An upload streamed into ``directory`` under its sha256 (file work in a thread),
    counted as it comes: past ``limit`` it is refused and nothing is kept."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=directory, prefix=".upload-")
    tmp = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise Refused("too_large", f"images are limited to {limit} bytes", 413)
                digest.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        if size == 0:
            raise Refused("empty", "the upload is empty")
        return await asyncio.to_thread(_keep, tmp, digest.hexdigest(), directory)
    except BaseException:
        await asyncio.to_thread(tmp.unlink, missing_ok=True)
        raise


def _keep(tmp: Path, sha256: str, directory: Path) -> tuple[str, int, Path]:
    final = directory / sha256
    size = tmp.stat().st_size
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    return sha256, size, final


def register(conn: Tx, name: str, fmt: str, sha256: str, size: int,
             path: Path, now: float) -> dict[str, Any]:
    existing = repo.find_image(conn, name)
    if existing is not None and existing.sha256 != sha256:
        raise Refused("name_taken", f"an image {name!r} with other content exists: images are"
                      " immutable, pick a new name", 409)
    repo.add_image(conn, repo.Image(name, fmt, size, sha256, str(path), now))
    return {"name": name, "format": fmt, "size": size, "sha256": sha256}


def list_images(conn: Tx) -> list[dict[str, Any]]:
    return [{"name": i.name, "format": i.format, "size": i.size, "sha256": i.sha256,
             "created_at": i.created_at} for i in repo.images(conn)]


def path_of(conn: Tx, name: str) -> Path | None:
    image = repo.find_image(conn, name)
    return None if image is None else Path(image.path)
