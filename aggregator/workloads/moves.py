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

The functions take a sqlite3 connection and run on the store's writer thread, inside its
transaction, like :mod:`aggregator.workloads.orders`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from aggregator.errors import Refused
from aggregator.fleet import telemetry as fleet
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.trust.pki import OrderSigner
from aggregator.workloads import orders, residency, vms
from aggregator.workloads.placement import load_nodes, place, shortlist
from contract.profiles import Profile
from contract.wire import Scalar

log = logging.getLogger("virt8ra.aggregator.moves")
MODES: Final = ("live", "cold")
OPEN_STATES: Final = ("preparing", "migrating", "adopting", "releasing")
MIGRATE_TTL_MARGIN_S: Final = 120.0  # a migrate order lives its timeout plus this
DRAIN_PARALLEL_MAX: Final = 32
RESTART_RETRY_S: Final = 60.0  # a restart elsewhere that failed is tried again after this
MAX_ASKS: Final = 5  # a destination is asked this often to take a VM over or say where it is
EVICT_RETRY_S: Final = 60.0
_LIVE_TYPES: Final = ("kvm", "qemu")


@dataclass(frozen=True)
class MoveSettings:
    """How one VM moves; the defaults are what an operator should want."""

    mode: str = "live"  # or "cold"; "auto" (drains): live where possible
    max_downtime_ms: int = 300  # QEMU's own default
    bandwidth_mib_s: int = 0  # 0: no limit
    auto_converge: bool = True
    postcopy: bool = False
    timeout_s: float = 300.0

    @classmethod
    def from_json(cls, body: Any, *, modes: tuple[str, ...] = MODES) -> MoveSettings:
        if not isinstance(body, dict):
            raise Refused("invalid_request", "body must be a JSON object")
        mode = body.get("mode", "live" if "auto" not in modes else "auto")
        if mode not in modes:
            raise Refused("invalid_request", f"mode must be one of {', '.join(modes)}")

        def integer(key: str, low: int, high: int, default: int) -> int:
            value = body.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise Refused("invalid_request", f"{key} must be an integer from {low} to {high}")
            return value

        def flag(key: str, default: bool) -> bool:
            value = body.get(key, default)
            if not isinstance(value, bool):
                raise Refused("invalid_request", f"{key} must be true or false")
            return value

        return cls(mode, integer("max_downtime_ms", 1, 60_000, cls.max_downtime_ms),
                   integer("bandwidth_mib_s", 0, 1 << 20, cls.bandwidth_mib_s),
                   flag("auto_converge", cls.auto_converge), flag("postcopy", cls.postcopy),
                   float(integer("timeout_s", 1, 86_400, int(cls.timeout_s))))

    def params(self) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {"max_downtime_ms": self.max_downtime_ms,
                                  "auto_converge": self.auto_converge,
                                  "postcopy": self.postcopy, "timeout_s": self.timeout_s}
        if self.bandwidth_mib_s:
            out["bandwidth_mib_s"] = self.bandwidth_mib_s
        return out


@dataclass(frozen=True)
class Context:
    """What a move needs besides the database."""

    signer: OrderSigner
    profiles: Mapping[str, Profile]
    live: vms.Liveness
    ttl_s: float


def _node_row(conn: Tx, node_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT id, country, provider, reported_status, last_seen, interval_s, revoked_at,"
        " cordoned, inventory FROM nodes WHERE id = ?", (node_id,)).fetchone()
    if row is None:
        return None
    keys = ("id", "country", "provider", "reported", "last_seen", "interval_s", "revoked_at",
            "cordoned", "inventory")
    out = dict(zip(keys, row, strict=True))
    try:
        inventory = json.loads(out["inventory"] or "{}")
    except ValueError:
        inventory = {}
    if not isinstance(inventory, dict):
        inventory = {}
    out["domain_type"] = str(inventory.get("domain_type", ""))
    out["arch"] = str(inventory.get("arch", ""))
    return out


def _online(node: dict[str, Any], now: float, live: vms.Liveness) -> bool:
    return node["revoked_at"] is None and fleet.node_status(
        node["reported"], node["last_seen"], node["interval_s"], now, live.heartbeat_factor,
        live.min_timeout_s) == "online"


def _live_capable(node: dict[str, Any]) -> bool:
    return str(node["domain_type"]) in _LIVE_TYPES


def _other_arch(source: dict[str, Any], dest: dict[str, Any]) -> str:
    """Why ``dest`` cannot run the VM's guest when it runs other guests than ``source`` (its
    images are built for one architecture); "" when it can, or a node does not say."""
    theirs, ours = dest["arch"], source["arch"]
    if theirs and ours and theirs != ours:
        return f"it runs {theirs} guests, the VM is an {ours} guest"
    return ""


