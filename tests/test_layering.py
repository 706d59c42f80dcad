"""One module per outside library (STYLE.md, pattern 3): each enters the code base through one
module of each package, which translates its errors into ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# library -> the only modules allowed to import it
GATEWAYS = {
    "libvirt": {"agent/hypervisor.py"},
    "libvirtaio": {"agent/hypervisor.py"},
    "psutil": {"agent/sampler.py"},
    # The aggregator's two MQTT sessions: receiving (ingest) and sending (control).
    "aiomqtt": {"agent/uplink.py", "aggregator/ingest.py", "aggregator/control.py"},
    "paho": {"aggregator/ingest.py"},
    # The agent's two local databases; the aggregator's store and the functions that run on
    # its threads (they take its connections).
    "sqlite3": {"agent/spool.py", "agent/journal.py", "aggregator/store.py",
                "aggregator/queries.py", "aggregator/trust.py", "aggregator/audit.py",
                "aggregator/orders.py", "aggregator/residency.py", "aggregator/vms.py",
                "aggregator/images.py", "aggregator/placement.py", "aggregator/moves.py"},
    # Functions that run on the store's writer thread take its sqlite-utils Database.
    "sqlite_utils": {"aggregator/store.py", "aggregator/migrations.py",
                     "aggregator/enrollment.py", "aggregator/auth.py", "aggregator/cli.py",
                     "aggregator/service.py", "aggregator/trust.py", "aggregator/audit.py"},
    # The agent's x509 work runs in the enroll command and in a child process (certtool).
    "cryptography": {"agent/enroll.py", "agent/certtool.py", "aggregator/pki.py"},
    "ssl": {"agent/tls.py", "agent/uplink.py", "agent/enroll.py", "agent/images.py",
            "aggregator/ingest.py", "aggregator/control.py"},
    "nacl": {"agent/orders.py"},
    "prometheus_client": {"aggregator/metrics.py"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


SOURCES = sorted(p for pkg in ("agent", "aggregator") for p in (ROOT / pkg).glob("*.py"))


@pytest.mark.parametrize("library", sorted(GATEWAYS))
def test_each_library_enters_through_its_gateway(library: str) -> None:
    importers = {str(p.relative_to(ROOT)) for p in SOURCES if library in _imports(p)}
    assert importers <= GATEWAYS[library], f"{library} imported outside its gateway"


def test_the_daemon_never_loads_the_x509_stack() -> None:
    """The agent's steady state stays light: cryptography only in the enroll command."""
    import subprocess
    import sys

    code = ("import sys, agent.daemon, agent.cli; "
            "print(any(m.startswith('cryptography') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
