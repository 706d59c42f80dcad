"""Does the host the agent will manage meet its hardware profile? ``virt8ra-agent check``.

The check runs against the libvirt host the agent is configured for, so a real host
(``qemu:///system``) and a simulated one (``test:///...xml`` made from a profile's
``[simulation]`` table) go through the same path. Reading is I/O at the edge
(:func:`observe`); judging is a pure function over plain data (:func:`evaluate`), using the
same per-requirement judges as the aggregator (:func:`contract.profiles.judge`).

Where each fact comes from (every line of the output names its source):

- **cpus, memory**: libvirt ``getInfo()``, for every host.
- **cpu_flags**: on a local host (a URI without a host part), ``/proc/cpuinfo`` (its ``flags``
  and ``vmx flags`` lines): libvirt's capabilities list only the features beyond the named CPU
  model, so ``aes`` or ``avx2`` would be missing. On a remote URI, libvirt's capabilities.
  libvirt's test driver reports only ``pae`` and ``nonpae``; a simulated host declares its
  flags in ``[simulation] cpu_flags`` and the line says they were declared, not measured.
- **disks**: on a local host, the whole disks in ``/sys/block`` (those with a ``device``: no
  loop, RAM, zram or device-mapper devices), summed. psutil only sees mounted file systems,
  which undercounts. On a test-driver host, the storage volumes libvirt lists (a simulated
  host has one volume per disk). On a remote URI they cannot be read: the check says so.
- **nics**: on a local host, the interfaces in ``/sys/class/net`` backed by a device
  (physical NICs and their virtual functions, not bridges, veths or ``lo``). On a test-driver
  or remote host, libvirt's active host interfaces.
- **libvirt**: connecting to the URI. If that fails, the line fails with libvirt's error and
  what to try, and the lines that needed libvirt are ``skip`` (not checked).
- **clock**: the system time must be later than :data:`CLOCK_FLOOR` (2025-01-01, before this
  code was written: an earlier clock is a host that lost its time). If the kernel says
  (``adjtimex``) that the clock is not NTP-synchronised, that is a warning: it does not change
  the exit code.

A fact that cannot be read counts as nothing (0, no flags), so it fails any requirement on it
and passes when the profile requires nothing of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Literal

from agent.host.hypervisor import HostResources, Hypervisor, HypervisorError
from contract.profiles import (
    PROFILE_NAME,
    REQUIREMENTS,
    HostFacts,
    Profile,
    judge,
    load_profile,
    load_profiles,
)

CLOCK_FLOOR: Final = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC).timestamp()
TIME_ERROR: Final = 5  # adjtimex: the clock is not synchronised
Status = Literal["pass", "fail", "warn", "skip"]
MARKS: Final[dict[str, str]] = {"pass": "✓", "fail": "✗", "warn": "!", "skip": "-"}


class UnknownProfile(ValueError):
    """No profile of that name; ``known`` lists the ones there are."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown profile {name!r}; known profiles: "
                         + (", ".join(known) or "none"))
        self.known = known


def find_profile(directory: Path, name: str) -> Profile:
    """The profile ``name`` from ``directory``, or :class:`UnknownProfile`."""
    path = directory / f"{name}.toml"
    if not PROFILE_NAME.fullmatch(name) or not path.is_file():
        raise UnknownProfile(name, sorted(load_profiles(directory)) if directory.is_dir()
                             else [])
    return load_profile(path)


@dataclass(frozen=True)
class Target:
    """The host to check: a libvirt URI, and for a simulated host the profile it was made of
    (its declared CPU flags stand in for the ones the test driver cannot report)."""

    uri: str
    simulation: Profile | None = None


