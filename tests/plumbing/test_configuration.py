"""Configs and hardware profiles: validated at load, errors name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.host import simhost
from aggregator.config import AggregatorConfig
from contract.profiles import Profile, default_profiles_dir, load_profile, load_profiles
from plumbing import configfile

ROOT = Path(__file__).parents[2]


def test_the_example_configs_load_and_match_the_defaults() -> None:
    agent_cfg = config.load(ROOT / "packaging" / "agent.toml")
    assert agent_cfg.telemetry == config.TelemetryConfig()
    assert agent_cfg.broker == config.BrokerConfig()
    assert agent_cfg.libvirt == config.LibvirtConfig()
    assert agent_cfg.orders == config.OrdersConfig()
    assert configfile.load(AggregatorConfig, ROOT / "packaging" / "aggregator.toml") == (
        AggregatorConfig())


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("", "node.id", "missing"),
        ('[node]\nid = "n1"\n[broker]\nport = 70000\n', "broker", "not a TCP port"),
        ('[node]\nid = "n1"\n[brokr]\n', "brokr", "unknown key"),
        ('[node]\nid = "n1"\n[telemetry]\ninterval_s = "10"\n', "telemetry.interval_s",
         "expected a number"),
        ('[node]\nid = "Node 1"\n', "node", "not a node id"),
        ('[node]\nid = "n1"\n[broker]\nkeepalive_s = true\n', "broker.keepalive_s",
         "expected int"),
        ("[node\n", "", "not valid TOML"),
        ('[node]\nid = "n1"\n[libvirt]\nmigration_transport = "ssh"\n', "libvirt",
         "must be tls or tcp"),
        ('[node]\nid = "n1"\n[libvirt]\nmigration_address = "10.0.0.1/24"\n', "libvirt",
         "not a host address"),
        ('[node]\nid = "n1"\n[telemetry]\ninterval_s = nan\n', "telemetry.interval_s",
         "finite"),
        ('[node]\nid = "n1"\n[telemetry]\npublish_batch = 0\n', "telemetry",
         "publish_batch"),
        ('[node]\nid = "n1"\n# \xff\n', "", "not valid TOML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, key: str,
                                          reason: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(configfile.ConfigError) as info:
        config.load(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert reason in info.value.reason


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(configfile.ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_every_shipped_profile_is_valid_and_simulable(tmp_path: Path) -> None:
    profiles = load_profiles(default_profiles_dir())
    assert {"tower-5g", "edge-server", "rack-server"} <= set(profiles)
    for name, profile in profiles.items():
        assert profile.name == name
        assert profile.description
        xml = simhost.host_xml(profile, "n1")
        assert f"<memory>{profile.simulation.memory_mib * 1024}</memory>" in xml


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (("cpu_cores = 4", "cpu_cores = 0"), "cpu_cores >= 1"),
        (('cpu_flags_any = ["vmx", "svm"]', 'cpu_flags_any = ["warp"]'), "unknown flags"),
        (("cpus = 1", "cpus = 4"), "reserved.cpus"),
        (("memory_mib = 2048", "memory_mib = 16384"), "reserved.memory_mib"),
        (('name = "tower-5g"', 'name = "tower-6g"'), "must be 'tower-5g'"),
        (("\ncores = 4", "\ncores = 2"), "fewer CPUs"),
    ],
)
def test_profile_validation(tmp_path: Path, change: tuple[str, str], reason: str) -> None:
    text = (default_profiles_dir() / "tower-5g.toml").read_text()
    assert change[0] in text
    path = tmp_path / "tower-5g.toml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(configfile.ConfigError, match=reason):
        load_profile(path)


def test_profile_dataclass_is_frozen(profiles: dict[str, Profile]) -> None:
    with pytest.raises(AttributeError):
        profiles["tower-5g"].name = "other"  # type: ignore[misc]
