"""The residency repository on a real SQLite file (the chain's hashing and checks are tested
with the domain and through the API)."""

from __future__ import annotations

from aggregator.store import residency as repo
from aggregator.store.tx import Tx
from tests.aggregator.store.rows import add_node, add_vm


def _entry(seq: int, event: str, node: str, digest: str) -> repo.Entry:
    return repo.Entry(seq, event, node, "a1", "SI", "lj-1", float(seq), f"prev-{seq}", digest)


def test_a_chain_is_appended_read_and_anchored(tx: Tx) -> None:
    add_node(tx, "n1", provider="a1", country="SI", site="lj-1")
    add_vm(tx, "vm-1", "n1")
    assert repo.node_location(tx, "n1") == repo.Location("a1", "SI", "lj-1")
    assert repo.node_location(tx, "gone") is None
    assert repo.anchor(tx, "vm-1") == repo.Anchor("", 0)
    assert repo.anchor(tx, "nope") is None
    assert (repo.last_entry(tx, "vm-1"), repo.last_event_at(tx, "vm-1", "n1")) == (None, None)

    chain = [_entry(1, "arrived", "n1", "h1"), _entry(2, "left", "n1", "h2"),
             _entry(3, "arrived", "n2", "h3")]
    for e in chain:
        repo.append_entry(tx, "vm-1", e)
    assert repo.entries(tx, "vm-1") == chain
    assert repo.last_entry(tx, "vm-1") == chain[-1]
    assert repo.anchor(tx, "vm-1") == repo.Anchor("h3", 3)
    assert repo.last_event_at(tx, "vm-1", "n1") == "left"
    assert repo.last_event_at(tx, "vm-1", "n2") == "arrived"
    assert repo.entries(tx, "other") == []


def test_chained_vms_include_those_whose_chain_was_removed(tx: Tx) -> None:
    add_vm(tx, "b", None)
    add_vm(tx, "a", None)
    add_vm(tx, "never", None)
    repo.append_entry(tx, "b", _entry(1, "arrived", "n1", "h1"))
    repo.append_entry(tx, "a", _entry(1, "arrived", "n1", "h1"))
    tx.execute("DELETE FROM residency WHERE vm_id = 'a'")
    repo.append_entry(tx, "orphan", _entry(1, "arrived", "n1", "h1"))  # its VM row has gone
    assert repo.chained_vms(tx) == ["a", "b", "orphan"]