def _choose_dest(conn: Tx, vm_id: str, source: dict[str, Any], to: str,
                 live_move: bool, now: float, ctx: Context) -> str:
    """The destination: ``to`` if it may and can take the VM, else the best node that can;
    Refused (409) with the reasons otherwise."""
    demand = vms.request_of(conn, vm_id).demand()
    if to:
        dest = _node_row(conn, to)
        if dest is None:
            raise Refused("not_found", f"no node {to!r}", 404)
        if to == source["id"]:
            raise Refused("same_node", f"the VM is on {to} already", 409)
        views = [v for v in load_nodes(conn, demand, now=now, profiles=ctx.profiles,
                                       heartbeat_factor=ctx.live.heartbeat_factor,
                                       min_timeout_s=ctx.live.min_timeout_s, push_down=False)
                 if v.id == to]
        decision = place(demand, views)
        reasons = list(dict(decision.rejected).get(to, ()))
        if live_move and not _live_capable(dest):
            reasons.append(f"it runs {dest['domain_type'] or 'no'} guests: no live migration")
        if other := _other_arch(source, dest):
            reasons.append(other)
        if reasons:
            raise Refused("destination_refused", f"{to} cannot take the VM: "
                          + "; ".join(reasons), 409, detail={"node": to, "reasons": reasons})
        return to
    candidates = shortlist(conn, demand, now=now, profiles=ctx.profiles,
                           heartbeat_factor=ctx.live.heartbeat_factor,
                           min_timeout_s=ctx.live.min_timeout_s, limit=64)
    candidates = [c for c in candidates if c.id != source["id"]]
    decision = place(demand, candidates)
    other_arch = False
    for node_id, _score in decision.candidates:
        dest = _node_row(conn, node_id)
        if dest is None or (live_move and not _live_capable(dest)):
            continue
        if _other_arch(source, dest):
            other_arch = True
            continue
        return node_id
    everyone = place(demand, [v for v in load_nodes(
        conn, demand, now=now, profiles=ctx.profiles, heartbeat_factor=ctx.live.heartbeat_factor,
        min_timeout_s=ctx.live.min_timeout_s, push_down=False) if v.id != source["id"]])
    why = "; ".join(f"{node}: {', '.join(reasons)}" for node, reasons in everyone.rejected[:8])
    raise Refused("no_placement", "no other node can take the VM"
                  + (" live (it needs a QEMU/KVM node)" if live_move else "")
                  + (f" (it needs an {source['arch']} node)" if other_arch else "")
                  + (f" ({why})" if why else ""), 409, detail=everyone.to_json())


def start(conn: Tx, ctx: Context, vm_id: str, to: str,
          settings: MoveSettings, now: float, actor: str, drain_id: str | None = None
          ) -> dict[str, Any]:
    """Begin moving a VM: checks here, then the destination's ``receive`` order."""
    row = conn.execute("SELECT node_id, desired_state, actual_state, vcpus, memory_mib,"
                       " disk_gib, name FROM vms WHERE id = ? AND deleted_at IS NULL",
                       (vm_id,)).fetchone()
    if row is None:
        raise Refused("not_found", f"no VM {vm_id!r}", 404)
    node_id, desired, actual, vcpus, memory_mib, disk_gib, name = row
    if node_id is None:
        raise Refused("not_placed", "the VM is on no node (its creation failed)", 409)
    if desired == "deleted":
        raise Refused("deleting", "the VM is being deleted", 409)
    busy = conn.execute("SELECT id FROM moves WHERE vm_id = ? AND finished_at IS NULL",
                        (vm_id,)).fetchone()
    if busy is not None:
        raise Refused("moving", f"the VM is being moved already ({busy[0]})", 409)
    if conn.execute("SELECT 1 FROM orders WHERE vm_id = ? AND state IN ('pending', 'sent',"
                    f" 'accepted') AND action IN {orders.VM_ACTIONS}", (vm_id,)).fetchone():
        raise Refused("busy", "an order for the VM is still open: try again when it ends", 409)
    source = _node_row(conn, node_id)
    assert source is not None
    if not _online(source, now, ctx.live):
        raise Refused("source_offline", f"the VM's node {node_id} is not online: it cannot"
                      " hand the VM over", 409)
    mode = settings.mode
    if mode == "auto":
        mode = "live" if actual in ("running", "paused") and _live_capable(source) else "cold"
    if mode == "live":
        if actual not in ("running", "paused"):
            raise Refused("not_running", f"the VM is {actual}: a live migration needs it"
                          " running (a cold move does not)", 409)
        if not _live_capable(source):
            raise Refused("no_live_migration", f"{node_id} runs"
                          f" {source['domain_type'] or 'no'} guests: no live migration", 409)
    spec = vms.spec_of(conn, vm_id)
    try:
        dest_id = _choose_dest(conn, vm_id, source, to, mode == "live", now, ctx)
    except Refused:
        if settings.mode == "auto" and mode == "live" and not to:
            mode = "cold"  # no node for a live move: a cold one, where possible
            dest_id = _choose_dest(conn, vm_id, source, to, False, now, ctx)
        else:
            raise
    move_id = "mv-" + uuid.uuid4().hex[:16]
    plain = asdict(settings) | {"mode": mode}
    conn.execute(
        "INSERT INTO moves (id, vm_id, source, dest, mode, state, settings, drain_id, actor,"
        " vcpus, memory_mib, disk_gib, created_at, updated_at) VALUES (?, ?, ?, ?, ?,"
        " 'preparing', ?, ?, ?, ?, ?, ?, ?, ?)",
        (move_id, vm_id, node_id, dest_id, mode, json.dumps(plain), drain_id, actor, vcpus,
         memory_mib, disk_gib, now, now))
    order_id = orders.issue(conn, ctx.signer, dest_id, vm_id, "receive", now, ctx.ttl_s,
                            vm=spec, params={"mode": mode, "source": node_id},
                            move_id=move_id)
    _step(conn, move_id, "preparing", order_id, now)
    conn.execute("UPDATE vms SET state_reason = ?, updated_at = ? WHERE id = ?",
                 (f"moving to {dest_id} ({mode})", now, vm_id))
    audit(conn, now, actor, "vm.migrate", vm_id, name=name, source=node_id, dest=dest_id,
          mode=mode, move=move_id)
    return {"id": vm_id, "move": move_id, "source": node_id, "dest": dest_id, "mode": mode,
            "order": order_id}