@dataclass(frozen=True)
class Reading:
    value: int | tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Observation:
    """What was read from a host, by HostFacts field; a field is absent when it needed libvirt
    and libvirt could not be reached."""

    uri: str
    libvirt: str = ""  # "libvirt 10.0.0, QEMU" once connected
    libvirt_error: str = ""
    readings: Mapping[str, Reading] = field(default_factory=dict)
    now: float = 0.0
    ntp_synchronised: bool | None = None  # None: the kernel did not say

    def facts(self) -> HostFacts | None:
        """The facts, when every one was read."""
        if any(fact not in self.readings for fact, _ in REQUIREMENTS.values()):
            return None
        return self.facts_or_nothing()

    def facts_or_nothing(self) -> HostFacts:
        """The facts, with nothing (0, no flags) for those not read."""

        def number(name: str) -> int:
            value = self.readings[name].value if name in self.readings else 0
            return value if isinstance(value, int) else 0

        flags = self.readings["cpu_flags"].value if "cpu_flags" in self.readings else ()
        return HostFacts(cpus=number("cpus"), memory_mib=number("memory_mib"),
                         cpu_flags=flags if isinstance(flags, tuple) else (),
                         disk_gib=number("disk_gib"), nics=number("nics"))


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    found: str
    required: str
    source: str
    hint: str = ""


@dataclass(frozen=True)
class Report:
    profile: str
    uri: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_plain(self) -> dict[str, object]:
        return {"profile": self.profile, "uri": self.uri, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks]}

    def render(self) -> str:
        """The checklist for people: one line per check, a hint under each that is not met."""
        width = max(len(c.name) for c in self.checks)
        lines = [f"host {self.uri} against hardware profile {self.profile}:"]
        for c in self.checks:
            lines.append(f"  {MARKS[c.status]} {c.name:<{width}}  found {c.found}; "
                         f"required {c.required}  [{c.source}]")
            if c.hint and c.status != "pass":
                lines.append(f"  {'':<{width + 2}}  → {c.hint}")
        failed = len(self.failures())
        lines.append("result: " + ("OK, the host meets the profile" if not failed else
                                   f"FAILED, {failed} requirement{'s' * (failed > 1)} not met"))
        return "\n".join(lines)


HINTS: Final[dict[str, str]] = {
    "cpus": "this host is too small for the profile: use a larger host or a smaller profile",
    "memory": "add memory, or enroll the host under a profile that fits it",
    "cpu_flags": "enable virtualisation (VT-x/AMD-V) in the firmware setup and reboot",
    "disks": "add disk capacity, or enroll the host under a profile that fits it",
    "nics": "connect the missing network interfaces, or use a profile that fits the host",
}


