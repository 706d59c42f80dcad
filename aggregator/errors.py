"""A request the aggregator will not grant: an API error code, a message, an HTTP status, and
optionally details (e.g. the reasons every node was ruled out)."""

from __future__ import annotations

from typing import Any, TypeVar

from plumbing.shapes import ShapeError, parse

T = TypeVar("T")


class Refused(Exception):
    def __init__(self, code: str, message: str, status: int = 400,
                 detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.detail = detail or {}


def body_of(shape: type[T], body: Any) -> T:
    """A request body read as its shape (:mod:`plumbing.shapes`); Refused (400, the shape's
    code or ``invalid_request``) naming the field otherwise."""
    try:
        return parse(shape, body)
    except ShapeError as exc:
        raise Refused(exc.code or "invalid_request", str(exc)) from None
