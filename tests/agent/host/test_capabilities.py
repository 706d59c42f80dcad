"""Reading libvirt's capabilities XML (captured from real hosts) and its version number."""

from __future__ import annotations

from pathlib import Path

from agent.host.capabilities import (
    arch_from_capabilities,
    cpu_features_from_capabilities,
    domain_type_from_capabilities,
    domain_types_from_capabilities,
    version_string,
)

DATA = Path(__file__).parents[2] / "data"
KVM_HOST = (DATA / "capabilities-kvm.xml").read_text()
TEST_DRIVER = """<capabilities><host><cpu><arch>i686</arch><features><pae/><nonpae/></features>
</cpu></host><guest><arch name='i686'><domain type='test'/></arch></guest></capabilities>"""


def test_domain_type_comes_from_capabilities() -> None:
    assert domain_type_from_capabilities(KVM_HOST) == "kvm"
    tcg_only = KVM_HOST.replace("<domain type='kvm'/>", "")
    assert domain_type_from_capabilities(tcg_only) == "qemu"
    assert domain_type_from_capabilities("<not xml") == "unknown"
    assert domain_type_from_capabilities(TEST_DRIVER) == "test"


def test_domain_types_are_the_host_architectures_best_first() -> None:
    assert domain_types_from_capabilities(KVM_HOST) == ("kvm", "qemu")
    assert domain_types_from_capabilities(TEST_DRIVER) == ("test",)
    # i686 offers kvm too, but only the host's own architecture counts.
    x86_tcg = KVM_HOST.replace(
        "<machine maxCpus='255'>pc-i440fx-7.2</machine>\n      <domain type='qemu'/>\n"
        "      <domain type='kvm'/>", "<domain type='qemu'/>")
    assert domain_types_from_capabilities(x86_tcg) == ("qemu",)
    assert domain_types_from_capabilities("<not xml") == ()


def test_architecture_and_cpu_features() -> None:
    assert arch_from_capabilities(KVM_HOST) == "x86_64"
    assert arch_from_capabilities(TEST_DRIVER) == "i686"
    assert arch_from_capabilities("<capabilities/>") == ""
    assert arch_from_capabilities("<not xml") == ""
    assert cpu_features_from_capabilities(KVM_HOST) == ("vmx",)
    qemu_host = (DATA / "capabilities-qemu-7.2.xml").read_text()
    assert {"vme", "rdrand", "tsc_adjust"} <= set(cpu_features_from_capabilities(qemu_host))
    assert cpu_features_from_capabilities(TEST_DRIVER) == ("nonpae", "pae")
    assert cpu_features_from_capabilities("<capabilities/>") == ()
    assert cpu_features_from_capabilities("<not xml") == ()


def test_libvirt_version_number_as_a_string() -> None:
    assert version_string(9_000_000) == "9.0.0"
    assert version_string(10_010_002) == "10.10.2"
