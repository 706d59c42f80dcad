"""Shutdown with a deadline, against a fake guest (the test driver's guests obey at once; a
real one that ignores the button is in test_qemu_vm.py)."""

from __future__ import annotations

import time

import pytest

from agent.host.errors import HypervisorError
from agent.host.lifecycle import SHUTDOWN_POLL_S, is_off, shut_down


class FakeGuest:
    """A guest that powers off ``polls_to_off`` looks after the button (None: never), or
    whose button fails with ``refuse``; it records what was asked of it."""

    def __init__(self, *, running: bool = True, polls_to_off: int | None = 0,
                 refuse: HypervisorError | None = None, off_on_refusal: bool = False) -> None:
        self.current: str | None = "running" if running else "shut off"
        self.polls_to_off = polls_to_off
        self.refuse = refuse
        self.off_on_refusal = off_on_refusal
        self.calls: list[str] = []
        self.pressed = False  # the button, pressed without a refusal

    async def state(self) -> str | None:
        self.calls.append("state")
        if self.pressed and self.polls_to_off is not None:
            if self.polls_to_off == 0:
                self.current = "shut off"
            self.polls_to_off -= 1
        return self.current

    async def request_shutdown(self) -> None:
        self.calls.append("request_shutdown")
        if self.refuse is not None:
            if self.off_on_refusal:
                self.current = None  # it went (and was undefined) meanwhile
            raise self.refuse
        self.pressed = True

    async def destroy(self) -> None:
        self.calls.append("destroy")
        self.current = "shut off"


def test_off_means_shut_off_or_gone() -> None:
    assert is_off(None)
    assert is_off("shut off")
    assert not is_off("running")
    assert not is_off("paused")


async def test_a_guest_that_powers_off_is_not_destroyed() -> None:
    guest = FakeGuest(polls_to_off=2)
    assert await shut_down(guest, timeout_s=5) is True
    assert guest.calls == ["state", "request_shutdown", "state", "state", "state"]


async def test_a_guest_already_off_is_left_alone() -> None:
    guest = FakeGuest(running=False)
    assert await shut_down(guest, timeout_s=5) is True
    assert guest.calls == ["state"]


async def test_a_guest_ignoring_the_button_is_destroyed_after_the_timeout() -> None:
    guest = FakeGuest(polls_to_off=None)
    started = time.monotonic()
    assert await shut_down(guest, timeout_s=0.35) is False
    assert 0.35 <= time.monotonic() - started < 0.35 + 5 * SHUTDOWN_POLL_S
    assert guest.calls[-1] == "destroy"
    assert guest.calls.count("destroy") == 1
    assert guest.current == "shut off"


async def test_a_guest_that_stopped_before_the_request_counts_as_powered_off() -> None:
    guest = FakeGuest(refuse=HypervisorError("domain is not running", 55),
                      off_on_refusal=True)
    assert await shut_down(guest, timeout_s=5) is True
    assert guest.calls == ["state", "request_shutdown", "state"]


async def test_a_refused_request_for_a_running_guest_is_raised() -> None:
    refusal = HypervisorError("guest agent is not responding", 86)
    guest = FakeGuest(refuse=refusal)
    with pytest.raises(HypervisorError) as info:
        await shut_down(guest, timeout_s=5)
    assert info.value is refusal
    assert "destroy" not in guest.calls
