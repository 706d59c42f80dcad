"""The fleet's images as stored: one row per name, with the file it is kept in. Reads and
writes only; :mod:`aggregator.workloads.images` decides (names, formats, immutability)."""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.store.tx import Tx

_COLUMNS = "name, format, size, sha256, path, created_at"


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    format: str  # raw, qcow2, kernel, initrd
    size: int  # bytes
    sha256: str
    path: str  # the file on the aggregator
    created_at: float


def find_image(tx: Tx, name: str) -> Image | None:
    row = tx.execute(f"SELECT {_COLUMNS} FROM images WHERE name = ?", (name,)).fetchone()
    return None if row is None else Image(*row)


def add_image(tx: Tx, image: Image) -> None:
    """Store ``image``, unless an image of that name is stored already."""
    tx.execute(f"INSERT OR IGNORE INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
               (image.name, image.format, image.size, image.sha256, image.path,
                image.created_at))


def images(tx: Tx) -> list[Image]:
    """Every image, by name."""
    return [Image(*row) for row in tx.execute(f"SELECT {_COLUMNS} FROM images ORDER BY name")]
