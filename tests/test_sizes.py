"""Sizes that keep the code readable (STYLE.md): no module over 600 lines, no class over 300,
no function over 60. Schema definitions (the store's migrations) are tables, not logic, and are
exempt."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("contract", "plumbing", "agent", "aggregator", "demo")
LIMITS = {"module": 600, "class": 300, "function": 60}
EXEMPT = {"aggregator/store/schema.py"}  # one function per migration: DDL, not logic
SOURCES = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def sizes(path: str) -> list[tuple[str, str, int]]:
    """``(kind, name, lines)`` of the module and of every class and function in it."""
    text = (ROOT / path).read_text()
    out = [("module", path, text.count("\n"))]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            out.append(("class", node.name, node.end_lineno - node.lineno + 1))  # type: ignore[operator]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.append(("function", node.name, node.end_lineno - node.lineno + 1))  # type: ignore[operator]
    return out


@pytest.mark.parametrize("path", [p for p in SOURCES if p not in EXEMPT])
def test_sizes_stay_within_the_limits(path: str) -> None:
    over = [f"{kind} {name}: {n} lines (limit {LIMITS[kind]})"
            for kind, name, n in sizes(path) if n > LIMITS[kind]]
    assert not over, f"{path}: " + "; ".join(over)
