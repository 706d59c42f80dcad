"""Bad input at the HTTP edge: every error the aggregator's servers send is JSON with its
status (the router's, the body reader's, the HTTP parser's, a bug's), and registering an
image turns whatever the filesystem says into a 4xx that leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from aggregator.api.http import JsonErrorRunner, json_errors
from aggregator.errors import Refused
from aggregator.workloads import images
from tests.conftest import Api


def _error(answer: Any) -> tuple[str, str]:
    assert isinstance(answer, dict), answer
    return answer["error"]["code"], answer["error"]["message"]


# --- registering a file of the aggregator's host -------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    return data, data / "images"


def _left_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(("path", "code", "status"), [
    ("/etc/hostname\0.raw", "invalid_path", 400),  # Path.resolve: ValueError
    ("relative/image.raw", "invalid_path", 400),
    ("/nonexistent/image.raw", "invalid_path", 400),
    ("/proc/self/mem", "unreadable", 422),  # reading offset 0 is EIO
    ("/dev/null", "invalid_path", 400),  # not a regular file
    ("/proc", "invalid_path", 400),
])
def test_every_filesystem_refusal_is_a_4xx(dirs: tuple[Path, Path], path: str, code: str,
                                           status: int) -> None:
    data, store = dirs
    with pytest.raises(Refused) as info:
        images.take_file(path, data, store)
    assert (info.value.code, info.value.status) == (code, status)
    assert _left_in(store) == []


def test_a_fifo_is_refused_without_waiting_for_a_writer(dirs: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.raw"
    os.mkfifo(fifo)
    data, store = dirs
    with pytest.raises(Refused) as info:
        images.take_file(str(fifo), data, store)
    assert info.value.code == "invalid_path"
    assert "not a regular file" in str(info.value)


def test_bytes_are_counted_while_copying_whatever_the_size_says(dirs: tuple[Path, Path]
                                                                ) -> None:
    """procfs files say they are empty; the limit holds on what is read."""
    data, store = dirs
    assert os.stat("/proc/self/maps").st_size == 0
    with pytest.raises(Refused) as info:
        images.take_file("/proc/self/maps", data, store, limit=64)
    assert (info.value.code, info.value.status) == ("too_large", 413)
    assert _left_in(store) == []
    sha256, size, path = images.take_file("/proc/self/maps", data, store, limit=1 << 20)
    assert size == path.stat().st_size > 64
    assert _left_in(store) == [sha256]


async def test_an_upload_stops_at_the_limit(dirs: tuple[Path, Path]) -> None:
    _, store = dirs

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 100

    with pytest.raises(Refused) as info:
        await images.store_stream(chunks(), store, limit=999)
    assert info.value.status == 413
    assert _left_in(store) == []
    _, size, _ = await images.store_stream(chunks(), store, limit=1000)
    assert size == 1000


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/etc/hostname\0.raw", 400, "invalid_path"),
    ("/proc/self/mem", 422, "unreadable"),
    ("/proc/self/status/x", 400, "invalid_path"),
])
async def test_the_api_answers_image_paths_with_4xx(api: Api, path: str, status: int,
                                                    code: str) -> None:
    got, answer = await api.call("POST", "/api/v1/images", api.tokens["admin"],
                                 {"name": "h", "path": path, "format": "raw"})
    assert (got, _error(answer)[0]) == (status, code)


# --- JSON errors, whoever finds them ---------------------------------------------------------


async def test_an_oversized_header_is_a_json_error(api: Api) -> None:
    resp = await api.client.get("/api/v1/nodes",
                                headers={"Authorization": "Bearer " + "x" * 10_000})
    assert resp.status in (400, 431)
    assert resp.content_type == "application/json"
    code, message = _error(await resp.json())
    assert code in ("bad_request", "request_header_fields_too_large")
    assert "8190" in message


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/api/v1/nothing-here", 404, "not_found"),
    ("PUT", "/api/v1/nodes", 405, "method_not_allowed"),
    ("DELETE", "/healthz", 405, "method_not_allowed"),
])
async def test_the_routers_errors_are_json(api: Api, method: str, path: str, status: int,
                                           code: str) -> None:
    resp = await api.client.request(method, path)
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert _error(await resp.json())[0] == code
    if status == 405:
        assert "GET" in resp.headers["Allow"]


async def test_a_body_past_the_limit_is_a_json_413(api: Api) -> None:
    resp = await api.client.post(
        "/api/v1/placement/dry-run", data=io.BytesIO(b"[" * (2 << 20)),
        headers={"Authorization": f"Bearer {api.tokens['admin']}",
                 "Content-Type": "application/json"})
    assert resp.status == 413
    assert resp.content_type == "application/json"
    assert _error(await resp.json())[0] == "too_large"


def _raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain port
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
])
async def test_what_the_http_parser_refuses_is_a_json_error(api: Api,
                                                            request_bytes: bytes) -> None:
    port = api.client.server.port
    assert port is not None
    raw = await asyncio.to_thread(_raw_exchange, port, request_bytes)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0]
    assert status_line.split()[1] in (b"400", b"413", b"414", b"431"), raw[:300]
    assert b"Content-Type: application/json" in head, raw[:300]
    assert b'"error": {"code": ' in body, raw[:300]


async def test_a_bug_is_a_json_500_and_logged() -> None:
    async def broken(request: web.Request) -> web.Response:
        raise ZeroDivisionError("a bug")

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/broken", broken)
    runner = JsonErrorRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        raw = await asyncio.to_thread(
            _raw_exchange, port, b"GET /broken HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await runner.cleanup()
    assert raw.startswith(b"HTTP/1.1 500")
    assert b"application/json" in raw
    assert b'"internal_error"' in raw
    assert b"ZeroDivisionError" not in raw  # the traceback goes to the log, not the client
