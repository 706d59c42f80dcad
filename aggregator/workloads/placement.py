"""Placement: where a VM may run and where it should, as pure functions over plain data.

``place(demand, nodes)`` filters every node through the :data:`RULES` table, scores the nodes
that pass, and returns a :class:`Decision`: the candidates, best first, and every rejected node
with *every* rule it fails (not just the first), each as a short human reason naming the rule
and the figures (``"memory: needs 4096 MiB, 1024 MiB free of 14336"``).

Capacity is what the profile leaves for guests (the host minus ``[reserved]``); committed is
every VM placed on the node and not deleted, in flight or running. Memory and disk are never
overbooked; vCPUs may be overcommitted up to ``cpu_overcommit`` x the allocatable CPUs. A disk
capacity of 0 means the node never told us (no facts at enrollment) and is not checked.

**Score**: the headroom the node keeps after taking the VM, on its tightest resource: the
smallest of the free fractions of memory, overcommitted vCPUs and (when known) disk left
afterwards, in [0, 1]. Highest first: new VMs spread over the least loaded nodes (an edge
fleet wants failure isolation and room for bursts, not packed hosts), and a node nearly out of
any one resource is chosen last. Ties go to the smallest node id, so a decision is
deterministic.

``load_nodes`` (every node in a policy's scope, or in the fleet) and ``shortlist`` (a create's
best few, found by SQL) are the I/O edge: they read the fleet through
:mod:`aggregator.store.placement` and turn its rows into :class:`NodeView`s (status, capacity
less the profile's reservations, labels). Call one and ``place`` in the same transaction as
the write that commits the decision (the store's writer), so two requests cannot both take the
last free memory of a node.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Final

from aggregator.fleet import telemetry as fleet
from aggregator.store import placement as repo
from aggregator.store.tx import Tx
from contract.profiles import MAX_CPUS, MAX_DISK_GIB, MAX_MEMORY_MIB, PROFILE_NAME, Profile

COUNTRY: Final = re.compile(r"[A-Z]{2}")  # ISO 3166 alpha-2, as enrollment tokens spell it
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")  # provider, site: as enrollment
LABEL_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9 ._/-]{1,64}")
GROUP: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an anti-affinity group
MAX_ITEMS: Final = 64  # per list in a policy: far more than any real one, cheap to check
MAX_LABELS: Final = 32
MAX_STRING: Final = 64
POLICY_KEYS: Final = ("countries", "providers", "sites", "labels", "profile", "anti_affinity")
_MIB: Final = 1024 * 1024


# --- the data ---------------------------------------------------------------------------------


def _check_name(where: str, value: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise ValueError(f"{where}: longer than {MAX_STRING} characters")
    if not pattern.fullmatch(value):
        raise ValueError(f"{where}: {value!r} is not {what}")


def _check_names(key: str, values: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(values, tuple):
        raise ValueError(f"placement.{key}: expected a tuple of strings")
    if len(values) > MAX_ITEMS:
        raise ValueError(f"placement.{key}: more than {MAX_ITEMS} entries")
    for i, value in enumerate(values):
        _check_name(f"placement.{key}[{i}]", value, pattern, what)


@dataclass(frozen=True)
class Policy:
    """Where a VM may run. An empty tuple or ``None`` is no constraint; ``labels`` must all
    match the node's profile labels; two VMs of one ``anti_affinity`` group never share a
    node. Validated on construction (``ValueError``)."""

    countries: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    profile: str | None = None
    anti_affinity: str | None = None

    def __post_init__(self) -> None:
        _check_names("countries", self.countries, COUNTRY,
                     "an ISO 3166 alpha-2 country code (two capital letters)")
        _check_names("providers", self.providers, NAME,
                     "a provider name (1-64 letters, digits, space . _ -)")
        _check_names("sites", self.sites, NAME, "a site name (1-64 letters, digits, space . _ -)")
        if not isinstance(self.labels, Mapping):
            raise ValueError("placement.labels: expected a mapping of strings to strings")
        if len(self.labels) > MAX_LABELS:
            raise ValueError(f"placement.labels: more than {MAX_LABELS} labels")
        for key, value in self.labels.items():
            _check_name("placement.labels", key, LABEL_KEY,
                        "a label name (1-63 letters, digits . _ / -)")
            _check_name(f"placement.labels.{key}", value, LABEL_VALUE,
                        "a label value (1-64 letters, digits, space . _ / -)")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        if self.profile is not None:
            _check_name("placement.profile", self.profile, PROFILE_NAME,
                        "a profile name (lower-case DNS label)")
        if self.anti_affinity is not None:
            _check_name("placement.anti_affinity", self.anti_affinity, GROUP,
                        "a group name (1-64 letters, digits . _ -)")

    @classmethod
    def from_json(cls, data: object) -> Policy:
        """The policy in a request's ``placement`` (untrusted JSON). ``None`` is no policy at
        all. An unknown key is refused rather than ignored: a misspelt ``"country"`` must not
        quietly place a VM outside its country. Anything malformed is a ``ValueError`` naming
        the field."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"placement: expected an object, got {type(data).__name__}")
        unknown = sorted(repr(k) for k in data if k not in POLICY_KEYS)
        if unknown:
            raise ValueError(f"placement: unknown key {', '.join(unknown[:5])} (known: "
                             f"{', '.join(POLICY_KEYS)})")
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("countries", "providers", "sites"):
            raw = data.get(key)
            if raw is None:
                lists[key] = ()
                continue
            if not isinstance(raw, list):
                raise ValueError(f"placement.{key}: expected a list of strings or null, "
                                 f"got {type(raw).__name__}")
            if len(raw) > MAX_ITEMS:  # before copying: a huge list is refused cheaply
                raise ValueError(f"placement.{key}: more than {MAX_ITEMS} entries")
            for i, value in enumerate(raw):
                if not isinstance(value, str):
                    raise ValueError(f"placement.{key}[{i}]: expected a string, "
                                     f"got {type(value).__name__}")
            lists[key] = tuple(dict.fromkeys(raw))  # without repeats, in order
        labels = data.get("labels")
        if labels is None:
            labels = {}
        elif not isinstance(labels, dict):
            raise ValueError(f"placement.labels: expected an object of strings or null, "
                             f"got {type(labels).__name__}")
        return cls(countries=lists["countries"], providers=lists["providers"],
                   sites=lists["sites"], labels=labels, profile=data.get("profile"),
                   anti_affinity=data.get("anti_affinity"))

    def to_json(self) -> dict[str, Any]:
        return {"countries": list(self.countries), "providers": list(self.providers),
                "sites": list(self.sites), "labels": dict(self.labels),
                "profile": self.profile, "anti_affinity": self.anti_affinity}


