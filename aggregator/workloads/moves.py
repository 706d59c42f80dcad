"""Moving VMs between nodes: live and cold migration, drains, and restarts after a node is lost.

A move is a row in ``moves`` and a chain of signed orders, one at a time::

    preparing   the destination checks the VM may and can come (its own certificate's
                country and provider, its room) and prepares its files   (receive, at dest)
    migrating   the source checks the destination against the VM's policy and moves it
                there, peer to peer between the two libvirt daemons     (migrate, at source)
    adopting    the destination takes it over and, after a cold move, boots it (adopt)
    releasing   the outcome of a migrate is unknown (its order expired): the destination
                says whether the VM arrived                              (release, at dest)

A refused or failed step ends the move as ``failed`` with the reason, and the VM where it was;
the destination drops what it prepared. The VM's node changes only when the source reports the
move done (or the destination reports the VM there), so the VM is never counted in two places;
while a move runs, its resources are held on the destination (triggers in migration 007).
Every move appends to the VM's residency record: left the source, arrived at the destination.

A drain cordons a node and moves its VMs off, a few at a time. A VM whose policy says
``on_node_loss: restart`` is created again elsewhere once its node has been silent for the
node's own lease (after which the node has paused it) plus a grace period; when the lost node
returns it is ordered to remove its copy (``evict``) and never resumes it.

This module is the way in; the work is done by:

- :mod:`~aggregator.workloads.moves_settings`: :class:`MoveSettings`, :class:`Context`, limits;
- :mod:`~aggregator.workloads.moves_start`: :func:`start`, with
  :mod:`~aggregator.workloads.destinations` choosing where to;
- :mod:`~aggregator.workloads.moves_steps`: the step table and the move's state transitions,
  pure decisions over plain data, carried out by :mod:`~aggregator.workloads.moves_advance`
  (:func:`advance`);
- :mod:`~aggregator.workloads.drains`: :func:`drain`, :func:`drive`, :func:`drain_json`;
- :mod:`~aggregator.workloads.node_loss`: :func:`restart_lost`, :func:`evict`;
- :mod:`~aggregator.workloads.moves_json`: :func:`get`, :func:`list_moves`.

The functions take a :class:`~aggregator.store.tx.Tx` and run on the store's threads (writes
on its writer thread, inside its transaction), like :mod:`aggregator.workloads.orders`; they
read and write through the repository :mod:`aggregator.store.moves` and write no SQL of their
own.
"""

from __future__ import annotations

from aggregator.workloads.drains import drain, drain_json, drive
from aggregator.workloads.moves_advance import advance
from aggregator.workloads.moves_json import get, list_moves
from aggregator.workloads.moves_settings import (
    DRAIN_PARALLEL_MAX,
    EVICT_RETRY_S,
    MAX_ASKS,
    MIGRATE_TTL_MARGIN_S,
    MODES,
    OPEN_STATES,
    RESTART_RETRY_S,
    Context,
    MoveSettings,
)
from aggregator.workloads.moves_start import start
from aggregator.workloads.node_loss import evict, restart_lost

__all__ = [
    "DRAIN_PARALLEL_MAX",
    "EVICT_RETRY_S",
    "MAX_ASKS",
    "MIGRATE_TTL_MARGIN_S",
    "MODES",
    "OPEN_STATES",
    "RESTART_RETRY_S",
    "Context",
    "MoveSettings",
    "advance",
    "drain",
    "drain_json",
    "drive",
    "evict",
    "get",
    "list_moves",
    "restart_lost",
    "start",
]
