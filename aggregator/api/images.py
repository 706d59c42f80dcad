"""The image service nodes fetch from: images by name, and the CRL (for the nodes' libvirt
daemons, which check migration peers against it), over HTTPS that requires a fleet certificate
the CRL does not name. Not part of the REST API: nodes show certificates, not API tokens."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from aggregator.api.http import JsonErrorRunner, error, json_errors
from aggregator.store.writer import Store
from aggregator.workloads import images
from plumbing.tls import TlsContext

log = logging.getLogger("virt8ra.aggregator.images")


class ImageService:
    """:meth:`run` until ``stop``, on ``host:port`` with ``tls`` (which checks the clients)."""

    def __init__(self, store: Store, *, crl_file: Path, host: str, port: int,
                 tls: TlsContext) -> None:
        self._store = store
        self._crl_file = crl_file
        self._host = host
        self._port = port
        self._tls = tls

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors])
        app.router.add_get("/images/{name}", self._image)
        app.router.add_get("/crl", self._crl)
        return app

    async def run(self, stop: asyncio.Event) -> None:
        runner = JsonErrorRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._tls)
        await site.start()
        log.info("image service on https://%s:%d", self._host, self._port)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    async def _image(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = await self._store.read(lambda c: images.path_of(c, name))
        if path is None:
            return error(404, "not_found", f"no image {name!r}")
        return web.FileResponse(path)

    async def _crl(self, request: web.Request) -> web.StreamResponse:
        # The fleet's revocations, for the nodes' libvirt daemons (migration over TLS).
        return web.FileResponse(self._crl_file,
                                headers={"Content-Type": "application/x-pem-file"})