def _step(conn: Tx, move_id: str, state: str, order_id: str | None,
          now: float) -> None:
    conn.execute("UPDATE moves SET state = ?, step_order = ?, updated_at = ? WHERE id = ?",
                 (state, order_id, now, move_id))


def _finish(conn: Tx, move_id: str, vm_id: str, state: str, error: str,
            now: float, result: dict[str, Any] | None = None) -> None:
    conn.execute("UPDATE moves SET state = ?, error = ?, finished_at = ?, updated_at = ?,"
                 " result = CASE WHEN ? IS NULL THEN result ELSE ? END WHERE id = ?",
                 (state, error, now, now, None if result is None else 1,
                  json.dumps(result or {}), move_id))
    conn.execute("UPDATE vms SET state_reason = ?, updated_at = ? WHERE id = ?",
                 (error if state == "failed" else "", now, vm_id))


@contextlib.contextmanager
def _each(conn: Tx, what: str) -> Iterator[None]:
    """One row's work in a savepoint: a row that fails (our bug, or data we did not expect)
    is rolled back and logged, and the others go on."""
    conn.execute("SAVEPOINT one_row")
    try:
        yield
    except Exception:
        conn.execute("ROLLBACK TO one_row")
        log.exception("%s failed; it is tried again at the next turn", what)
    finally:
        conn.execute("RELEASE one_row")


def advance(conn: Tx, ctx: Context, now: float) -> int:
    """Take every open move whose current order has ended one step on. Returns how many.

    An outcome nobody reported is never taken for an answer: a migrate that failed or
    expired is followed by asking the destination (``release``) whether the VM arrived, and
    that question is asked again until it is answered."""
    rows = conn.execute(
        "SELECT m.id, m.vm_id, m.source, m.dest, m.mode, m.state, m.settings, o.state,"
        " o.result, o.error FROM moves m JOIN orders o ON o.id = m.step_order"
        " WHERE m.finished_at IS NULL AND o.state IN ('succeeded', 'failed', 'expired')"
    ).fetchall()
    for row in rows:
        with _each(conn, f"move {row[0]}"):
            _advance_one(conn, ctx, now, *row)
    return len(rows)


