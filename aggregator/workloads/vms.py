"""Virtual machines: requests checked, placed and turned into signed orders, in one transaction.

Placement and the order that follows run on the store's writer thread, so what one request
commits is counted by the next: two concurrent requests never overbook a node. A VM's
``desired_state`` is what the operator asked; its ``actual_state`` comes from the node
(order results and libvirt lifecycle events), never guessed. VMs are read and written through
:mod:`aggregator.store.vms` (and images looked up through :mod:`aggregator.store.images`); this
module decides.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from aggregator.errors import Refused, body_of
from aggregator.fleet import telemetry as fleet
from aggregator.store import images as stored_images
from aggregator.store import moves as moves_repo
from aggregator.store import vms as repo
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.trust.pki import OrderSigner
from aggregator.workloads import orders
from aggregator.workloads.placement import Demand, Policy, load_nodes, place, shortlist
from contract.orders import PARAMS, CreateParams, StartParams
from contract.profiles import Profile
from contract.wire import VmSpec, to_plain
from plumbing.shapes import Rule

VM_NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
UUID_SHAPE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RECONCILE_COOLDOWN_S: Final = 60.0  # a VM paused again after a start is left a minute
ACTIONS: Final = {"start": "running", "stop": "stopped", "reboot": "running",
                  "delete": "deleted"}
NOT_RUNNING: Final = ("paused", "shut off", "crashed")  # states a reconcile starts again from


@dataclass(frozen=True)
class Liveness:
    heartbeat_factor: float
    min_timeout_s: float


_BOOT_KEYS: Final = frozenset({"image", "kernel", "initrd", "cmdline"})
_BOOT_MUST: Final = '{"image": NAME} or {"kernel": NAME, "initrd": NAME, "cmdline": TEXT}'
_NAME_MUST: Final = "a lower-case DNS label (a-z, 0-9, -; at most 63 characters)"
_SHORT: Final = Rule(max_length=128, must="a short string")


@dataclass(frozen=True)
class BootBody:
    """How a VM boots: from a disk image, or from a kernel (with an initrd and a command
    line)."""

    image: Annotated[str | None, _SHORT] = None
    kernel: Annotated[str | None, _SHORT] = None
    initrd: Annotated[str | None, _SHORT] = None
    cmdline: Annotated[str | None, Rule(max_length=1024, must="a short string")] = None


@dataclass(frozen=True)
class VmBody:
    """``POST /api/v1/vms`` (and the placement dry run): the shape that reads the body and
    describes it in openapi.json. ``placement`` is read by :meth:`Policy.from_json`, which
    also refuses keys it does not know."""

    name: Annotated[str, Rule(pattern=VM_NAME.pattern, must=_NAME_MUST, code="invalid_name",
                              description="unique among the fleet's VMs")]
    vcpus: Annotated[int, Rule(minimum=1, maximum=64)]
    memory_mib: Annotated[int, Rule(minimum=64, maximum=1 << 20)]
    disk_gib: Annotated[int, Rule(minimum=0, maximum=1 << 16)] = 0
    boot: Annotated[BootBody, Rule(must=_BOOT_MUST)] = BootBody()
    placement: Any = None
    on_node_loss: Annotated[Literal["wait", "restart"], Rule(
        must='"wait" (for the node to return) or "restart" (elsewhere, once the lost node'
             ' has stopped it)',
        description="restart: elsewhere, once the lost node has stopped it")] = "wait"


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
        """The request in a ``POST /api/v1/vms`` body (its shape: :class:`VmBody`); Refused,
        naming the field, otherwise."""
        vm = body_of(VmBody, body)
        if UUID_SHAPE.fullmatch(vm.name):  # VMs are found by id or name: a name is never an id
            raise Refused("invalid_name", "name must not have the shape of a VM id (a UUID)")
        raw_boot = body.get("boot")
        if isinstance(raw_boot, dict) and not set(raw_boot) <= _BOOT_KEYS:
            raise Refused("invalid_request", f"boot must be {_BOOT_MUST}")
        boot = {key: getattr(vm.boot, key) or "" for key in _BOOT_KEYS}
        if any(not (32 <= ord(ch) < 127) for ch in boot["cmdline"]):
            raise Refused("invalid_request", "boot.cmdline must be printable ASCII")
        if boot["image"] and boot["kernel"]:
            raise Refused("invalid_request", "boot from an image or a kernel, not both")
        if boot["initrd"] and not boot["kernel"]:
            raise Refused("invalid_request", "boot.initrd needs boot.kernel")
        try:
            policy = Policy.from_json(vm.placement)
        except ValueError as exc:
            raise Refused("invalid_placement", f"placement: {exc}") from None
        return cls(vm.name, vm.vcpus, vm.memory_mib, vm.disk_gib, boot["image"],
                   boot["kernel"], boot["initrd"], boot["cmdline"], policy, vm.on_node_loss)

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
    image = stored_images.find_image(conn, name)
    if image is None:
        raise Refused("unknown_image", f"no image {name!r}: register it (POST /api/v1/images)",
                      400)
    if image.format not in _BOOT_FORMATS[role]:
        raise Refused("wrong_image_format", f"boot.{role}: {name!r} is a {image.format} image,"
                      f" not {' or '.join(_BOOT_FORMATS[role])}")
    return image.sha256


def create(conn: Tx, signer: OrderSigner, req: VmRequest, now: float,
           profiles: Mapping[str, Profile], live: Liveness, ttl_s: float,
           actor: str) -> dict[str, Any]:
    """Place the VM and order it created there; 409 with every node's reasons if it fits
    nowhere."""
    if repo.name_in_use(conn, req.name):
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
    repo.insert_vm(conn, repo.NewVm(
        id=vm_id, name=req.name, node_id=node_id, vcpus=req.vcpus, memory_mib=req.memory_mib,
        disk_gib=req.disk_gib, request=req.to_json(), spec=to_plain(spec),
        anti_affinity=p.anti_affinity, on_node_loss=req.on_node_loss,
        desired_state="running", actual_state="pending", created_at=now))
    order_id = orders.issue(conn, signer, node_id, vm_id, CreateParams(), now, ttl_s, vm=spec)
    audit(conn, now, actor, "vm.create", vm_id, name=req.name, node=node_id, order=order_id)
    return {"id": vm_id, "node": node_id, "order": order_id}


def act(conn: Tx, signer: OrderSigner, vm_id: str, action: str, now: float,
        ttl_s: float, actor: str) -> dict[str, Any]:
    vm = repo.vm_state(conn, vm_id)
    if vm is None:
        raise Refused("not_found", f"no VM {vm_id!r}", 404)
    node_id = vm.node_id
    moving = moves_repo.open_move(conn, vm_id)
    if moving is not None:
        raise Refused("moving", f"the VM is being moved ({moving}): try again when the"
                      " move ends", 409)
    if node_id is None:  # its create failed: nothing runs anywhere
        if action == "delete":
            repo.mark_deleted(conn, vm_id, now)
            audit(conn, now, actor, "vm.delete", vm_id)
            return {"id": vm_id, "node": None, "order": None}
        raise Refused("not_placed", "the VM is on no node (its creation failed): delete it",
                      409)
    if vm.desired_state == "deleted":
        last = repo.last_order(conn, vm_id, "delete")
        if last is not None and last.state not in ("failed", "expired"):
            if action == "delete":  # asked again while it runs: the same order
                return {"id": vm_id, "node": node_id, "order": last.id}
            raise Refused("deleting", "the VM is being deleted", 409)
        # The last delete failed or expired: any order may follow, a delete again included.
    what = PARAMS[action](vm_uuid=vm_id)  # type: ignore[call-arg]  # start/stop/reboot/delete
    order_id = orders.issue(conn, signer, node_id, vm_id, what, now, ttl_s)
    repo.set_desired_state(conn, vm_id, ACTIONS[action], now)
    audit(conn, now, actor, f"vm.{action}", vm_id, node=node_id, order=order_id)
    return {"id": vm_id, "node": node_id, "order": order_id}


def _node_online(row: repo.VmRow, now: float, live: Liveness) -> bool:
    if row.node_reported_status is None or row.node_interval_s is None:  # the node has gone
        return False
    return fleet.node_status(row.node_reported_status, row.node_last_seen, row.node_interval_s,
                             now, live.heartbeat_factor, live.min_timeout_s) == "online"


def _vm(row: repo.VmRow, now: float, live: Liveness) -> dict[str, Any]:
    actual, reason = row.actual_state, row.state_reason
    if row.node_id is not None and actual != "deleted":
        # What the node last said is only as good as the node: one that stopped reporting
        # (or was revoked) cannot vouch for its VMs.
        if row.node_revoked_at is not None:
            actual, reason = "unknown", f"on a revoked node (last known: {actual})"
        elif not _node_online(row, now, live):
            actual, reason = "unknown", f"its node is offline (last known: {actual})"
    return {"id": row.id, "name": row.name, "node": row.node_id, "vcpus": row.vcpus,
            "memory_mib": row.memory_mib, "disk_gib": row.disk_gib, "spec": row.request,
            "desired_state": row.desired_state, "actual_state": actual,
            "state_reason": reason, "created_at": row.created_at,
            "updated_at": row.updated_at}


def get(conn: Tx, vm_id: str, now: float, live: Liveness
        ) -> dict[str, Any] | None:
    row = repo.find_vm(conn, vm_id)
    if row is None:
        return None
    vm = _vm(row, now, live)
    vm["orders"] = orders.list_orders(conn, "", vm["id"], "", 50)
    return vm


def list_vms(conn: Tx, node: str, now: float, live: Liveness
             ) -> list[dict[str, Any]]:
    return [_vm(r, now, live) for r in repo.live_vms(conn, node or None)]


def reconcile(conn: Tx, signer: OrderSigner, now: float, live: Liveness,
              ttl_s: float) -> list[str]:
    """Orders that bring what runs back to what is desired, for VMs with no open order or
    move on an online node: a VM that should run and does not (paused by its node, cut off
    past its lease; off after a host restart or a failed cold move; stopped by its guest) is
    started again, at most once a minute. Returns the orders issued."""
    issued = []
    idle = repo.idle_vms(conn, actual_states=NOT_RUNNING, open_order_states=orders.OPEN,
                         no_start_since=now - RECONCILE_COOLDOWN_S)
    for vm in idle:
        if fleet.node_status(vm.node_reported_status, vm.node_last_seen, vm.node_interval_s,
                             now, live.heartbeat_factor, live.min_timeout_s) != "online":
            continue
        order_id = orders.issue(conn, signer, vm.node_id, vm.id, StartParams(vm_uuid=vm.id),
                                now, ttl_s)
        audit(conn, now, "aggregator", "vm.reconcile", vm.id, node=vm.node_id, order=order_id,
              reason="not running, should run")
        issued.append(order_id)
    return issued


def _specs(conn: Tx, vm_id: str) -> repo.VmSpecs:
    specs = repo.vm_specs(conn, vm_id)
    if specs is None:  # callers pass a VM they found: our bug
        raise LookupError(f"no VM {vm_id!r}")
    return specs


def spec_of(conn: Tx, vm_id: str) -> VmSpec:
    """The VmSpec a VM was ordered with (for a move or a restart elsewhere)."""
    fields = _specs(conn, vm_id).spec
    if fields is None:
        raise Refused("no_spec", "the VM was created before this aggregator kept VM specs:"
                      " it cannot be moved", 409)
    fields = dict(fields)
    for name in ("countries", "providers"):
        fields[name] = tuple(fields.get(name, ()))
    return VmSpec(**fields)


def request_of(conn: Tx, vm_id: str) -> VmRequest:
    return VmRequest.from_json(_specs(conn, vm_id).request)


def resolve(conn: Tx, ref: str) -> str:
    """A VM's id from its id or its name; 404 otherwise."""
    vm_id = repo.live_vm_id(conn, ref)
    if vm_id is None:
        raise Refused("not_found", f"no VM {ref!r}", 404)
    return vm_id


def resolve_any(conn: Tx, ref: str) -> str | None:
    """The id of the newest VM with id or name ``ref``, deleted or not (its residency record
    outlives it); None if there never was one."""
    return repo.newest_vm_id(conn, ref)
