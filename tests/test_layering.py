"""One module per outside library (STYLE.md, pattern 3): each enters the code base through one
module of each package, which translates its errors into ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# library -> the only modules allowed to import it
GATEWAYS = {
    "libvirt": {"agent/host/hypervisor.py"},
    "libvirtaio": {"agent/host/hypervisor.py"},
    "psutil": {"agent/host/sampler.py"},
    # The aggregator's two MQTT sessions: receiving (ingest) and sending (control).
    "aiomqtt": {"agent/uplink.py", "aggregator/fleet/ingest.py", "aggregator/fleet/control.py"},
    "paho": {"aggregator/fleet/ingest.py"},
    # The agent's two local databases; the aggregator's store (import-linter checks that
    # nothing else in the aggregator imports them, even through another module).
    "sqlite3": {"agent/spool.py", "agent/orders/journal.py", "aggregator/store/writer.py",
                "aggregator/store/tx.py", "aggregator/store/ingest.py"},
    "sqlite_utils": {"aggregator/store/writer.py", "aggregator/store/schema.py"},
    # The agent's x509 work runs in the enroll command and in a child process (certtool).
    "cryptography": {"agent/identity/enroll.py", "agent/identity/certtool.py",
                     "aggregator/trust/pki.py"},
    "ssl": {"plumbing/tls.py"},
    "nacl": {"agent/orders/signatures.py"},
    "prometheus_client": {"aggregator/api/metrics.py"},
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


PACKAGES = ("contract", "plumbing", "agent", "aggregator", "demo")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


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


def _sql_calls(path: Path) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("execute", "executemany", "executescript")]


def test_only_the_store_runs_sql() -> None:
    """Domain code reads and writes through the store's repositories (aggregator/store/*.py):
    a second database backend is one more package behind the same functions."""
    outside = {str(p.relative_to(ROOT)): lines for p in SOURCES
               if str(p.relative_to(ROOT)).startswith("aggregator/")
               and not str(p.relative_to(ROOT)).startswith("aggregator/store/")
               and (lines := _sql_calls(p))}
    assert outside == {}