def _local(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    return not parts.netloc and not parts.scheme.startswith("test")


def evaluate(profile: Profile, obs: Observation) -> Report:
    """``obs`` against ``profile``: the libvirt line, one line per requirement, the clock."""
    checks = [
        Check("libvirt", "pass", f"connected ({obs.libvirt})", "reachable", obs.uri)
        if not obs.libvirt_error else
        Check("libvirt", "fail", obs.libvirt_error, "reachable", obs.uri,
              "is libvirtd running (systemctl status libvirtd)? is this user in the "
              "libvirt group? is the URI right (--libvirt-uri)?")
    ]
    facts = obs.facts_or_nothing()
    for name, (fact, _judge) in REQUIREMENTS.items():
        verdict = judge(profile, name, facts)
        if fact not in obs.readings:
            checks.append(Check(name, "skip", "not checked", verdict.required,
                                "libvirt", "not checked: libvirt could not be reached"))
            continue
        checks.append(Check(name, "fail" if verdict.reason else "pass", verdict.found,
                            verdict.required, obs.readings[fact].source,
                            HINTS[name] if verdict.reason else ""))
    checks.append(clock_check(obs.now, obs.ntp_synchronised))
    return Report(profile.name, obs.uri, tuple(checks))


def clock_check(now: float, ntp_synchronised: bool | None) -> Check:
    """The clock is sane if later than :data:`CLOCK_FLOOR`; unsynchronised is a warning."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    sync = {True: "NTP-synchronised", False: "not NTP-synchronised",
            None: "synchronisation unknown"}[ntp_synchronised]
    required = "later than 2025-01-01, NTP-synchronised"
    source = "system clock, kernel adjtimex()"
    if now < CLOCK_FLOOR:
        return Check("clock", "fail", f"{stamp}, {sync}", required, source,
                     "the clock is wrong: set it (timedatectl set-ntp true, or chrony/ntpd) "
                     "before enrolling: certificates depend on it")
    if ntp_synchronised is False:
        return Check("clock", "warn", f"{stamp}, {sync}", required, source,
                     "enable NTP (timedatectl set-ntp true) so the clock stays right")
    return Check("clock", "pass", f"{stamp}, {sync}", required, source)


def ntp_synchronised() -> bool | None:
    """The kernel's view (``adjtimex`` in read-only mode), or None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        state = int(libc.adjtimex(ctypes.create_string_buffer(512)))  # struct timex, modes 0
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != TIME_ERROR


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    flags: set[str] = set()
    seen: set[str] = set()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("flags", "vmx flags") and key not in seen:  # the first CPU is enough
                seen.add(key)
                flags.update(value.split())
    return tuple(sorted(flags))


def _local_disks_gib(root: Path = Path("/sys/block")) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for dev in root.iterdir():
            if (dev / "device").exists():
                with contextlib.suppress(OSError, ValueError):
                    total += int((dev / "size").read_text()) * 512  # always 512-byte sectors
    return total // 2**30


def _local_nics(root: Path = Path("/sys/class/net")) -> int:
    with contextlib.suppress(OSError):
        return sum(1 for dev in root.iterdir() if (dev / "device").exists())
    return 0


def _libvirt_flag(name: str) -> str:
    return name.lower().replace(".", "_")  # libvirt's sse4.2 is /proc/cpuinfo's sse4_2


def _readings(target: Target, res: HostResources | None) -> dict[str, Reading]:
    out: dict[str, Reading] = {}
    test_host = urllib.parse.urlsplit(target.uri).scheme.startswith("test")
    if res is not None:
        out["cpus"] = Reading(res.cpus, "libvirt getInfo()")
        out["memory_mib"] = Reading(res.memory_mib, "libvirt getInfo()")
    if target.simulation is not None:
        out["cpu_flags"] = Reading(
            target.simulation.simulation.cpu_flags,
            f"declared in [simulation] cpu_flags of {target.simulation.name}.toml "
            "(libvirt's test driver reports no CPU flags)")
    elif _local(target.uri):
        out["cpu_flags"] = Reading(_cpuinfo_flags(), "/proc/cpuinfo")
    elif res is not None:
        out["cpu_flags"] = Reading(
            tuple(_libvirt_flag(f) for f in res.cpu_features),
            "libvirt capabilities (the test driver has no CPU flags: check a simulated host "
            "with --simulate PROFILE)" if test_host else "libvirt capabilities, host CPU")
    if _local(target.uri):
        out["disk_gib"] = Reading(_local_disks_gib(), "/sys/block (whole disks)")
        out["nics"] = Reading(_local_nics(), "/sys/class/net (interfaces with a device)")
    elif res is not None:
        if test_host and res.volumes_bytes is not None:
            out["disk_gib"] = Reading(sum(res.volumes_bytes) // 2**30,
                                      "libvirt storage volumes (test driver)")
        else:
            out["disk_gib"] = Reading(0, "not readable over a remote URI: run the check there")
        out["nics"] = Reading(len(res.interfaces or ()),
                              "libvirt host interfaces" if res.interfaces is not None
                              else "libvirt has no interface driver here")
    return out


async def observe(target: Target) -> Observation:
    """Read the facts of ``target`` (libvirt, and for a local host /proc and /sys)."""
    error, version, res = "", "", None
    try:
        hv = await Hypervisor.open(target.uri, events=False)
    except HypervisorError as exc:
        error = f"cannot connect: {exc}"
    else:
        try:
            res = await hv.host_resources()
            version = f"libvirt {res.libvirt_version}, {res.hypervisor}"
        except HypervisorError as exc:
            error = f"connected, but libvirt failed: {exc}"
        finally:
            hv.close()
    return Observation(uri=target.uri, libvirt=version, libvirt_error=error,
                       readings=_readings(target, res), now=time.time(),
                       ntp_synchronised=ntp_synchronised())


async def check(profile: Profile, target: Target) -> Report:
    """Observe ``target`` and judge it against ``profile``."""
    return evaluate(profile, await observe(target))
