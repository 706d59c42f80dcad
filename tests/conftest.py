"""Shared fixtures: a traversable temp root (the broker drops to its own user), throwaway CAs,
libvirt test-driver hosts from the hardware profiles, a running fleet rig."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.profiles import Profile, default_profiles_dir, load_profiles
from aggregator.pki import CertificateAuthority


@pytest.fixture(scope="session")
def root_dir() -> Iterator[Path]:
    """A temp directory the broker's user can reach (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="virt8ra-tests-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir(root_dir: Path, request: pytest.FixtureRequest) -> Path:
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=root_dir))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="session")
def profiles() -> dict[str, Profile]:
    return load_profiles(default_profiles_dir())


@pytest.fixture(scope="session")
def pki(root_dir: Path) -> CertificateAuthority:
    """A session-wide throwaway CA."""
    ca = CertificateAuthority(root_dir / "session-ca")
    ca.create(name="test CA")
    return ca


@pytest.fixture(scope="session")
def foreign_pki(root_dir: Path) -> CertificateAuthority:
    """A CA the fleet does not trust."""
    ca = CertificateAuthority(root_dir / "foreign-ca")
    ca.create(name="someone else's CA")
    return ca
