"""Whether a guest fits another host, on libvirt 9.0 / QEMU 7.2's own XML (Debian 12): the
capabilities and domain capabilities of a host running guests without KVM, and the live XML
of a guest virt8ra made there (``tests/data``, captured from the two-host rig)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.host.compat import GuestNeeds, HostOffers, guest_needs, host_offers, misfits
from agent.host.hypervisor import Hypervisor

DATA = Path(__file__).parents[2] / "data"


@pytest.fixture(scope="module")
def here() -> HostOffers:
    return host_offers((DATA / "capabilities-qemu-7.2.xml").read_text(),
                       (DATA / "domcapabilities-qemu-7.2.xml").read_text(), "qemu")


@pytest.fixture(scope="module")
def guest() -> GuestNeeds:
    return guest_needs((DATA / "guest-live.xml").read_text())


def test_a_host_offers_its_arch_its_machine_types_and_the_cpu_models_it_can_run(
        here: HostOffers) -> None:
    assert here.arch == "x86_64"
    assert here.machines is not None
    assert {"pc", "pc-i440fx-7.2", "q35", "pc-q35-7.2", "pc-i440fx-2.12"} <= here.machines
    assert here.cpu_models is not None
    assert {"qemu64", "kvm64", "Nehalem"} <= here.cpu_models
    assert "Skylake-Server" not in here.cpu_models  # usable='no' without KVM


def test_a_guest_needs_its_arch_machine_and_cpu_model(guest: GuestNeeds) -> None:
    assert guest == GuestNeeds("x86_64", "pc-i440fx-7.2", "custom", "qemu64")


def test_a_guest_fits_a_host_like_its_own(guest: GuestNeeds, here: HostOffers) -> None:
    assert misfits(guest, here) == []


def test_another_architecture_does_not_fit(guest: GuestNeeds, here: HostOffers) -> None:
    arm = HostOffers("aarch64", frozenset({"virt", "virt-7.2"}), frozenset({"cortex-a57"}))
    assert misfits(guest, arm) == ["the guest is x86_64, the destination runs aarch64 guests"]


def test_an_older_qemu_without_the_machine_type_does_not_fit(
        guest: GuestNeeds, here: HostOffers) -> None:
    assert here.machines is not None
    older = HostOffers("x86_64", frozenset(m for m in here.machines if "7." not in m),
                       here.cpu_models)
    assert misfits(guest, older) == ["the destination's QEMU has no machine type pc-i440fx-7.2"]


def test_a_cpu_model_the_destination_cannot_run_does_not_fit(here: HostOffers) -> None:
    skylake = GuestNeeds("x86_64", "pc-i440fx-7.2", "custom", "Skylake-Server")
    assert misfits(skylake, here) == [
        "the destination cannot run the guest's CPU model Skylake-Server"]
    passthrough = GuestNeeds("x86_64", "pc-i440fx-7.2", "host-passthrough", "")
    assert "the host's own (host-passthrough)" in misfits(passthrough, here)[0]


async def test_what_a_host_does_not_tell_is_not_held_against_the_guest(
        guest: GuestNeeds) -> None:
    hv = await Hypervisor.open("test:///default")  # no domain capabilities, no machine types
    try:
        offers = await hv.host_offers("test")
    finally:
        hv.close()
    assert (offers.arch, offers.machines, offers.cpu_models) == ("i686", None, None)
    assert misfits(GuestNeeds("i686", "", "", ""), offers) == []
    assert misfits(guest, offers) == ["the guest is x86_64, the destination runs i686 guests"]


def test_offers_travel_as_plain_order_parameters(here: HostOffers) -> None:
    params = {f"dest_{k}": v for k, v in here.as_result().items()}
    assert HostOffers.from_params(params) == here
    unknown = HostOffers("i686", None, None)
    assert HostOffers.from_params(
        {f"dest_{k}": v for k, v in unknown.as_result().items()}) == unknown
    assert HostOffers.from_params({"address": "10.0.0.1"}) is None  # an older aggregator

