"""Hardware profiles: what a class of host must have, what it keeps for itself, how to simulate it.

One TOML file per class in ``hardware-profiles/`` (schema in hardware-profiles/README.md),
loaded into frozen dataclasses and validated here. Shared by the agent (checks, simulation)
and the aggregator (enrollment, placement).

What a host *has* is a :class:`HostFacts`; :func:`profile_failures` compares it with a
profile's ``[requires]`` and gives one reason per unmet requirement. The agent reads the facts
(``agent/host/hostcheck.py``) and sends them at enrollment; the aggregator rebuilds them with
:meth:`HostFacts.from_plain` (untrusted JSON: anything malformed is a ``ValueError``) and
re-checks them against the token's profile. Both sides judge with :func:`judge`, so the
checklist a technician sees and the aggregator's refusal say the same thing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from plumbing import configfile

PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
KNOWN_CPU_FLAGS = frozenset({"vmx", "svm", "aes", "avx", "avx2", "sse4_2", "pdpe1gb", "ept", "npt"})
CPU_FLAG = re.compile(r"[a-z0-9_.]{1,64}")  # as /proc/cpuinfo and libvirt spell them

# Bounds on what a host may claim: far above any real machine, low enough to stay cheap.
MAX_CPUS: Final = 1 << 16
MAX_MEMORY_MIB: Final = 1 << 32
MAX_DISK_GIB: Final = 1 << 32
MAX_NICS: Final = 1 << 12
MAX_CPU_FLAGS: Final = 1024
MAX_SIMULATED_NICS: Final = 64
MAX_SIMULATED_DISKS: Final = 64


@dataclass(frozen=True)
class HostFacts:
    """What a host has, as far as the hardware profiles care; validated on construction."""

    cpus: int  # logical CPUs (sockets x cores x threads)
    memory_mib: int
    cpu_flags: tuple[str, ...]  # normalised to /proc/cpuinfo's spelling (sse4_2, not sse4.2)
    disk_gib: int  # local disk capacity, all disks together
    nics: int  # network interfaces

    def __post_init__(self) -> None:
        for name, bound in (("cpus", MAX_CPUS), ("memory_mib", MAX_MEMORY_MIB),
                            ("disk_gib", MAX_DISK_GIB), ("nics", MAX_NICS)):
            value = getattr(self, name)
            if type(value) is not int:
                raise ValueError(f"facts.{name}: expected an integer, got {type(value).__name__}")
            if not 0 <= value <= bound:
                raise ValueError(f"facts.{name}: {value} is outside 0..{bound}")
        if not isinstance(self.cpu_flags, tuple):
            raise ValueError("facts.cpu_flags: expected a list of strings")
        if len(self.cpu_flags) > MAX_CPU_FLAGS:
            raise ValueError(f"facts.cpu_flags: more than {MAX_CPU_FLAGS} flags")
        for flag in self.cpu_flags:
            if not isinstance(flag, str) or not CPU_FLAG.fullmatch(flag):
                raise ValueError(f"facts.cpu_flags: {flag!r} is not a CPU flag")

    def to_plain(self) -> dict[str, object]:
        return {"cpus": self.cpus, "memory_mib": self.memory_mib,
                "cpu_flags": list(self.cpu_flags), "disk_gib": self.disk_gib,
                "nics": self.nics}

    @classmethod
    def from_plain(cls, data: object) -> HostFacts:
        """Facts from untrusted JSON; unknown keys are ignored, anything else malformed is a
        ``ValueError`` naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"facts: expected an object, got {type(data).__name__}")
        missing = [k for k in ("cpus", "memory_mib", "cpu_flags", "disk_gib", "nics")
                   if k not in data]
        if missing:
            raise ValueError(f"facts: missing {', '.join(missing)}")
        flags = data["cpu_flags"]
        if not isinstance(flags, list):
            raise ValueError("facts.cpu_flags: expected a list of strings")
        if len(flags) > MAX_CPU_FLAGS:  # before copying: a huge list is refused cheaply
            raise ValueError(f"facts.cpu_flags: more than {MAX_CPU_FLAGS} flags")
        return cls(cpus=data["cpus"], memory_mib=data["memory_mib"], cpu_flags=tuple(flags),
                   disk_gib=data["disk_gib"], nics=data["nics"])


