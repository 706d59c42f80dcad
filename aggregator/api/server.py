"""Serving the REST API: the route table's app on its address, JSON errors even for requests
aiohttp cannot parse, systemd told when it is ready and when it stops."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from aggregator.api.common import Services
from aggregator.api.http import JsonErrorRunner
from aggregator.api.routes import make_app
from plumbing import sdnotify
from plumbing.tls import TlsContext

log = logging.getLogger("virt8ra.aggregator")

_LISTENING_WAIT_S = 30.0


class ApiServer:
    """:meth:`run` until ``stop``, on ``host:port``; HTTPS when given ``tls``."""

    def __init__(self, services: Services, *, host: str, port: int,
                 tls: TlsContext | None) -> None:
        self._services = services
        self._host = host
        self._port = port
        self._tls = tls

    async def run(self, stop: asyncio.Event, listening: asyncio.Event) -> None:
        """Serve once ``listening`` is set (ingest's session is open), or after 30 s anyway:
        from then on the broker queues nodes' messages for us even while we are away, so a
        node that enrolls and publishes at once loses nothing."""
        runner = JsonErrorRunner(make_app(self._services), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._tls)
        try:
            await asyncio.wait_for(listening.wait(), timeout=_LISTENING_WAIT_S)
        except TimeoutError:
            log.error("ingest is not connected to the broker yet; serving the API anyway")
        if stop.is_set():
            await runner.cleanup()
            return
        try:
            await site.start()
            log.info("API on %s://%s:%d", "https" if self._tls else "http", self._host,
                     self._port)
            sdnotify.notify("READY=1")
            await stop.wait()
        finally:
            sdnotify.notify("STOPPING=1")
            await runner.cleanup()
