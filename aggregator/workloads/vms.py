"""Virtual machines: requests checked, placed and turned into signed orders, in one transaction.

Placement and the order that follows run on the store's writer thread, so what one request
commits is counted by the next: two concurrent requests never overbook a node. A VM's
``desired_state`` is what the operator asked; its ``actual_state`` comes from the node
(order results and libvirt lifecycle events), never guessed.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aggregator.errors import Refused
from aggregator.fleet import telemetry as fleet
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.trust.pki import OrderSigner
from aggregator.workloads import orders
from aggregator.workloads.placement import Demand, Policy, load_nodes, place, shortlist
from contract.profiles import Profile
from contract.wire import VmSpec, to_plain

VM_NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
UUID_SHAPE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RECONCILE_COOLDOWN_S: Final = 60.0  # a VM paused again after a start is left a minute
ACTIONS: Final = {"start": "running", "stop": "stopped", "reboot": "running",
                  "delete": "deleted"}


@dataclass(frozen=True)
class Liveness:
    heartbeat_factor: float
    min_timeout_s: float


@dataclass(frozen=True)
class VmRequest:
    name: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    image: str
    kernel: str
    initrd: str
    cmdline: str
    policy: Policy
    on_node_loss: str = "wait"  # or "restart": elsewhere, once it is safe

    @classmethod
    def from_json(cls, body: Any) -> VmRequest:
        if not isinstance(body, dict):
            raise Refused("invalid_request", "body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not VM_NAME.fullmatch(name):
            raise Refused("invalid_name", "name must be a lower-case DNS label (a-z, 0-9, -;"
                          " at most 63 characters)")
        if UUID_SHAPE.fullmatch(name):  # VMs are found by id or name: a name is never an id
            raise Refused("invalid_name", "name must not have the shape of a VM id (a UUID)")

        def integer(key: str, low: int, high: int, default: int | None = None) -> int:
            value = body.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise Refused("invalid_request", f"{key} must be an integer from {low} to {high}")
            return value

        vcpus = integer("vcpus", 1, 64)
        memory = integer("memory_mib", 64, 1 << 20)
        disk = integer("disk_gib", 0, 1 << 16, 0)
        boot = body.get("boot", {})
        if not isinstance(boot, dict) or not set(boot) <= {"image", "kernel", "initrd",
                                                            "cmdline"}:
            raise Refused("invalid_request", 'boot must be {"image": NAME} or {"kernel": NAME,'
                          ' "initrd": NAME, "cmdline": TEXT}')
        fields = {}
        for key in ("image", "kernel", "initrd", "cmdline"):
            value = boot.get(key) or ""
            if not isinstance(value, str) or len(value) > (1024 if key == "cmdline" else 128):
                raise Refused("invalid_request", f"boot.{key} must be a short string")
            fields[key] = value
        if any(not (32 <= ord(ch) < 127) for ch in fields["cmdline"]):
            raise Refused("invalid_request", "boot.cmdline must be printable ASCII")
        if fields["image"] and fields["kernel"]:
            raise Refused("invalid_request", "boot from an image or a kernel, not both")
        if fields["initrd"] and not fields["kernel"]:
            raise Refused("invalid_request", "boot.initrd needs boot.kernel")
        try:
            policy = Policy.from_json(body.get("placement", {}))
        except ValueError as exc:
            raise Refused("invalid_placement", f"placement: {exc}") from None
        on_loss = body.get("on_node_loss", "wait")
        if on_loss not in ("wait", "restart"):
            raise Refused("invalid_request", 'on_node_loss must be "wait" (for the node to'
                          ' return) or "restart" (elsewhere, once the lost node has stopped it)')
        return cls(name, vcpus, memory, disk, fields["image"], fields["kernel"],
                   fields["initrd"], fields["cmdline"], policy, on_loss)

    def demand(self) -> Demand:
        return Demand(self.vcpus, self.memory_mib, self.disk_gib, self.policy)

    def to_json(self) -> dict[str, Any]:
        p = self.policy
        return {
            "name": self.name, "vcpus": self.vcpus, "memory_mib": self.memory_mib,
            "disk_gib": self.disk_gib,
            "boot": {k: v for k, v in (("image", self.image), ("kernel", self.kernel),
                                       ("initrd", self.initrd), ("cmdline", self.cmdline)) if v},
            "placement": {"countries": list(p.countries), "providers": list(p.providers),
                          "sites": list(p.sites), "labels": dict(p.labels),
                          "profile": p.profile, "anti_affinity": p.anti_affinity},
            "on_node_loss": self.on_node_loss,
        }


def dry_run(conn: Tx, req: VmRequest, now: float,
            profiles: Mapping[str, Profile], live: Liveness) -> dict[str, Any]:
    demand = req.demand()
    nodes = load_nodes(conn, demand, now=now, profiles=profiles,  # every node, with reasons
                       heartbeat_factor=live.heartbeat_factor, min_timeout_s=live.min_timeout_s,
                       push_down=False)
    return place(demand, nodes).to_json()


_BOOT_FORMATS: Final = {"image": ("raw", "qcow2"), "kernel": ("kernel",),
                        "initrd": ("initrd",)}


def _image(conn: Tx, name: str, role: str) -> str:
    if not name:
        return ""
    row = conn.execute("SELECT sha256, format FROM images WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise Refused("unknown_image", f"no image {name!r}: register it (POST /api/v1/images)",
                      400)
    if row[1] not in _BOOT_FORMATS[role]:
        raise Refused("wrong_image_format", f"boot.{role}: {name!r} is a {row[1]} image, not"
                      f" {' or '.join(_BOOT_FORMATS[role])}")
    return str(row[0])


def create(conn: Tx, signer: OrderSigner, req: VmRequest, now: float,
           profiles: Mapping[str, Profile], live: Liveness, ttl_s: float,
           actor: str) -> dict[str, Any]:
    """Place the VM and order it created there; 409 with every node's reasons if it fits
    nowhere."""
    if conn.execute("SELECT 1 FROM vms WHERE name = ? AND deleted_at IS NULL",
                    (req.name,)).fetchone():
        raise Refused("name_taken", f"a VM named {req.name!r} exists", 409)
    digests = {key: _image(conn, getattr(req, key), key) for key in ("image", "kernel", "initrd")}
    demand = req.demand()
    nodes = shortlist(conn, demand, now=now, profiles=profiles,
                      heartbeat_factor=live.heartbeat_factor, min_timeout_s=live.min_timeout_s)
    decision = place(demand, nodes)  # the rules decide among the best few SQL found
    if not decision.candidates:  # explain it with every node
        raise Refused("no_placement", f"no node can take {req.name!r}", 409,
                      detail=dry_run(conn, req, now, profiles, live))
    node_id = decision.candidates[0][0]
    vm_id = str(uuid.uuid4())
    p = req.policy
    spec = VmSpec(
        uuid=vm_id, name=req.name, vcpus=req.vcpus, memory_mib=req.memory_mib,
        disk_gib=req.disk_gib, image=req.image, image_sha256=digests["image"],
        kernel=req.kernel, kernel_sha256=digests["kernel"], initrd=req.initrd,
        initrd_sha256=digests["initrd"], cmdline=req.cmdline,
        countries=p.countries, providers=p.providers,
    )
    conn.execute(
        "INSERT INTO vms (id, name, node_id, vcpus, memory_mib, disk_gib, spec, anti_affinity,"
        " desired_state, actual_state, created_at, updated_at, vm_spec, on_node_loss) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, 'running', 'pending', ?, ?, ?, ?)",
        (vm_id, req.name, node_id, req.vcpus, req.memory_mib, req.disk_gib,
         json.dumps(req.to_json()), p.anti_affinity, now, now, json.dumps(to_plain(spec)),
         req.on_node_loss),
    )
    order_id = orders.issue(conn, signer, node_id, vm_id, "create", now, ttl_s, vm=spec)
    audit(conn, now, actor, "vm.create", vm_id, name=req.name, node=node_id, order=order_id)
    return {"id": vm_id, "node": node_id, "order": order_id}


def act(conn: Tx, signer: OrderSigner, vm_id: str, action: str, now: float,
        ttl_s: float, actor: str) -> dict[str, Any]:
    row = conn.execute("SELECT node_id, desired_state FROM vms WHERE id = ? AND deleted_at IS"
                       " NULL", (vm_id,)).fetchone()
    if row is None:
        raise Refused("not_found", f"no VM {vm_id!r}", 404)
    node_id, desired = row
    moving = conn.execute("SELECT id FROM moves WHERE vm_id = ? AND finished_at IS NULL",
                          (vm_id,)).fetchone()
    if moving is not None:
        raise Refused("moving", f"the VM is being moved ({moving[0]}): try again when the"
                      " move ends", 409)
    if node_id is None:  # its create failed: nothing runs anywhere
        if action == "delete":
            conn.execute("UPDATE vms SET desired_state = 'deleted', deleted_at = ?,"
                         " actual_state = 'deleted', updated_at = ? WHERE id = ?",
                         (now, now, vm_id))
            audit(conn, now, actor, "vm.delete", vm_id)
            return {"id": vm_id, "node": None, "order": None}
        raise Refused("not_placed", "the VM is on no node (its creation failed): delete it",
                      409)
    if desired == "deleted":
        last = conn.execute(
            "SELECT id, state FROM orders WHERE vm_id = ? AND action = 'delete' ORDER BY seq"
            " DESC LIMIT 1", (vm_id,)).fetchone()
        if last is not None and last[1] not in ("failed", "expired"):
            if action == "delete":  # asked again while it runs: the same order
                return {"id": vm_id, "node": node_id, "order": last[0]}
            raise Refused("deleting", "the VM is being deleted", 409)
        # The last delete failed or expired: any order may follow, a delete again included.
    order_id = orders.issue(conn, signer, node_id, vm_id, action, now, ttl_s,
                            params={"vm_uuid": vm_id})
    conn.execute("UPDATE vms SET desired_state = ?, updated_at = ? WHERE id = ?",
                 (ACTIONS[action], now, vm_id))
    audit(conn, now, actor, f"vm.{action}", vm_id, node=node_id, order=order_id)
    return {"id": vm_id, "node": node_id, "order": order_id}


_VM_COLUMNS = ("v.id, v.name, v.node_id, v.vcpus, v.memory_mib, v.disk_gib, v.spec,"
               " v.desired_state, v.actual_state, v.state_reason, v.created_at, v.updated_at,"
               " n.reported_status, n.last_seen, n.interval_s, n.revoked_at")
_VM_FROM = "vms v LEFT JOIN nodes n ON n.id = v.node_id"


def _vm(row: tuple[Any, ...], now: float, live: Liveness) -> dict[str, Any]:
    (vm_id, name, node, vcpus, memory, disk, spec, desired, actual, reason, created,
     updated, reported, last_seen, interval_s, revoked_at) = row
    if node is not None and actual != "deleted":
        # What the node last said is only as good as the node: one that stopped reporting
        # (or was revoked) cannot vouch for its VMs.
        if revoked_at is not None:
            actual, reason = "unknown", f"on a revoked node (last known: {actual})"
        elif fleet.node_status(reported, last_seen, interval_s, now, live.heartbeat_factor,
                               live.min_timeout_s) != "online":
            actual, reason = "unknown", f"its node is offline (last known: {actual})"
    return {"id": vm_id, "name": name, "node": node, "vcpus": vcpus, "memory_mib": memory,
            "disk_gib": disk, "spec": json.loads(spec), "desired_state": desired,
            "actual_state": actual, "state_reason": reason, "created_at": created,
            "updated_at": updated}


def get(conn: Tx, vm_id: str, now: float, live: Liveness
        ) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_VM_COLUMNS} FROM {_VM_FROM} WHERE (v.id = ? OR v.name = ?)"
                       " AND v.deleted_at IS NULL ORDER BY v.created_at DESC LIMIT 1",
                       (vm_id, vm_id)).fetchone()
    if row is None:
        return None
    vm = _vm(row, now, live)
    vm["orders"] = orders.list_orders(conn, "", vm["id"], "", 50)
    return vm


def list_vms(conn: Tx, node: str, now: float, live: Liveness
             ) -> list[dict[str, Any]]:
    sql = f"SELECT {_VM_COLUMNS} FROM {_VM_FROM} WHERE v.deleted_at IS NULL"
    args: list[Any] = []
    if node:
        sql += " AND v.node_id = ?"
        args.append(node)
    return [_vm(r, now, live) for r in conn.execute(sql + " ORDER BY v.name", args)]


def reconcile(conn: Tx, signer: OrderSigner, now: float, live: Liveness,
              ttl_s: float) -> list[str]:
    """Orders that bring what runs back to what is desired, for VMs with no open order or
    move on an online node: a VM that should run and does not (paused by its node, cut off
    past its lease; off after a host restart or a failed cold move; stopped by its guest) is
    started again, at most once a minute. Returns the orders issued."""
    issued = []
    rows = conn.execute(
        "SELECT v.id, v.node_id, n.reported_status, n.last_seen, n.interval_s FROM vms v"
        " JOIN nodes n ON n.id = v.node_id WHERE v.deleted_at IS NULL AND v.desired_state ="
        " 'running' AND v.actual_state IN ('paused', 'shut off', 'crashed') AND"
        " n.revoked_at IS NULL AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.vm_id = v.id"
        " AND (o.state IN ('pending', 'sent', 'accepted') OR (o.action = 'start' AND"
        " o.created_at > ?))) AND NOT EXISTS (SELECT 1 FROM moves m WHERE m.vm_id = v.id AND"
        " m.finished_at IS NULL)",
        (now - RECONCILE_COOLDOWN_S,)).fetchall()
    for vm_id, node_id, reported, last_seen, interval_s in rows:
        if fleet.node_status(reported, last_seen, interval_s, now, live.heartbeat_factor,
                             live.min_timeout_s) != "online":
            continue
        order_id = orders.issue(conn, signer, node_id, vm_id, "start", now, ttl_s,
                                params={"vm_uuid": vm_id})
        audit(conn, now, "aggregator", "vm.reconcile", vm_id, node=node_id, order=order_id,
              reason="not running, should run")
        issued.append(order_id)
    return issued


def spec_of(conn: Tx, vm_id: str) -> VmSpec:
    """The VmSpec a VM was ordered with (for a move or a restart elsewhere)."""
    (plain,) = conn.execute("SELECT vm_spec FROM vms WHERE id = ?", (vm_id,)).fetchone()
    if plain is None:
        raise Refused("no_spec", "the VM was created before this aggregator kept VM specs:"
                      " it cannot be moved", 409)
    fields = json.loads(plain)
    for name in ("countries", "providers"):
        fields[name] = tuple(fields.get(name, ()))
    return VmSpec(**fields)


def request_of(conn: Tx, vm_id: str) -> VmRequest:
    (spec,) = conn.execute("SELECT spec FROM vms WHERE id = ?", (vm_id,)).fetchone()
    return VmRequest.from_json(json.loads(spec))


def resolve(conn: Tx, ref: str) -> str:
    """A VM's id from its id or its name; 404 otherwise."""
    row = conn.execute("SELECT id FROM vms WHERE (id = ? OR name = ?) AND deleted_at IS NULL",
                       (ref, ref)).fetchone()
    if row is None:
        raise Refused("not_found", f"no VM {ref!r}", 404)
    return str(row[0])