@dataclass(frozen=True)
class Verdict:
    """One requirement against one fact: what was found, what is required, and the reason it
    is unmet (``""`` when it is met)."""

    found: str
    required: str
    reason: str = ""


def _judge_cpus(p: Profile, f: HostFacts) -> Verdict:
    need = p.requires.cpu_cores
    return Verdict(f"{f.cpus} logical CPUs", f"at least {need}",
                   "" if f.cpus >= need else
                   f"cpus: {f.cpus} logical CPUs, the profile {p.name} requires {need}")


def _judge_memory(p: Profile, f: HostFacts) -> Verdict:
    need = p.requires.memory_mib
    return Verdict(f"{f.memory_mib} MiB", f"at least {need} MiB",
                   "" if f.memory_mib >= need else
                   f"memory: {f.memory_mib} MiB, the profile {p.name} requires {need} MiB")


def _judge_flags(p: Profile, f: HostFacts) -> Verdict:
    wanted = p.requires.cpu_flags_any
    present = [flag for flag in wanted if flag in f.cpu_flags]
    found = ", ".join(present) if present else f"none of {', '.join(wanted)}"
    required = "any of " + ", ".join(wanted) if wanted else "nothing"
    return Verdict(found, required,
                   "" if present or not wanted else
                   f"cpu_flags: none of {', '.join(wanted)}, the profile {p.name} requires "
                   "at least one (is virtualisation enabled in the firmware?)")


def _judge_disks(p: Profile, f: HostFacts) -> Verdict:
    need = p.requires.disk_gib
    return Verdict(f"{f.disk_gib} GiB", f"at least {need} GiB" if need else "nothing",
                   "" if f.disk_gib >= need else
                   f"disks: {f.disk_gib} GiB, the profile {p.name} requires {need} GiB")


def _judge_nics(p: Profile, f: HostFacts) -> Verdict:
    need = p.requires.nics
    return Verdict(f"{f.nics} network interfaces", f"at least {need}",
                   "" if f.nics >= need else
                   f"nics: {f.nics} network interfaces, the profile {p.name} requires {need}")


# The requirements in checklist order: check name -> (the HostFacts field it reads, judge).
REQUIREMENTS: Final[dict[str, tuple[str, Callable[[Profile, HostFacts], Verdict]]]] = {
    "cpus": ("cpus", _judge_cpus),
    "memory": ("memory_mib", _judge_memory),
    "cpu_flags": ("cpu_flags", _judge_flags),
    "disks": ("disk_gib", _judge_disks),
    "nics": ("nics", _judge_nics),
}


def judge(profile: Profile, requirement: str, facts: HostFacts) -> Verdict:
    """``facts`` against one of ``profile``'s :data:`REQUIREMENTS`."""
    return REQUIREMENTS[requirement][1](profile, facts)


def profile_failures(profile: Profile, facts: HostFacts) -> list[str]:
    """One reason per requirement of ``profile`` that ``facts`` do not meet; empty if none."""
    return [v.reason for name in REQUIREMENTS if (v := judge(profile, name, facts)).reason]


@dataclass(frozen=True)
class Requirements:
    cpu_cores: int
    memory_mib: int
    cpu_flags_any: tuple[str, ...] = ("vmx", "svm")
    disk_gib: int = 0
    nics: int = 1

    def __post_init__(self) -> None:
        if self.cpu_cores < 1 or self.memory_mib < 256:
            raise ValueError("requires: cpu_cores >= 1 and memory_mib >= 256")
        unknown = set(self.cpu_flags_any) - KNOWN_CPU_FLAGS
        if unknown:
            raise ValueError(f"requires.cpu_flags_any: unknown flags {sorted(unknown)}")


