"""The images' repository on a real SQLite file."""

from __future__ import annotations

from aggregator.store import images as repo
from aggregator.store.tx import Tx


def test_images_are_added_once_found_and_listed_by_name(tx: Tx) -> None:
    cirros = repo.Image("cirros", "qcow2", 100, "ab" * 32, "/data/images/ab", 1.0)
    alpine = repo.Image("alpine", "raw", 200, "cd" * 32, "/data/images/cd", 2.0)
    assert repo.find_image(tx, "cirros") is None
    repo.add_image(tx, cirros)
    repo.add_image(tx, alpine)
    repo.add_image(tx, repo.Image("cirros", "raw", 1, "ef" * 32, "/elsewhere", 3.0))  # ignored
    assert repo.find_image(tx, "cirros") == cirros
    assert repo.images(tx) == [alpine, cirros]
