"""A fleet database on a real SQLite file (migrated) for the repositories' tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.store.tx import Tx
from aggregator.store.writer import open_tx


@pytest.fixture
def tx(tmp_path: Path) -> Iterator[Tx]:
    db = open_tx(tmp_path / "fleet.sqlite")
    yield db
    db.close()