@dataclass(frozen=True)
class Reservations:
    cpus: int = 0
    memory_mib: int = 0


@dataclass(frozen=True)
class Simulation:
    """A libvirt test-driver host of this class, for demos and tests."""

    sockets: int = 1
    cores: int = 4
    threads: int = 1
    mhz: int = 2000
    cpu_model: str = "x86_64"
    memory_mib: int = 8192
    guests: int = 2
    guest_memory_mib: int = 512
    guest_vcpus: int = 1
    # libvirt's test driver has no CPU flags: the simulated host declares them here, and the
    # check says so in its output.
    cpu_flags: tuple[str, ...] = ("vmx",)
    disks_gib: tuple[int, ...] = ()  # one block volume per disk, in a storage pool
    nics: int = 1  # host interfaces eth0, eth1, ...

    def __post_init__(self) -> None:
        bad = [f for f in self.cpu_flags if not CPU_FLAG.fullmatch(f)]
        if bad:
            raise ValueError(f"simulation.cpu_flags: {bad} are not CPU flags")
        if len(self.disks_gib) > MAX_SIMULATED_DISKS or any(
                not 1 <= d <= MAX_DISK_GIB for d in self.disks_gib):
            raise ValueError(f"simulation.disks_gib: at most {MAX_SIMULATED_DISKS} disks, "
                             "each at least 1 GiB")
        if not 0 <= self.nics <= MAX_SIMULATED_NICS:
            raise ValueError(f"simulation.nics: must be 0..{MAX_SIMULATED_NICS}")

    def facts(self) -> HostFacts:
        """What a host made from this simulation has."""
        return HostFacts(cpus=self.sockets * self.cores * self.threads,
                         memory_mib=self.memory_mib, cpu_flags=self.cpu_flags,
                         disk_gib=sum(self.disks_gib), nics=self.nics)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    requires: Requirements
    reserved: Reservations = field(default_factory=Reservations)
    labels: dict[str, str] = field(default_factory=dict)
    simulation: Simulation = field(default_factory=Simulation)

    def __post_init__(self) -> None:
        if not PROFILE_NAME.fullmatch(self.name):
            raise ValueError(f"name: {self.name!r} is not a profile name (lower-case DNS label)")
        if self.reserved.memory_mib >= self.requires.memory_mib:
            raise ValueError("reserved.memory_mib must leave memory for guests")
        if self.reserved.cpus >= self.requires.cpu_cores:
            raise ValueError("reserved.cpus must leave CPUs for guests")
        sim = self.simulation
        if sim.sockets * sim.cores * sim.threads < self.requires.cpu_cores:
            raise ValueError("simulation: fewer CPUs than the profile requires")
        if sim.memory_mib < self.requires.memory_mib:
            raise ValueError("simulation: less memory than the profile requires")
        failures = profile_failures(self, sim.facts())
        if failures:
            raise ValueError("simulation: does not meet [requires]: " + "; ".join(failures))


def load_profile(path: Path) -> Profile:
    """The profile in ``path``; its ``name`` must match the file name."""
    profile = configfile.load(Profile, path)
    if profile.name != path.stem:
        raise configfile.ConfigError(path, "name", f"must be {path.stem!r}, the file's name")
    return profile


def load_profiles(directory: Path) -> dict[str, Profile]:
    """Every ``*.toml`` profile in ``directory`` by name."""
    return {p.stem: load_profile(p) for p in sorted(directory.glob("*.toml"))}


def default_profiles_dir() -> Path:
    """``hardware-profiles/`` of the source tree, or the installed copy."""
    for candidate in (
        Path(__file__).resolve().parent.parent / "hardware-profiles",
        Path("/usr/share/virt8ra/hardware-profiles"),
    ):
        if candidate.is_dir():
            return candidate
    return Path("/usr/share/virt8ra/hardware-profiles")