@dataclass(frozen=True)
class Demand:
    """What a VM needs: its sizing and its policy. Validated on construction."""

    vcpus: int
    memory_mib: int
    disk_gib: int
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self) -> None:
        for name, low, high in (("vcpus", 1, MAX_CPUS), ("memory_mib", 1, MAX_MEMORY_MIB),
                                ("disk_gib", 0, MAX_DISK_GIB)):
            value = getattr(self, name)
            if type(value) is not int:
                raise ValueError(f"{name}: expected an integer, got {type(value).__name__}")
            if not low <= value <= high:
                raise ValueError(f"{name}: {value} is outside {low}..{high}")
        if not isinstance(self.policy, Policy):
            raise ValueError("policy: expected a Policy")


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as placement sees it. ``cpus``, ``memory_mib`` and ``disk_gib`` are
    allocatable (the host minus the profile's reservations; ``disk_gib`` 0 is unknown and not
    checked); ``used_*`` are committed to VMs placed there and not deleted; ``groups`` are the
    anti-affinity groups of those VMs."""

    id: str
    status: str  # "online" | "offline" | "revoked"
    cordoned: bool
    country: str
    provider: str
    site: str
    profile: str
    labels: Mapping[str, str] = field(hash=False)
    cpus: int
    memory_mib: int
    disk_gib: int
    used_vcpus: int
    used_memory_mib: int
    used_disk_gib: int
    groups: frozenset[str]


@dataclass(frozen=True)
class Decision:
    """``candidates``: ``(node id, score)``, best first, ties by id; ``rejected``:
    ``(node id, every reason)``, by id. No candidate means the VM fits nowhere."""

    candidates: tuple[tuple[str, float], ...]
    rejected: tuple[tuple[str, tuple[str, ...]], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": [{"node": node, "score": score} for node, score in self.candidates],
            "rejected": [{"node": node, "reasons": list(reasons)}
                         for node, reasons in self.rejected],
        }


# --- the rules ----------------------------------------------------------------------------------

# A check appends the reasons ``node`` fails its rule for ``demand`` to ``out``; ``cpu_limit``
# is the node's overcommitted vCPU limit.
Check = Callable[[Demand, NodeView, int, list[str]], None]


def _status(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    if n.status != "online":
        out.append(n.status)


def _cordoned(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    if n.cordoned:
        out.append("cordoned")


def _country(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    if n.country not in d.policy.countries:
        out.append(f"country {n.country or '(none)'} not in {', '.join(d.policy.countries)}")


def _provider(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    if n.provider not in d.policy.providers:
        out.append(f"provider {n.provider or '(none)'} not in {', '.join(d.policy.providers)}")


def _site(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    if n.site not in d.policy.sites:
        out.append(f"site {n.site or '(none)'} not in {', '.join(d.policy.sites)}")


def _profile(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    if n.profile != d.policy.profile:
        out.append(f"profile {n.profile or '(none)'}, not {d.policy.profile}")


def _labels(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    for key, wanted in d.policy.labels.items():
        have = n.labels.get(key)
        if have != wanted:
            out.append(f"label {key}={have}, not {wanted}" if have is not None
                       else f"label {key} unset, not {wanted}")


def _anti_affinity(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    if d.policy.anti_affinity in n.groups:
        out.append(f"anti-affinity: already runs a VM of group {d.policy.anti_affinity}")


def _vcpus(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    free = cpu_limit - n.used_vcpus
    if d.vcpus > free:
        out.append(f"vcpus: needs {d.vcpus}, {max(free, 0)} free of {cpu_limit}"
                   f" ({n.cpus} CPUs overcommitted)")


def _memory(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    free = n.memory_mib - n.used_memory_mib
    if d.memory_mib > free:
        out.append(f"memory: needs {d.memory_mib} MiB, {max(free, 0)} MiB free"
                   f" of {n.memory_mib}")


def _disk(d: Demand, n: NodeView, cpu_limit: int, out: list[str]) -> None:
    free = n.disk_gib - n.used_disk_gib
    if n.disk_gib and d.disk_gib > free:
        out.append(f"disk: needs {d.disk_gib} GiB, {max(free, 0)} GiB free of {n.disk_gib}")


# The rules in the order their reasons are listed: name -> (does the policy ask for it, check).
RULES: Final[dict[str, tuple[Callable[[Policy], bool], Check]]] = {
    "status": (lambda p: True, _status),
    "cordoned": (lambda p: True, _cordoned),
    "country": (lambda p: bool(p.countries), _country),
    "provider": (lambda p: bool(p.providers), _provider),
    "site": (lambda p: bool(p.sites), _site),
    "profile": (lambda p: p.profile is not None, _profile),
    "labels": (lambda p: bool(p.labels), _labels),
    "anti_affinity": (lambda p: p.anti_affinity is not None, _anti_affinity),
    "vcpus": (lambda p: True, _vcpus),
    "memory": (lambda p: True, _memory),
    "disk": (lambda p: True, _disk),
}


def score(demand: Demand, node: NodeView, cpu_limit: int) -> float:
    """The smallest free fraction (memory, overcommitted vCPUs, disk when known) ``node``
    keeps after taking ``demand``, rounded to 6 places; only meaningful for a node that
    passes every rule (then it is in [0, 1])."""
    headroom = min(
        (node.memory_mib - node.used_memory_mib - demand.memory_mib) / node.memory_mib,
        (cpu_limit - node.used_vcpus - demand.vcpus) / cpu_limit,
    )
    if node.disk_gib:
        headroom = min(headroom,
                       (node.disk_gib - node.used_disk_gib - demand.disk_gib) / node.disk_gib)
    return round(headroom, 6)


def reasons(demand: Demand, node: NodeView, *, cpu_overcommit: float = 4.0) -> tuple[str, ...]:
    """Every rule of :data:`RULES` that ``node`` fails for ``demand``; empty if it may run
    the VM there."""
    cpu_limit = math.floor(node.cpus * cpu_overcommit)
    out: list[str] = []
    for applies, check in RULES.values():
        if applies(demand.policy):
            check(demand, node, cpu_limit, out)
    return tuple(out)


def place(demand: Demand, nodes: Iterable[NodeView], *, cpu_overcommit: float = 4.0) -> Decision:
    """Every node through every rule that ``demand``'s policy asks for; the nodes that pass,
    scored and ranked. A node id listed twice is our bug: ``ValueError``.

    A fleet is mostly nodes that pass, so each node first takes one inline test of the same
    rules; only a node that fails it goes through the :data:`RULES` table for its reasons
    (the tests hold the two to the same verdict)."""
    if not (math.isfinite(cpu_overcommit) and cpu_overcommit > 0):
        raise ValueError(f"cpu_overcommit: {cpu_overcommit} is not a positive number")
    policy = demand.policy
    checks = [check for applies, check in RULES.values() if applies(policy)]
    countries = frozenset(policy.countries)
    providers = frozenset(policy.providers)
    sites = frozenset(policy.sites)
    labels = tuple(policy.labels.items())
    profile, group = policy.profile, policy.anti_affinity
    vcpus, memory_mib, disk_gib = demand.vcpus, demand.memory_mib, demand.disk_gib
    floor = math.floor
    candidates: list[tuple[str, float]] = []
    rejected: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for node in nodes:
        if node.id in seen:
            raise ValueError(f"node {node.id} is listed twice")
        seen.add(node.id)
        cpu_limit = floor(node.cpus * cpu_overcommit)
        free_memory = node.memory_mib - node.used_memory_mib - memory_mib
        free_vcpus = cpu_limit - node.used_vcpus - vcpus
        free_disk = node.disk_gib - node.used_disk_gib - disk_gib
        if (node.status == "online" and not node.cordoned and free_memory >= 0
                and free_vcpus >= 0 and (free_disk >= 0 or not node.disk_gib)
                and (not countries or node.country in countries)
                and (not providers or node.provider in providers)
                and (not sites or node.site in sites)
                and (profile is None or node.profile == profile)
                and (group is None or group not in node.groups)
                and (not labels or all(node.labels.get(k) == v for k, v in labels))):
            # the smallest free fraction left, as score() computes it
            headroom = min(free_memory / node.memory_mib, free_vcpus / cpu_limit)
            if node.disk_gib:
                headroom = min(headroom, free_disk / node.disk_gib)
            candidates.append((node.id, round(headroom, 6)))
            continue
        out: list[str] = []
        for check in checks:
            check(demand, node, cpu_limit, out)
        if not out:  # the inline test and the table disagree: our bug
            raise AssertionError(f"node {node.id}: rejected without a reason")
        rejected.append((node.id, tuple(out)))
    candidates.sort(key=lambda c: (-c[1], c[0]))
    rejected.sort()
    return Decision(tuple(candidates), tuple(rejected))


# --- the fleet, read through the store ---------------------------------------------------------


@lru_cache(maxsize=1 << 18)  # a fleet of 100,000 nodes: ~100 MB of texts
def _figures(inventory: str | None, facts: str | None) -> tuple[int, int, int]:
    """``(cpus, memory MiB, disk GiB)`` of a node's stored inventory and facts; 0 for anything
    missing or malformed. Memoised (the texts change only when a node reconnects), so
    parsing JSON costs once per node, not once per node per decision."""
    cpus = memory_mib = disk_gib = 0
    try:
        inv = json.loads(inventory) if inventory else None
        fct = json.loads(facts) if facts else None
    except ValueError:
        return 0, 0, 0
    if isinstance(inv, dict):
        c, m = inv.get("cpus"), inv.get("memory_bytes")
        if type(c) is int and type(m) is int:
            cpus, memory_mib = max(c, 0), max(m, 0) // _MIB
    if isinstance(fct, dict) and type(fct.get("disk_gib")) is int:
        disk_gib = max(fct["disk_gib"], 0)
    return cpus, memory_mib, disk_gib


def _scope(policy: Policy, profiles: Mapping[str, Profile]) -> repo.Scope:
    """The nodes inside the policy's countries, providers, sites and profile (labels are the
    profile's: they become a list of profiles)."""
    allowed: tuple[str, ...] | None = None
    if policy.labels:
        allowed = tuple(sorted(name for name, p in profiles.items()
                               if all(p.labels.get(k) == v for k, v in policy.labels.items())))
    if policy.profile is not None:
        allowed = (policy.profile,) if allowed is None or policy.profile in allowed else ()
    return repo.Scope(policy.countries, policy.providers, policy.sites, allowed)


