"""The compiler: registry records and health in, what each consumer needs out.

- the proxy workers: the four discovery updates (Reset/Add/Remove/DoesNotExist) that bring
  their route tables from what they were given to what the registry now says;
- the kernel: the capture state (which destinations belong to which service, which services
  the proxy can serve, which fail closed, and which local endpoint ports refuse or count
  plaintext connections from other hosts: `inbound`);
- the health checker: which services' endpoints to probe changed.

Each rule is written once, per service (`entry`, `rules`); `snapshot`/`diff`/`capture_state`
apply it to a whole registry (explain, tests), `Compiler` to what changed since its last run:
a store hands out the same record object until the service changes, so the compiler finds
the changed services by identity and does work in proportion to them, not to the mesh.

Pure: no I/O; imports nothing of meshnode's but the model and the policy records.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from meshnode.model import (
    Add,
    CaptureRule,
    CaptureState,
    DoesNotExist,
    Endpoint,
    HostPort,
    InboundRule,
    Remove,
    Reset,
    ServiceSpec,
    Update,
)
from meshnode.policy.datapath import KernelPlan
from meshnode.policy.records import ServiceRecord
from meshnode.policy.resources import MESH_NAME, MeshSpec, Resource, mtls_mode

Entry = tuple[ServiceSpec, frozenset[Endpoint]]
Snapshot = Mapping[str, Entry]
Healthy = Callable[[str, HostPort], bool]


# -- the rules, per service -----------------------------------------------------------------
def entry(rec: ServiceRecord, healthy: Healthy | None = None) -> Entry:
    """What the workers balance over: every endpoint, less those failing health checks."""
    return (rec.spec, frozenset(e.endpoint for e in rec.endpoints
                                if healthy is None or healthy(rec.name, e.addr)))


def rules(rec: ServiceRecord) -> frozenset[CaptureRule]:
    """VIPs capture every port; endpoints their own address."""
    return frozenset({CaptureRule(rec.vip, 0, rec.id),
                      *(CaptureRule(e.addr.ip, e.addr.port, rec.id) for e in rec.endpoints)})


def inbound(rec: ServiceRecord, node: str, mesh: MeshSpec | None) -> frozenset[InboundRule]:
    """The ports of `rec`'s endpoints on `node`, by its effective mTLS mode: STRICT refuses
    plaintext from other hosts, PERMISSIVE counts it, DISABLE leaves the ports alone."""
    mode = mtls_mode(rec.policy, mesh)
    if mode == "DISABLE":
        return frozenset()
    strict = mode == "STRICT"
    return frozenset(InboundRule(e.addr.port, rec.id, strict, rec.name)
                     for e in rec.endpoints if e.node == node)


def mesh_spec(resources: Mapping[tuple[str, str], Resource]) -> MeshSpec | None:
    """The Mesh resource's spec (the mesh-wide defaults), if there is one."""
    mesh = resources.get(("Mesh", MESH_NAME))
    return mesh.spec if mesh is not None and isinstance(mesh.spec, MeshSpec) else None


def change(name: str, old: Entry | None, new: Entry | None) -> list[Update]:
    """The updates that take a worker's view of one service from `old` to `new`."""
    if new is None:
        return [] if old is None else [DoesNotExist(name)]
    spec, eps = new
    if old is None or old[0] != spec:
        return [Reset(spec, tuple(sorted(eps)))]
    out: list[Update] = []
    # removals first: an endpoint whose weight or zone changed is removed, then added
    if removed := old[1] - eps:
        out.append(Remove(name, tuple(sorted(removed))))
    if added := eps - old[1]:
        out.append(Add(name, tuple(sorted(added))))
    return out


# -- whole registries -----------------------------------------------------------------------
def snapshot(services: Mapping[str, ServiceRecord], healthy: Healthy | None = None
             ) -> dict[str, Entry]:
    return {name: entry(rec, healthy) for name, rec in services.items()}


def resets(snap: Snapshot) -> list[Update]:
    """Everything, for a worker that starts from nothing."""
    return [Reset(spec, tuple(sorted(eps))) for spec, eps in snap.values()]


