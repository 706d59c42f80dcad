"""The broker as the running service sees it: Mosquitto it manages (its config written at
start, the process supervised, told to re-read the CRL) or one run by someone else (nothing to
start, nobody to tell)."""

from __future__ import annotations

import asyncio

from aggregator.config import BrokerConfig, Layout
from aggregator.fleet.broker import BrokerSupervisor, write_config


class ManagedBroker:
    """:meth:`run` (only when ``managed``) until ``stop``; :meth:`reload` after a new CRL."""

    def __init__(self, layout: Layout, config: BrokerConfig) -> None:
        self._layout = layout
        self._config = config
        self._supervisor: BrokerSupervisor | None = None

    @property
    def managed(self) -> bool:
        return self._config.managed

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts if self._supervisor is not None else 0

    async def run(self, stop: asyncio.Event) -> None:
        """Write the broker's config and keep it running until ``stop``."""
        conf = write_config(self._layout, self._config)
        self._supervisor = BrokerSupervisor(self._config.executable, conf)
        await self._supervisor.run(stop)

    def reload(self) -> bool:
        """Have the broker re-read its CRL (SIGHUP); False when it is not ours or not running."""
        return self._supervisor is not None and self._supervisor.reload()