def _reservations(profiles: Mapping[str, Profile]) -> list[repo.Reservation]:
    return [repo.Reservation(name, p.reserved.cpus, p.reserved.memory_mib)
            for name, p in profiles.items()]


def load_nodes(
    conn: Tx, demand: Demand, *, now: float, profiles: Mapping[str, Profile],
    heartbeat_factor: float, min_timeout_s: float, push_down: bool = True,
) -> list[NodeView]:
    """The fleet as :class:`NodeView`s for placing ``demand``.

    With ``push_down`` (the default) SQL leaves out the nodes outside the policy's countries,
    providers, sites and profile (and the profiles whose labels do not match), so they are
    neither candidates nor rejected: a decision explains the nodes that were in scope. A
    policy with none of these loads, and so explains, every node. ``push_down=False`` loads
    every node whatever the policy, so the rejected list also says "country AT not in SI"
    (slower on a large fleet: for a dry-run).

    Status is ``revoked`` once revoked, else
    :func:`aggregator.fleet.telemetry.node_status`. Capacity is
    the last reported inventory (``cpus``, ``memory_bytes``) minus the profile's reservations,
    0 for a node that never reported one; disk is the enrollment facts' ``disk_gib``. Labels
    are the profile's. Committed figures sum the VMs with ``deleted_at`` unset; VMs of a node
    that has gone are ignored. ``groups`` holds only the demand's own anti-affinity group
    (where a VM of it runs): the only group ``place`` looks at."""
    scope = _scope(demand.policy, profiles) if push_down else repo.EVERY_NODE
    used = repo.usage(conn, scope)  # node_usage: kept by triggers on vms (migration 004)
    group = demand.policy.anti_affinity
    grouped = repo.group_nodes(conn, group) if group is not None else frozenset()
    in_group = frozenset((group,)) if group is not None else frozenset()
    no_group: frozenset[str] = frozenset()
    nothing: repo.Usage = (0, 0, 0)
    node_status = fleet.node_status
    kept: dict[str, tuple[int, int, Mapping[str, str]]] = {}  # profile -> reservations, labels
    out: list[NodeView] = []
    for (node_id, site, country, provider, profile, reported, last_seen, interval_s, revoked_at,
         cordoned, inventory, facts) in repo.nodes(conn, scope):
        reserve = kept.get(profile)
        if reserve is None:
            p = profiles.get(profile)
            reserve = kept[profile] = (
                (p.reserved.cpus, p.reserved.memory_mib, MappingProxyType(dict(p.labels)))
                if p is not None else (0, 0, MappingProxyType({})))
        cpus, memory_mib, disk_gib = _figures(inventory, facts)
        u = used.get(node_id, nothing)
        out.append(NodeView(  # positional: a fleet-wide decision makes one per node
            node_id,
            "revoked" if revoked_at is not None else node_status(
                reported, last_seen, interval_s, now, heartbeat_factor, min_timeout_s),
            bool(cordoned), country, provider, site, profile, reserve[2],
            max(cpus - reserve[0], 0), max(memory_mib - reserve[1], 0), disk_gib,
            u[0], u[1], u[2], in_group if node_id in grouped else no_group,
        ))
    return out


