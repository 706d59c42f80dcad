"""A small client for the aggregator's REST API (used by the ``virt8ra`` CLI and the demo)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ApiClientError(Exception):
    """The API answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


DEFAULT_API = "http://127.0.0.1:8480"


class ApiClient:
    def __init__(self, base_url: str, token: str, timeout_s: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, str] | None = None, raw: bytes | None = None) -> Any:
        """A JSON ``body``, or ``raw`` bytes sent as application/octet-stream."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/octet-stream" if raw is not None
                           else "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
                raise ApiClientError(err["message"], exc.code, err["code"]) from None
            except (ValueError, KeyError, TypeError):
                raise ApiClientError(f"HTTP {exc.code}: {exc.reason}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiClientError(f"cannot reach the aggregator at {self.base_url}: {reason}")\
                from None

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)


def connect(api: str = "", token: str = "") -> ApiClient:
    """A client for ``api`` with ``token``; where either is empty, ``VIRT8RA_API`` or
    ``VIRT8RA_TOKEN`` (the API's default address on this host when neither is set)."""
    token = token or os.environ.get("VIRT8RA_TOKEN", "")
    if not token:
        raise ApiClientError("no API token: pass --token or set VIRT8RA_TOKEN")
    return ApiClient(api or os.environ.get("VIRT8RA_API", DEFAULT_API), token)