def _advance_one(conn: Tx, ctx: Context, now: float, move_id: str, vm_id: str,
                 source: str, dest: str, mode: str, state: str, settings: str, o_state: str,
                 o_result: str, o_error: str) -> None:
    result = json.loads(o_result)
    why = o_error or ("its order expired" if o_state == "expired" else o_state)
    if mode == "restart":  # a create elsewhere: the VM's row follows the create itself
        _restart_step(conn, ctx, move_id, vm_id, source, dest, state, o_state, result, why,
                      now)
    elif state == "preparing":
        if o_state != "succeeded":
            _release(conn, ctx, vm_id, dest, move_id, now)
            _finish(conn, move_id, vm_id, "failed",
                    f"{mode} move to {dest} failed: the destination {why}", now)
            return
        address = str(result.get("address", "")).lower()
        names = _names(conn, dest)
        if (mode == "live" or result.get("disk")) and address not in names:
            _release(conn, ctx, vm_id, dest, move_id, now)
            _finish(conn, move_id, vm_id, "failed", f"{mode} move to {dest} failed: its"
                    f" migration address {address or '(none)'} is not in its certificate"
                    f" ({', '.join(names) or 'no names'})", now)
            return
        _migrate(conn, ctx, move_id, vm_id, source, dest, mode, json.loads(settings),
                 result, now)
    elif state == "migrating":
        if o_state == "succeeded":
            _arrived(conn, ctx, move_id, vm_id, source, dest, mode, result, now)
            return
        # Failed or expired: whether the VM left is for the destination to say.
        conn.execute("UPDATE moves SET error = ? WHERE id = ?",
                     (f"{mode} move to {dest} failed: {why}", move_id))
        _step(conn, move_id, "releasing", _release(conn, ctx, vm_id, dest, move_id, now), now)
    elif state == "releasing":
        (error,) = conn.execute("SELECT error FROM moves WHERE id = ?", (move_id,)).fetchone()
        if o_state == "succeeded" and result.get("present") is True:
            _arrived(conn, ctx, move_id, vm_id, source, dest, mode, {}, now)
        elif o_state == "succeeded":
            _finish(conn, move_id, vm_id, "failed", f"{error}; the VM is still on {source}",
                    now)
        elif _count(conn, move_id, "release") < MAX_ASKS:
            _step(conn, move_id, "releasing", _release(conn, ctx, vm_id, dest, move_id, now),
                  now)
        else:
            _finish(conn, move_id, vm_id, "failed", f"{error}; {dest} did not say whether the"
                    f" VM arrived ({why}): it is recorded on {source}", now)
    elif state == "adopting":
        (kept,) = conn.execute("SELECT result FROM moves WHERE id = ?", (move_id,)).fetchone()
        if o_state == "succeeded":
            conn.execute("UPDATE vms SET actual_state = ? WHERE id = ?",
                         (str(result.get("state", "unknown")), vm_id))
            _finish(conn, move_id, vm_id, "succeeded", "", now, json.loads(kept))
        elif _count(conn, move_id, "adopt") < MAX_ASKS:
            _adopt(conn, ctx, move_id, vm_id, dest, mode, now)
        else:
            _finish(conn, move_id, vm_id, "failed", f"the VM is on {dest}, which could not"
                    f" take it over: {why}", now, json.loads(kept))


def _restart_step(conn: Tx, ctx: Context, move_id: str, vm_id: str, lost: str,
                  dest: str, state: str, o_state: str, result: dict[str, Any], why: str,
                  now: float) -> None:
    """A restart's create ended, or the question after it was answered. A create that
    expired may still have been taken: the destination is asked (``release``: it never makes
    the VM from that order after answering) before the VM counts as still on the lost node,
    where it is restarted from again later."""
    if state == "migrating" and o_state == "succeeded":
        _restarted(conn, move_id, vm_id, lost, now)
    elif state == "migrating" and o_state == "failed":  # nothing was made at dest
        _back_on(conn, move_id, vm_id, lost, f"restart on {dest} failed: {why}", now)
    elif state == "migrating":  # expired: whether dest made it is for dest to say
        conn.execute("UPDATE moves SET error = ? WHERE id = ?",
                     (f"restart on {dest}: its create order expired", move_id))
        _step(conn, move_id, "releasing", _release(conn, ctx, vm_id, dest, move_id, now), now)
    elif o_state == "succeeded" and result.get("present") is True:  # it was made after all
        conn.execute("UPDATE vms SET node_id = ?, actual_state = ?, updated_at = ? WHERE id"
                     " = ?", (dest, str(result.get("state", "unknown")), now, vm_id))
        if not residency.staying(conn, vm_id, dest):
            residency.append(conn, vm_id, "arrived", dest, now)
        _restarted(conn, move_id, vm_id, lost, now)
    elif o_state == "succeeded":
        _back_on(conn, move_id, vm_id, lost, f"restart on {dest}: its create order expired"
                 f" before {dest} took it", now)
    elif _count(conn, move_id, "release") < MAX_ASKS:
        _step(conn, move_id, "releasing", _release(conn, ctx, vm_id, dest, move_id, now), now)
    else:
        _finish(conn, move_id, vm_id, "failed", f"restart on {dest}: its create order expired"
                f" and {dest} did not say whether it made the VM ({why}); the copy on {lost}"
                " is kept", now)