def sync_reservations(conn: Tx, profiles: Mapping[str, Profile]) -> None:
    """Write the profiles' host reservations where the headroom triggers read them (at the
    aggregator's start: profiles are files and may have changed)."""
    repo.save_reservations(conn, _reservations(profiles))


def shortlist(
    conn: Tx, demand: Demand, *, now: float, profiles: Mapping[str, Profile],
    heartbeat_factor: float, min_timeout_s: float, cpu_overcommit: float = 4.0,
    limit: int = 32,
) -> list[NodeView]:
    """Up to ``limit`` nodes that can take ``demand``, the emptiest first: the fast path of a
    create, which needs a good node, not an account of every other. SQL walks the online
    nodes by the headroom the triggers keep (migration 005) and stops after ``limit`` that
    pass the same rules as :func:`place` (:func:`aggregator.store.placement.roomiest`); the
    create then ranks them with :func:`place` (the authority) by the room each keeps after
    taking the VM. Headroom before the VM and room after it rank nodes alike except between
    nodes of very different sizes, so the node chosen is the best of the emptiest ``limit``.
    Nodes that fail are not returned: :func:`load_nodes` with ``push_down=False`` explains
    them."""
    group = demand.policy.anti_affinity
    # Nodes that run a VM of the demand's anti-affinity group: a few, found through an index
    # and left out here (cheaper than a subquery per node).
    taken = repo.group_nodes(conn, group) if group is not None else frozenset()
    rows = repo.roomiest(
        conn, _scope(demand.policy, profiles), _reservations(profiles), vcpus=demand.vcpus,
        memory_mib=demand.memory_mib, disk_gib=demand.disk_gib, cpu_overcommit=cpu_overcommit,
        now=now, heartbeat_factor=heartbeat_factor, min_timeout_s=min_timeout_s,
        limit=limit + len(taken))
    labels = {name: MappingProxyType(dict(p.labels)) for name, p in profiles.items()}
    empty: Mapping[str, str] = MappingProxyType({})
    return [
        NodeView(node_id, "online", False, country, provider, site, profile,
                 labels.get(profile, empty), c, m, disk, uc, um, ud, frozenset())
        for (node_id, site, country, provider, profile, c, m, disk, uc, um, ud) in rows
        if node_id not in taken
    ][:limit]
