"""``virt8ra-agent check``: host facts against hardware profiles, on simulated libvirt hosts."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import cli
from agent.host import hostcheck, simhost
from agent.identity.enroll import MAX_CLOCK_SKEW_S, EnrollError, check_clock, clock_skew_s
from contract.profiles import (
    HostFacts,
    Profile,
    Requirements,
    default_profiles_dir,
    load_profile,
    profile_failures,
)
from plumbing.configfile import ConfigError

TOWER = default_profiles_dir() / "tower-5g.toml"


async def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


@pytest.mark.parametrize("name", ["tower-5g", "edge-server", "rack-server"])
async def test_a_simulated_host_passes_its_own_profile(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await _run(["check", "--simulate", name, "--json"], capsys)
    report = json.loads(out)
    assert code == 0, out
    assert report["ok"] is True
    assert report["profile"] == name
    statuses = _statuses(report)
    assert list(statuses) == ["libvirt", "cpus", "memory", "cpu_flags", "disks", "nics", "clock"]
    assert {statuses[n] for n in statuses if n != "clock"} == {"pass"}
    for c in report["checks"]:
        assert set(c) == {"name", "status", "found", "required", "source", "hint"}
        assert c["source"]
    flags = next(c for c in report["checks"] if c["name"] == "cpu_flags")
    assert "declared in [simulation]" in flags["source"]  # says where the value came from


async def test_the_readable_checklist(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await _run(["check", "--profile", "tower-5g", "--simulate", "tower-5g"],
                              capsys)
    assert code == 0
    assert "✓ memory" in out
    assert "found 16384 MiB; required at least 16384 MiB  [libvirt getInfo()]" in out
    assert out.rstrip().endswith("result: OK, the host meets the profile")


def _small_profile(directory: Path, name: str, **sim: Any) -> None:
    """A profile that requires little, with a simulation of ``sim`` (TOML literals)."""
    values = {"sockets": 1, "cores": 4, "threads": 1, "memory_mib": 16384,
              "cpu_flags": '["vmx"]', "disks_gib": "[256]", "nics": 2, **sim}
    (directory / f"{name}.toml").write_text(
        f'name = "{name}"\ndescription = "too small for a tower"\n'
        "[requires]\ncpu_cores = 1\nmemory_mib = 1024\ncpu_flags_any = []\nnics = 0\n"
        "[simulation]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
    )


@pytest.mark.parametrize(
    ("sim", "failing"),
    [
        ({"cores": 2}, {"cpus"}),
        ({"memory_mib": 8192}, {"memory"}),
        ({"cpu_flags": "[]"}, {"cpu_flags"}),
        ({"cpu_flags": '["aes", "avx2"]'}, {"cpu_flags"}),
        ({"disks_gib": "[128, 64]"}, {"disks"}),
        ({"nics": 1}, {"nics"}),
        ({"cores": 1, "memory_mib": 2048, "cpu_flags": "[]", "disks_gib": "[]", "nics": 0},
         {"cpus", "memory", "cpu_flags", "disks", "nics"}),
    ],
)
async def test_a_smaller_host_fails_the_right_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sim: dict[str, Any],
    failing: set[str],
) -> None:
    shutil.copy(TOWER, tmp_path / "tower-5g.toml")
    _small_profile(tmp_path, "small-box", **sim)
    code, out, _ = await _run(["check", "--profiles-dir", str(tmp_path), "--profile",
                               "tower-5g", "--simulate", "small-box", "--json"], capsys)
    report = json.loads(out)
    assert code == 1
    assert report["ok"] is False
    assert {n for n, s in _statuses(report).items() if s == "fail"} == failing
    for c in report["checks"]:
        assert bool(c["hint"]) == (c["status"] in ("fail", "warn")), c
    # The readable form says the same, and the verdict.
    code, out, _ = await _run(["check", "--profiles-dir", str(tmp_path), "--profile",
                               "tower-5g", "--simulate", "small-box"], capsys)
    assert code == 1
    for name in failing:
        assert f"✗ {name}" in out
    assert f"FAILED, {len(failing)} requirement" in out


async def test_an_unknown_profile_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await _run(["check", "--profile", "tower-6g"], capsys)
    assert code == 2
    assert out == ""
    assert "unknown profile 'tower-6g'" in err
    assert "edge-server, lab-host, rack-server, tower-5g" in err
    code, _, err = await _run(["check", "--profile", "../etc/passwd"], capsys)
    assert code == 2
    code, _, err = await _run(["check", "--simulate", "no-such-box"], capsys)
    assert code == 2


async def test_unreachable_libvirt_fails_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "test://" + str(tmp_path / "absent.xml")
    code, out, _ = await _run(["check", "--profile", "tower-5g", "--libvirt-uri", uri,
                               "--json"], capsys)
    report = json.loads(out)
    assert code == 1
    libvirt_line = report["checks"][0]
    assert (libvirt_line["name"], libvirt_line["status"]) == ("libvirt", "fail")
    assert "cannot connect" in libvirt_line["found"]
    assert "libvirtd running" in libvirt_line["hint"]
    statuses = _statuses(report)
    # Everything that needed libvirt is not checked; nothing is passed or failed unseen.
    assert [statuses[n] for n in ("cpus", "memory", "cpu_flags", "disks", "nics")] == (
        ["skip"] * 5)


def test_every_profile_loads_and_its_simulation_meets_it() -> None:
    files = sorted(default_profiles_dir().glob("*.toml"))
    assert len(files) >= 3
    for path in files:
        profile = load_profile(path)
        assert profile_failures(profile, profile.simulation.facts()) == [], path


async def test_the_simulation_reads_back_through_libvirt(
    profiles: dict[str, Profile], tmp_path: Path
) -> None:
    """What the check reads through libvirt is what the profile's simulation declares."""
    for name, profile in profiles.items():
        uri = simhost.write_host(profile, "n1", tmp_path / f"{name}.xml")
        observation = await hostcheck.observe(hostcheck.Target(uri, simulation=profile))
        assert observation.facts() == profile.simulation.facts(), name


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("nics = 2\n", "nics = 1\n", "nics: 1 network interfaces"),
        ("disks_gib = [256]", "disks_gib = [200]", "disks: 200 GiB"),
        ('cpu_flags = ["vmx", "ept"', 'cpu_flags = ["ept"', "cpu_flags: none of vmx, svm"),
        ("disks_gib = [256]", "disks_gib = [0]", "at least 1 GiB"),
        ("disks_gib = [256]", 'disks_gib = ["256"]', "expected int"),
        ('cpu_flags = ["vmx", "ept"', 'cpu_flags = ["VT x", "ept"', "not CPU flags"),
    ],
)
def test_a_simulation_smaller_than_its_profile_does_not_load(
    tmp_path: Path, old: str, new: str, reason: str
) -> None:
    head, sep, tail = TOWER.read_text().rpartition(old)  # the last one is in [simulation]
    assert sep
    path = tmp_path / "tower-5g.toml"
    path.write_text(head + new + tail)
    with pytest.raises(ConfigError, match=reason):
        load_profile(path)


