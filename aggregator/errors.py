"""A request the aggregator will not grant: an API error code, a message, an HTTP status, and
optionally details (e.g. the reasons every node was ruled out)."""

from __future__ import annotations

from typing import Any


class Refused(Exception):
    def __init__(self, code: str, message: str, status: int = 400,
                 detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.detail = detail or {}