def _restarted(conn: Tx, move_id: str, vm_id: str, lost: str,
               now: float) -> None:
    """It runs at the destination: the lost node's copy goes when that node returns."""
    conn.execute("INSERT INTO evictions (vm_id, node_id, created_at) VALUES (?, ?, ?) ON"
                 " CONFLICT (vm_id, node_id) DO UPDATE SET done_at = NULL, order_id = NULL",
                 (vm_id, lost, now))
    _finish(conn, move_id, vm_id, "succeeded", "", now)


def _back_on(conn: Tx, move_id: str, vm_id: str, lost: str, why: str,
             now: float) -> None:
    """Nothing was made at the destination: the VM is still (paused) on the lost node, and
    is restarted from there again after ``RESTART_RETRY_S``."""
    conn.execute("UPDATE vms SET node_id = ?, actual_state = 'unknown' WHERE id = ?",
                 (lost, vm_id))
    _finish(conn, move_id, vm_id, "failed", f"{why}; the VM is still on {lost}", now)


def _count(conn: Tx, move_id: str, action: str) -> int:
    (n,) = conn.execute("SELECT count(*) FROM orders WHERE move_id = ? AND action = ?",
                        (move_id, action)).fetchone()
    return int(n)


def _names(conn: Tx, node_id: str) -> list[str]:
    row = conn.execute("SELECT alt_names FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return str(row[0]).split() if row is not None else []


def _migrate(conn: Tx, ctx: Context, move_id: str, vm_id: str, source: str,
             dest: str, mode: str, settings: dict[str, Any], prepared: dict[str, Any],
             now: float) -> None:
    node = _node_row(conn, dest)
    params: dict[str, Scalar] = {
        "vm_uuid": vm_id, "dest": dest, "mode": mode,
        "dest_country": node["country"] if node else "",
        "dest_provider": node["provider"] if node else "",
        **{k: v for k, v in prepared.items()
           if k in ("address", "domain_type", "disk", "kernel", "initrd", "serial")
           and isinstance(v, str)},
        # What the destination offers guests: the source holds the VM against it.
        **{f"dest_{k}": v for k, v in prepared.items()
           if k in ("arch", "machines", "cpu_models") and isinstance(v, str)},
        **MoveSettings(**settings).params(),
    }
    ttl = max(ctx.ttl_s, float(settings.get("timeout_s", 300)) + MIGRATE_TTL_MARGIN_S)
    order_id = orders.issue(conn, ctx.signer, source, vm_id, "migrate", now, ttl,
                            params=params, move_id=move_id)
    conn.execute("UPDATE moves SET prepared = ? WHERE id = ?", (json.dumps(prepared), move_id))
    _step(conn, move_id, "migrating", order_id, now)


def _arrived(conn: Tx, ctx: Context, move_id: str, vm_id: str, source: str,
             dest: str, mode: str, result: dict[str, Any], now: float) -> None:
    """The VM has left the source: it is the destination's now, which takes it over."""
    conn.execute("UPDATE vms SET node_id = ?, actual_state = ?, updated_at = ? WHERE id = ?",
                 (dest, "running" if mode == "live" else "pending", now, vm_id))
    residency.append(conn, vm_id, "left", source, now)
    residency.append(conn, vm_id, "arrived", dest, now)
    conn.execute("UPDATE moves SET result = ? WHERE id = ?", (json.dumps(result), move_id))
    _adopt(conn, ctx, move_id, vm_id, dest, mode, now)


def _adopt(conn: Tx, ctx: Context, move_id: str, vm_id: str, dest: str,
           mode: str, now: float) -> None:
    (desired,) = conn.execute("SELECT desired_state FROM vms WHERE id = ?", (vm_id,)).fetchone()
    order_id = orders.issue(conn, ctx.signer, dest, vm_id, "adopt", now, ctx.ttl_s,
                            params={"vm_uuid": vm_id, "mode": mode,
                                    "start": desired == "running"}, move_id=move_id)
    _step(conn, move_id, "adopting", order_id, now)


def _release(conn: Tx, ctx: Context, vm_id: str, dest: str, move_id: str,
             now: float) -> str:
    return orders.issue(conn, ctx.signer, dest, vm_id, "release", now, ctx.ttl_s,
                        params={"vm_uuid": vm_id}, move_id=move_id)


# --- reading --------------------------------------------------------------------------------

_MOVE_COLUMNS = ("m.id, m.vm_id, v.name, m.source, m.dest, m.mode, m.state, m.settings,"
                 " m.result, m.error, m.drain_id, m.actor, m.created_at, m.updated_at,"
                 " m.finished_at, o.action, o.state, o.progress")
_MOVE_FROM = ("moves m LEFT JOIN vms v ON v.id = m.vm_id"
              " LEFT JOIN orders o ON o.id = m.step_order")


def _move(row: tuple[Any, ...]) -> dict[str, Any]:
    (move_id, vm_id, name, source, dest, mode, state, settings, result, error, drain_id, actor,
     created, updated, finished, step_action, step_state, progress) = row
    return {"id": move_id, "vm": vm_id, "vm_name": name, "source": source, "dest": dest,
            "mode": mode, "state": state, "settings": json.loads(settings),
            "result": json.loads(result), "error": error, "drain": drain_id, "actor": actor,
            "created_at": created, "updated_at": updated, "finished_at": finished,
            "step": {"action": step_action, "state": step_state} if step_action else None,
            "progress": json.loads(progress) if progress and state == "migrating" else {}}


def get(conn: Tx, move_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_MOVE_COLUMNS} FROM {_MOVE_FROM} WHERE m.id = ?",
                       (move_id,)).fetchone()
    if row is None:
        return None
    out = _move(row)
    out["orders"] = [
        {"id": o, "node": n, "action": a, "state": s, "error": e}
        for o, n, a, s, e in conn.execute(
            "SELECT id, node_id, action, state, error FROM orders WHERE move_id = ?"
            " ORDER BY created_at, rowid", (move_id,))]
    return out


