"""A guest's lifecycle beyond single libvirt calls: the actions ``change_state`` takes, and a
shutdown that waits for the guest to power off and stops it hard past a deadline. It drives a
:class:`Guest` (``hypervisor.py`` gives it one guest of its connection; tests a fake)."""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from agent.host.errors import HypervisorError

SHUTDOWN_POLL_S: Final = 0.1  # how often shutdown() looks whether the guest is off

# change_state's actions, and libvirt's virDomain method for each.
ACTIONS: Final = {"start": "create", "suspend": "suspend", "resume": "resume",
                  "shutdown": "shutdown", "destroy": "destroy"}


class Guest(Protocol):
    """One guest, as :func:`shut_down` drives it; each call may raise :class:`HypervisorError`."""

    async def state(self) -> str | None:
        """Its state as lifecycle events name it; None if there is no such guest."""

    async def request_shutdown(self) -> None:
        """Ask it to power off (ACPI power button, or its guest agent)."""

    async def destroy(self) -> None:
        """Stop it hard (one that is not running is fine)."""


def is_off(state: str | None) -> bool:
    """Whether a guest in ``state`` (None: there is none) is powered off."""
    return state in (None, "shut off")


async def shut_down(guest: Guest, timeout_s: float) -> bool:
    """Ask ``guest`` to power off, wait up to ``timeout_s``, then stop it hard. True if it
    powered off by itself (or was not running), False if it had to be destroyed."""
    if is_off(await guest.state()):
        return True
    try:
        await guest.request_shutdown()
    except HypervisorError:
        if is_off(await guest.state()):
            return True  # it stopped between our look and our request
        raise
    try:
        async with asyncio.timeout(timeout_s):
            while True:  # polled: lifecycle events are the daemon's, not ours to take
                if is_off(await guest.state()):
                    return True
                await asyncio.sleep(SHUTDOWN_POLL_S)
    except TimeoutError:
        pass
    await guest.destroy()
    return False