def diff(old: Snapshot, new: Snapshot) -> list[Update]:
    out: list[Update] = [DoesNotExist(name) for name in sorted(old.keys() - new.keys())]
    for name in sorted(new):
        out += change(name, old.get(name), new[name])
    return out


def capture_state(services: Mapping[str, ServiceRecord], ready: bool,
                  inbound: frozenset[InboundRule] = frozenset(),
                  kernel: KernelPlan | None = None) -> CaptureState:
    """`ready`: the proxy can serve all of these services now (workers alive and synced);
    `inbound`: this host's inbound rules (`inbound_rules`); `kernel`: the kernel path
    (meshnode.policy.datapath; None: none)."""
    ids = frozenset(rec.id for rec in services.values())
    plan = kernel or KernelPlan()
    return CaptureState(
        rules=frozenset().union(*(rules(rec) for rec in services.values())),
        ready=ids if ready else frozenset(),
        fail_closed=frozenset(rec.id for rec in services.values() if rec.fail_closed),
        inbound=inbound, kernel=plan.kernel, fallback=plan.fallback, lb=plan.lb)


def inbound_rules(services: Mapping[str, ServiceRecord], node: str,
                  mesh: MeshSpec | None) -> frozenset[InboundRule]:
    """What this host (`node`) enforces on its endpoint ports (CaptureState.inbound)."""
    return frozenset().union(*(inbound(rec, node, mesh) for rec in services.values()))


_NO_KERNEL = KernelPlan()


# -- incremental ------------------------------------------------------------------------------
@dataclass
class Compiled:
    updates: list[Update]  # for the workers, in order
    changed: dict[str, ServiceRecord | None]  # services whose record changed (None: gone)