FACTS = HostFacts(cpus=4, memory_mib=16384, cpu_flags=("vmx", "aes"), disk_gib=256, nics=2)


@pytest.mark.parametrize(
    ("change", "reasons"),
    [
        ({}, []),
        ({"cpus": 64}, []),
        ({"cpu_flags": ("svm",)}, []),
        ({"cpus": 2}, ["cpus: 2 logical CPUs, the profile tower-5g requires 4"]),
        ({"memory_mib": 8192}, ["memory: 8192 MiB, the profile tower-5g requires 16384 MiB"]),
        ({"cpu_flags": ()}, ["cpu_flags: none of vmx, svm, the profile tower-5g requires at "
                             "least one (is virtualisation enabled in the firmware?)"]),
        ({"cpu_flags": ("aes", "avx2")}, ["cpu_flags: none of vmx, svm"]),
        ({"disk_gib": 255}, ["disks: 255 GiB, the profile tower-5g requires 256 GiB"]),
        ({"nics": 0}, ["nics: 0 network interfaces, the profile tower-5g requires 2"]),
        ({"cpus": 1, "memory_mib": 1, "cpu_flags": (), "disk_gib": 0, "nics": 0},
         ["cpus:", "memory:", "cpu_flags:", "disks:", "nics:"]),
    ],
)
def test_profile_failures(profiles: dict[str, Profile], change: dict[str, Any],
                          reasons: list[str]) -> None:
    facts = dataclasses.replace(FACTS, **change)
    failures = profile_failures(profiles["tower-5g"], facts)
    assert len(failures) == len(reasons)
    for failure, reason in zip(failures, reasons, strict=True):
        assert failure.startswith(reason)


def test_a_profile_that_requires_no_disks_accepts_none(profiles: dict[str, Profile]) -> None:
    relaxed = Profile(name="diskless", description="",
                      requires=Requirements(cpu_cores=4, memory_mib=16384, nics=2),
                      simulation=profiles["tower-5g"].simulation)
    assert profile_failures(relaxed, dataclasses.replace(FACTS, disk_gib=0)) == []


