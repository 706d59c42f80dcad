"""Hardware profiles: what a class of host must have, what it keeps for itself, how to simulate it.

One TOML file per class in ``hardware-profiles/`` (schema in hardware-profiles/README.md),
loaded into frozen dataclasses and validated here. Shared by the agent (checks, simulation)
and the aggregator (enrollment, placement).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from agent import configfile

PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
KNOWN_CPU_FLAGS = frozenset({"vmx", "svm", "aes", "avx", "avx2", "sse4_2", "pdpe1gb", "ept", "npt"})


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