@dataclass
class Compiler:
    """Keeps what it last compiled; each run costs the services that changed (by record
    identity, or named in `health_dirty`), plus one pass over the names."""

    pushed: dict[str, Entry] = field(default_factory=dict)  # what the workers were given
    _records: dict[str, ServiceRecord] = field(default_factory=dict)
    _rules: dict[str, frozenset[CaptureRule]] = field(default_factory=dict)
    _all_rules: set[CaptureRule] = field(default_factory=set)
    _ids: dict[str, int] = field(default_factory=dict)
    _fail_closed: set[int] = field(default_factory=set)
    endpoints_by_node: dict[str, int] = field(default_factory=dict)  # for the host report
    _capture: dict[bool, CaptureState] = field(default_factory=dict)  # by readiness
    _last: CaptureState | None = None  # the state made last; the delta below is since it
    _added: set[CaptureRule] = field(default_factory=set)
    _removed: set[CaptureRule] = field(default_factory=set)
    # `inbound`: the (node, mesh spec) it was computed for, each local service's rules, the
    # services changed since, and the union (the same object while nothing changed).
    _inbound_for: tuple[str, MeshSpec | None] | None = None
    _inbound_of: dict[str, frozenset[InboundRule]] = field(default_factory=dict)
    _inbound_dirty: set[str] = field(default_factory=set)
    _inbound: frozenset[InboundRule] = field(default_factory=frozenset)

    def run(self, services: Mapping[str, ServiceRecord], healthy: Healthy,
            health_dirty: Collection[str] = (),
            on_changed: Callable[[Mapping[str, ServiceRecord | None]], None] | None = None,
            names: Collection[str] | None = None) -> Compiled:
        """`names`: the services that may have changed (the registry's change feed); None: any
        (one pass over the mesh, comparing record objects). `on_changed` hears of the changed
        records before anything is compiled (the health checker reads the verdicts other hosts
        wrote into them, which `healthy` returns)."""
        records = self._records
        changed: dict[str, ServiceRecord | None] = {}
        if names is None:
            changed.update((name, None) for name in records.keys() - services.keys())
            for name, cur in services.items():
                if records.get(name) is not cur:
                    changed[name] = cur
        else:
            for name in names:
                now = services.get(name)
                if records.get(name) is not now:
                    changed[name] = now
        if on_changed is not None:
            on_changed(changed)
        updates: list[Update] = []
        for name in sorted({*changed, *(n for n in health_dirty if n in services)}):
            rec: ServiceRecord | None = changed[name] if name in changed else services[name]
            new = None if rec is None else entry(rec, healthy)
            updates += change(name, self.pushed.get(name), new)
            if new is None:
                self.pushed.pop(name, None)
            else:
                self.pushed[name] = new
            if name in changed:
                self._record(name, rec)
        return Compiled(updates, changed)

    @property
    def services(self) -> int:
        return len(self._records)

    def _record(self, name: str, rec: ServiceRecord | None) -> None:
        self._capture.clear()
        self._inbound_dirty.add(name)
        old = self._records.get(name)
        for r, step in ((old, -1), (rec, 1)):
            for e in r.endpoints if r is not None else ():
                self.endpoints_by_node[e.node] = self.endpoints_by_node.get(e.node, 0) + step
        old_rules = self._rules.pop(name, frozenset())
        self._all_rules.difference_update(old_rules)
        for rule in old_rules:  # the delta since the last state made (re-adding cancels)
            if rule in self._added:
                self._added.discard(rule)
            else:
                self._removed.add(rule)
        old_id = self._ids.pop(name, None)
        if old_id is not None:
            self._fail_closed.discard(old_id)
        if rec is None:
            self._records.pop(name, None)
            return
        self._records[name] = rec
        self._rules[name] = new_rules = rules(rec)
        self._all_rules.update(new_rules)
        for rule in new_rules:
            if rule in self._removed:
                self._removed.discard(rule)
            else:
                self._added.add(rule)
        self._ids[name] = rec.id
        if rec.fail_closed:
            self._fail_closed.add(rec.id)

    def inbound(self, node: str, mesh: MeshSpec | None) -> frozenset[InboundRule]:
        """`inbound_rules` of the services run so far; the same object while nothing it
        depends on changed. Costs the services changed since the last call (every service
        when `node` or the mesh defaults changed)."""
        if self._inbound_for != (node, mesh):
            self._inbound_for = (node, mesh)
            self._inbound_of.clear()
            self._inbound_dirty = set(self._records)
        if self._inbound_dirty:
            for name in self._inbound_dirty:
                rec = self._records.get(name)
                local = inbound(rec, node, mesh) if rec is not None else frozenset()
                if local:
                    self._inbound_of[name] = local
                else:
                    self._inbound_of.pop(name, None)
            self._inbound_dirty.clear()
            now = frozenset().union(*self._inbound_of.values())
            if now != self._inbound:
                self._inbound = now
        return self._inbound

    def capture_state(self, ready: bool, inbound: frozenset[InboundRule] = frozenset(),
                      kernel: KernelPlan | None = None) -> CaptureState:
        """The kernel's state; the same object while nothing it holds changed, so a caller
        can tell there is nothing to sync without comparing the mesh. `inbound`: this host's
        inbound rules (`Compiler.inbound`); `kernel`: the kernel path (`datapath.Planner`;
        the same object while it did not change)."""
        plan = kernel or _NO_KERNEL
        cached = self._capture.get(ready)
        if (cached is not None and (cached.inbound is inbound or cached.inbound == inbound)
                and cached.lb is plan.lb and cached.kernel is plan.kernel
                and cached.fallback is plan.fallback):
            return cached
        ids = frozenset(self._ids.values())
        state = CaptureState(rules=frozenset(self._all_rules),
                             ready=ids if ready else frozenset(),
                             fail_closed=frozenset(self._fail_closed), inbound=inbound,
                             kernel=plan.kernel, fallback=plan.fallback, lb=plan.lb,
                             lb_changed=plan.changed, lb_since=plan.since,
                             base=None if self._last is None else weakref.ref(self._last),
                             removed=frozenset(self._removed), added=frozenset(self._added))
        self._capture[ready] = state
        self._last = state
        self._added.clear()
        self._removed.clear()
        return state