def list_moves(conn: Tx, vm_id: str, state: str, limit: int
               ) -> list[dict[str, Any]]:
    sql, args = f"SELECT {_MOVE_COLUMNS} FROM {_MOVE_FROM} WHERE 1", []
    if vm_id:
        sql += " AND m.vm_id = ?"
        args.append(vm_id)
    if state == "open":
        sql += " AND m.finished_at IS NULL"
    elif state:
        sql += " AND m.state = ?"
        args.append(state)
    sql += " ORDER BY m.created_at DESC LIMIT ?"
    return [_move(r) for r in conn.execute(sql, [*args, limit])]


# --- drains ---------------------------------------------------------------------------------


def drain(conn: Tx, ctx: Context, node_id: str, settings: MoveSettings,
          parallel: int, now: float, actor: str) -> dict[str, Any]:
    """Cordon the node and move every VM off it, ``parallel`` at a time (by :func:`drive`)."""
    if not 1 <= parallel <= DRAIN_PARALLEL_MAX:
        raise Refused("invalid_request", f"parallel must be from 1 to {DRAIN_PARALLEL_MAX}")
    node = _node_row(conn, node_id)
    if node is None:
        raise Refused("not_found", f"no node {node_id!r}", 404)
    running = conn.execute("SELECT id FROM drains WHERE node_id = ? AND finished_at IS NULL",
                           (node_id,)).fetchone()
    if running is not None:
        return drain_json(conn, node_id) or {}
    drain_id = "dr-" + uuid.uuid4().hex[:16]
    conn.execute("UPDATE nodes SET cordoned = 1 WHERE id = ?", (node_id,))
    conn.execute(
        "INSERT INTO drains (id, node_id, state, parallel, mode, settings, actor, created_at,"
        " updated_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
        (drain_id, node_id, parallel, settings.mode, json.dumps(asdict(settings)), actor, now,
         now))
    audit(conn, now, actor, "node.drain", node_id, drain=drain_id, parallel=parallel,
          mode=settings.mode)
    drive(conn, ctx, now)
    return drain_json(conn, node_id) or {}


def drive(conn: Tx, ctx: Context, now: float) -> int:
    """Start the next moves of every running drain; end the drains with nothing left to try.
    Returns how many moves were started."""
    started = 0
    for drain_id, node_id, parallel, settings, actor in conn.execute(
            "SELECT id, node_id, parallel, settings, actor FROM drains WHERE finished_at IS"
            " NULL").fetchall():
        with _each(conn, f"drain {drain_id}"):
            started += _drive_one(conn, ctx, now, drain_id, node_id, parallel,
                                  MoveSettings(**json.loads(settings)), actor)
    return started


