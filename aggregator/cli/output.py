"""What the operators' CLI prints besides plain lines: tables whose identifiers are never cut,
times in ISO 8601 UTC, JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

# Columns that hold identifiers: never cut, whatever the terminal's width.
_ID_COLUMNS = frozenset({"node", "id", "name", "vm_name", "vm", "source", "dest", "uuid",
                         "sha256", "site", "order"})


def table(columns: list[str], rows: list[list[str]], **options: Any) -> Table:
    """A table whose identifier columns are never cut: the other columns wrap to make room."""
    out = Table(**options)
    for col in columns:
        if col in _ID_COLUMNS:
            width = max([len(col), *(len(r[columns.index(col)]) for r in rows)])
            out.add_column(col, no_wrap=True, min_width=width)
        else:
            out.add_column(col, overflow="fold")
    for row in rows:
        out.add_row(*row)
    return out


def print_rows(console: Console, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """API objects as a table of ``columns``; their times (``*_at``, ``ts``) in ISO 8601."""
    cells = []
    for row in rows:
        line = []
        for col in columns:
            value = row.get(col)
            if col.endswith("_at") or col == "ts":
                value = iso_time(value)
            line.append("" if value is None else str(value))
        cells.append(line)
    console.print(table(columns, cells))


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def iso_time(ts: Any) -> str:
    """ISO 8601 UTC of unix seconds (``2026-12-04T17:40:00Z``); ``""`` for none."""
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def iso_times(value: Any, key: str = "") -> Any:
    """JSON with its times (``*_at``, ``ts``, ``from``, ``until``) in ISO 8601 UTC."""
    if isinstance(value, dict):
        return {k: iso_times(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [iso_times(v, key) for v in value]
    if key.endswith("_at") or key in ("ts", "from", "until", "time"):
        return iso_time(value) or value
    return value


def ago(ts: Any) -> str:
    """How long ago unix seconds ``ts`` was (``42s ago``, ``7m ago``); ``never`` for none."""
    if not isinstance(ts, int | float):
        return "never"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"