def test_host_facts_round_trip() -> None:
    plain = json.loads(json.dumps(FACTS.to_plain()))
    assert HostFacts.from_plain(plain) == FACTS
    assert HostFacts.from_plain({**plain, "future_key": [1, 2]}) == FACTS  # unknown keys ignored


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "expected an object"),
        ([], "expected an object"),
        ({}, "missing cpus, memory_mib, cpu_flags, disk_gib, nics"),
        ({"cpus": True}, "facts.cpus: expected an integer, got bool"),
        ({"cpus": 4.0}, "facts.cpus: expected an integer, got float"),
        ({"cpus": "4"}, "expected an integer"),
        ({"memory_mib": -1}, "facts.memory_mib: -1 is outside"),
        ({"disk_gib": 10**30}, "facts.disk_gib"),
        ({"nics": None}, "facts.nics"),
        ({"cpu_flags": "vmx"}, "facts.cpu_flags: expected a list"),
        ({"cpu_flags": {"vmx": 1}}, "facts.cpu_flags: expected a list"),
        ({"cpu_flags": [1]}, "is not a CPU flag"),
        ({"cpu_flags": ["VMX x"]}, "is not a CPU flag"),
        ({"cpu_flags": ["x" * 65]}, "is not a CPU flag"),
        ({"cpu_flags": [["vmx"]]}, "is not a CPU flag"),
        ({"cpu_flags": ["vmx"] * 100_000}, "more than 1024 flags"),
    ],
)
def test_malformed_facts_are_value_errors(data: Any, reason: str) -> None:
    if isinstance(data, dict) and data:
        data = {**FACTS.to_plain(), **data}
    with pytest.raises(ValueError, match=reason):
        HostFacts.from_plain(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=5),
    max_leaves=20,
)
FACT_KEYS = st.sampled_from(["cpus", "memory_mib", "cpu_flags", "disk_gib", "nics", "other"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON, st.dictionaries(FACT_KEYS, JSON | st.lists(st.text(max_size=8))),
                 st.fixed_dictionaries({k: JSON for k in ("cpus", "memory_mib", "cpu_flags",
                                                          "disk_gib", "nics")})))
def test_from_plain_raises_only_value_errors(data: Any) -> None:
    try:
        facts = HostFacts.from_plain(data)
    except ValueError:
        return
    assert HostFacts.from_plain(facts.to_plain()) == facts


@pytest.mark.parametrize(
    ("now", "synced", "status"),
    [
        (1_800_000_000.0, True, "pass"),
        (1_800_000_000.0, None, "pass"),
        (1_800_000_000.0, False, "warn"),
        (hostcheck.CLOCK_FLOOR - 1, True, "fail"),
        (0.0, False, "fail"),
    ],
)
def test_clock_check(now: float, synced: bool | None, status: str) -> None:
    check = hostcheck.clock_check(now, synced)
    assert check.status == status
    assert bool(check.hint) == (status != "pass")


def test_warnings_do_not_fail_the_report(profiles: dict[str, Profile]) -> None:
    profile = profiles["tower-5g"]
    facts = profile.simulation.facts()
    readings = {name: hostcheck.Reading(getattr(facts, name), "test")
                for name in ("cpus", "memory_mib", "cpu_flags", "disk_gib", "nics")}
    obs = hostcheck.Observation(uri="test:///x", libvirt="libvirt 9.0.0, TEST",
                                readings=readings, now=1_800_000_000.0, ntp_synchronised=False)
    report = hostcheck.evaluate(profile, obs)
    assert report.ok
    assert [c.status for c in report.checks] == ["pass"] * 6 + ["warn"]
    late = hostcheck.evaluate(profile, hostcheck.Observation(
        uri="test:///x", libvirt="libvirt 9.0.0, TEST", readings=readings, now=0.0))
    assert not late.ok
    assert [c.name for c in late.failures()] == ["clock"]


@pytest.mark.parametrize(
    ("aggregator", "sent", "received", "skew"),
    [
        (1000.0, 1000.0, 1000.0, 0.0),
        (1000.5, 1000.0, 1001.0, 0.0),  # inside the round trip: no skew to speak of
        (900.0, 1000.0, 1001.0, 100.0),  # this clock is ahead
        (1101.0, 1000.0, 1001.0, -100.0),  # this clock is behind
        (1000.0 - 61, 1000.0, 1000.0, 61.0),
    ],
)
def test_clock_skew(aggregator: float, sent: float, received: float, skew: float) -> None:
    assert clock_skew_s(aggregator, sent, received) == skew
    if abs(skew) > MAX_CLOCK_SKEW_S:
        with pytest.raises(EnrollError, match=rf"clock is off by {abs(skew):.0f} seconds"):
            check_clock(aggregator, sent, received)
    else:
        check_clock(aggregator, sent, received)
