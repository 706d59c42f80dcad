"""The aggregator's HTTP servers (the API and the image service) answer every error as JSON
``{"error": {"code", "message"}}`` with its status, whoever found it:

- a handler (its own errors, rendered by the API's middleware);
- aiohttp's router and body reader (404, 405, 413: ``HTTPException`` s, rendered by
  :func:`json_errors`);
- a bug in a handler (500, rendered by :func:`json_errors`, the traceback logged);
- aiohttp's HTTP parser, before any application code runs (a request line or header over
  its limit, a malformed request: rendered by :class:`JsonErrorRunner`'s protocol).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger("virt8ra.aggregator.http")

# Headers of an aiohttp HTTPException worth keeping on the JSON answer.
_KEPT_HEADERS = ("Allow",)


def error(status: int, code: str, message: str, **detail: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **detail}},
                             status=status)


def status_code(status: int) -> str:
    """``not_found`` for 404: the error code of a status nothing more specific names."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """The router's and aiohttp's own errors, and our bugs, as JSON."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        out = error(exc.status, status_code(exc.status), exc.text or exc.reason)
        for name in _KEPT_HEADERS:
            if name in exc.headers:
                out.headers[name] = exc.headers[name]
        return out
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error(500, "internal_error", "the aggregator failed to answer this request;"
                     " its log has the details")


class _JsonErrorProtocol(RequestHandler):
    """aiohttp's connection handler, whose own error answers (a request it could not parse)
    are JSON like every other."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        phrase = HTTPStatus(status).phrase
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = phrase  # never a traceback
        else:  # the client's mistake: noted, without a traceback
            text = ((message or phrase).splitlines() or [phrase])[0][:500]
            log.info("refused a malformed request from %s: %d %s", request.remote, status,
                     text)
        if request.writer.output_size > 0:  # as aiohttp: too late for an answer
            raise ConnectionError("response is sent already, cannot send the error")
        out = error(status, status_code(status), text)
        out.force_close()
        return out


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections answer parse errors as JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # the same object, with our protocol factory
        return server