def _drive_one(conn: Tx, ctx: Context, now: float, drain_id: str,
               node_id: str, parallel: int, settings: MoveSettings, actor: str) -> int:
    def in_drain(condition: str) -> set[str]:
        return {vm for (vm,) in conn.execute(
            f"SELECT vm_id FROM moves WHERE drain_id = ? AND {condition}", (drain_id,))}

    def here() -> list[str]:
        return [vm for (vm,) in conn.execute(
            "SELECT id FROM vms WHERE node_id = ? AND deleted_at IS NULL ORDER BY name",
            (node_id,))]

    moving, failed = in_drain("finished_at IS NULL"), in_drain("state = 'failed'")
    waiting = [vm for vm in here() if vm not in moving and vm not in failed]
    started = 0
    for vm_id in waiting[:max(parallel - len(moving), 0)]:
        try:
            start(conn, ctx, vm_id, "", settings, now, actor, drain_id)
            started += 1
        except Refused as exc:  # recorded as a failed move: the drain reports it
            if exc.code in ("busy", "moving", "source_offline"):
                continue  # its turn comes later (its own order ends, its node is back)
            conn.execute(
                "INSERT INTO moves (id, vm_id, source, mode, state, settings, error, drain_id,"
                " actor, created_at, updated_at, finished_at) VALUES (?, ?, ?, ?, 'failed', ?,"
                " ?, ?, ?, ?, ?, ?)",
                ("mv-" + uuid.uuid4().hex[:16], vm_id, node_id, settings.mode,
                 json.dumps(asdict(settings)), str(exc), drain_id, actor, now, now, now))
    if in_drain("finished_at IS NULL"):
        return started
    left = here()
    if not left:  # empty, and every VM taken over where it went
        state = "done"
    elif set(left) <= in_drain("state = 'failed'"):
        state = "incomplete"
    else:
        return started
    conn.execute("UPDATE drains SET state = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                 (state, now, now, drain_id))
    audit(conn, now, actor, "node.drain." + state, node_id, drain=drain_id, left=len(left))
    return started


def drain_json(conn: Tx, node_id: str) -> dict[str, Any] | None:
    """The node's latest drain with each VM's account: moved, moving, failed (and why), or
    waiting for its turn."""
    row = conn.execute(
        "SELECT id, state, parallel, mode, actor, created_at, updated_at, finished_at FROM"
        " drains WHERE node_id = ? ORDER BY created_at DESC LIMIT 1", (node_id,)).fetchone()
    if row is None:
        return None
    drain_id, state, parallel, mode, actor, created, updated, finished = row
    vms_out: dict[str, dict[str, Any]] = {}
    for move in conn.execute(f"SELECT {_MOVE_COLUMNS} FROM {_MOVE_FROM} WHERE m.drain_id = ?"
                             " ORDER BY m.created_at", (drain_id,)):
        m = _move(move)
        vms_out[m["vm"]] = {"vm": m["vm"], "name": m["vm_name"], "move": m["id"],
                            "dest": m["dest"], "mode": m["mode"],
                            "state": {"succeeded": "moved", "failed": "failed"}.get(
                                m["state"], "moving"),
                            "error": m["error"], "progress": m["progress"]}
    for vm_id, name in conn.execute("SELECT id, name FROM vms WHERE node_id = ? AND deleted_at"
                                    " IS NULL ORDER BY name", (node_id,)):
        vms_out.setdefault(vm_id, {"vm": vm_id, "name": name, "move": None, "dest": "",
                                   "mode": "", "state": "waiting", "error": "",
                                   "progress": {}})
    listed = sorted(vms_out.values(), key=lambda v: (v["name"] or "", v["vm"]))
    left = conn.execute("SELECT count(*) FROM vms WHERE node_id = ? AND deleted_at IS NULL",
                        (node_id,)).fetchone()[0]
    return {"id": drain_id, "node": node_id, "state": state, "parallel": parallel,
            "mode": mode, "actor": actor, "created_at": created, "updated_at": updated,
            "finished_at": finished, "vms_left": left, "vms": listed,
            "failed": [v for v in listed if v["state"] == "failed"]}


# --- node loss ------------------------------------------------------------------------------


def restart_lost(conn: Tx, ctx: Context, now: float, grace_s: float,
                 watching_since: float | None) -> list[str]:
    """Create elsewhere the VMs that asked for it (``on_node_loss: restart``) whose node has
    been silent past its own lease plus ``grace_s``: by then the node has paused them itself
    (and will not resume them). Silence counts only from ``watching_since``, when this
    aggregator last began to hear the broker (None: it does not now): a node is not lost
    because the aggregator was away. A node that never said it fences (lease 0) is never
    given up on: its VMs could still be running. Returns the VMs restarted."""
    if watching_since is None:
        return []
    done: list[str] = []
    rows = conn.execute(
        "SELECT v.id, v.name, v.node_id, n.last_seen, n.lease_s, v.state_reason FROM vms v"
        " JOIN nodes n ON n.id = v.node_id WHERE v.deleted_at IS NULL AND v.desired_state ="
        " 'running' AND v.on_node_loss = 'restart' AND n.lease_s > 0 AND n.last_seen IS NOT"
        " NULL AND ? - max(n.last_seen, ?) > n.lease_s + ? AND NOT EXISTS (SELECT 1 FROM"
        " moves m WHERE m.vm_id = v.id AND (m.finished_at IS NULL OR (m.mode = 'restart' AND"
        " m.finished_at > ?))) AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.vm_id = v.id"
        " AND o.node_id = v.node_id AND o.action = 'create' AND o.state IN ('pending',"
        " 'sent', 'accepted'))",
        (now, watching_since, grace_s, now - RESTART_RETRY_S)).fetchall()
    for vm_id, name, lost, last_seen, lease_s, reason in rows:
        with _each(conn, f"restarting {vm_id}"):
            if _restart(conn, ctx, now, vm_id, name, lost, last_seen, lease_s, reason):
                done.append(vm_id)
    return done


def _restart(conn: Tx, ctx: Context, now: float, vm_id: str, name: str,
             lost: str, last_seen: float, lease_s: float, reason: str) -> bool:
    node = _node_row(conn, lost)
    if node is None or _online(node, now, ctx.live):
        return False
    try:
        dest = _choose_dest(conn, vm_id, node, "", False, now, ctx)
    except Refused as exc:
        note = f"its node {lost} is lost; no node can take it: {exc}"
        if reason != note:
            conn.execute("UPDATE vms SET state_reason = ? WHERE id = ?", (note, vm_id))
        return False
    spec = vms.spec_of(conn, vm_id)
    # What was still to go to the lost node for this VM never goes: it is elsewhere now.
    for (order_id,) in conn.execute(
            "SELECT id FROM orders WHERE vm_id = ? AND node_id = ? AND state IN ('pending',"
            " 'sent', 'accepted')", (vm_id, lost)).fetchall():
        orders.supersede(conn, order_id, now, f"the VM was restarted on {dest}")
    move_id = "mv-" + uuid.uuid4().hex[:16]
    conn.execute(
        "INSERT INTO moves (id, vm_id, source, dest, mode, state, actor, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, 'restart', 'migrating', 'aggregator', ?, ?)",
        (move_id, vm_id, lost, dest, now, now))
    conn.execute(
        "UPDATE vms SET node_id = ?, actual_state = 'pending', state_reason = ?,"
        " updated_at = ? WHERE id = ?",
        (dest, f"restarted on {dest}: {lost} silent for {now - last_seen:.0f} s (lease"
         f" {lease_s:g} s)", now, vm_id))
    order_id = orders.issue(conn, ctx.signer, dest, vm_id, "create", now, ctx.ttl_s,
                            vm=spec, move_id=move_id)
    _step(conn, move_id, "migrating", order_id, now)
    audit(conn, now, "aggregator", "vm.restart", vm_id, name=name, lost=lost, dest=dest,
          silent_s=round(now - last_seen), move=move_id)
    return True


def evict(conn: Tx, ctx: Context, now: float) -> int:
    """A lost node that is back removes the VMs restarted elsewhere meanwhile (it paused them
    and never resumes them). Its residency stay ends when its copy is gone."""
    for vm_id, node_id in conn.execute(
            "SELECT e.vm_id, e.node_id FROM evictions e JOIN orders o ON o.id = e.order_id"
            " WHERE e.done_at IS NULL AND o.state = 'succeeded'").fetchall():
        conn.execute("UPDATE evictions SET done_at = ? WHERE vm_id = ? AND node_id = ?",
                     (now, vm_id, node_id))
        residency.append(conn, vm_id, "left", node_id, now)
    issued = 0
    for vm_id, node_id in conn.execute(
            "SELECT e.vm_id, e.node_id FROM evictions e JOIN nodes n ON n.id = e.node_id"
            " LEFT JOIN orders o ON o.id = e.order_id WHERE e.done_at IS NULL AND"
            " n.reported_status = 'online' AND n.revoked_at IS NULL AND (o.id IS NULL OR"
            " (o.state IN ('failed', 'expired') AND o.updated_at < ?))",
            (now - EVICT_RETRY_S,)).fetchall():
        order_id = orders.issue(conn, ctx.signer, node_id, vm_id, "evict", now, ctx.ttl_s,
                                params={"vm_uuid": vm_id})
        conn.execute("UPDATE evictions SET order_id = ? WHERE vm_id = ? AND node_id = ?",
                     (order_id, vm_id, node_id))
        audit(conn, now, "aggregator", "vm.evict", vm_id, node=node_id, order=order_id)
        issued += 1
    return issued
