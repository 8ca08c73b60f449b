"""Which path a service's connections take on this host, and what the kernel path balances.

The kernel path (bpf/mn_connect.c) picks an endpoint at connect() and steps out of the way:
no proxy hop, but also nothing the proxy does. So a service may take it only when its policy
needs nothing of the proxy on this host (`proxy_needs`):
- every port opaque TCP (an HTTP-family port is handled per request);
- no `maxConnections` (the proxy counts connections), no Route governing its calls (splits,
  faults, mirrors, limits), no AuthorizationPolicy targeting it and no mesh default of DENY
  (the proxy authorizes; dry runs need it to count);
- mTLS: a connection to another host goes plaintext, which an endpoint in STRICT mode refuses,
  so a STRICT service balances over this host's endpoints only, and needs the proxy when it
  has none here;
- the eBPF capture backend (the iptables backend has no kernel path).
`datapath: kernel | auto` then puts it on the kernel path (`auto` silently keeps the proxy
when not allowed; `kernel` says so in status/explain: the static reasons are refused when the
resource is applied). A service on the proxy path that is allowed the kernel path and fails
open falls back to kernel balancing while the proxy cannot serve (workers dead or
restarting), instead of failing open to a VIP where nothing listens.

`Planner` keeps each service's choice and tables and redoes only the services that changed
(by record identity or health), plus every service when what all of them depend on changed.

Pure: imports the model, policy records and resources, and the slot builders.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshnode import constants
from meshnode.balance import slots
from meshnode.model import Endpoint, LbKey, LbTable
from meshnode.policy.records import ServiceRecord
from meshnode.policy.resources import (
    AUTHZ_TARGET_ALL,
    MESH_NAME,
    MeshSpec,
    Resource,
    ServicePolicy,
    mtls_mode,
)

__all__ = ["Environment", "KernelPlan", "PathChoice", "Planner", "choose", "environment",
           "proxy_needs", "tables"]

@dataclass(frozen=True, slots=True)
class Environment:
    """What every service's choice depends on beside its own record."""

    node: str = ""
    zone: str = ""
    capable: bool = True  # the capture backend has a kernel path (eBPF)
    mesh: MeshSpec | None = None
    routed: frozenset[str] = frozenset()  # services a Route governs
    authorized: frozenset[str] = frozenset()  # services an AuthorizationPolicy targets
    authorize_all: bool = False  # a policy targets "*", or the mesh default is DENY


def environment(resources: Mapping[tuple[str, str], Resource], node: str, zone: str,
                capable: bool) -> Environment:
    """The Environment from the registry's resources."""
    mesh_res = resources.get(("Mesh", MESH_NAME))
    mesh = mesh_res.spec if mesh_res is not None and isinstance(mesh_res.spec, MeshSpec) else None
    routed: set[str] = set()
    targets: set[str] = set()
    for (kind, _), res in resources.items():
        if kind == "Route" and getattr(res.spec, "service", None):
            routed.add(res.spec.service)
        elif kind == "AuthorizationPolicy":
            targets.add(res.spec.target)
    deny_default = mesh is not None and mesh.authorization.default == "DENY"
    return Environment(node, zone, capable, mesh, frozenset(routed),
                       frozenset(targets - {AUTHZ_TARGET_ALL}),
                       AUTHZ_TARGET_ALL in targets or deny_default)


def proxy_needs(name: str, policy: ServicePolicy, env: Environment) -> str | None:
    """Why the service needs the proxy on this host whatever its endpoints (None: it does
    not). One line, for status and explain."""
    if not env.capable:
        return "the kernel path needs the eBPF capture backend (this host uses iptables)"
    if policy.l7:
        ports = [str(p.port) for p in policy.ports if p.protocol != "tcp"]
        which = f"port {ports[0]}" if ports and policy.protocol == "tcp" else "it"
        return f"{which} speaks {policy.protocol if which == 'it' else 'HTTP'}: " \
               "requests need the proxy"
    if policy.max_connections:
        return "maxConnections is enforced by the proxy"
    if name in env.routed:
        return "a Route governs its calls"
    if name in env.authorized or env.authorize_all:
        return "authorization applies to it (the proxy enforces it)"
    return None


@dataclass(frozen=True, slots=True)
class PathChoice:
    """`path`: who balances the service's connects while the proxy serves; `fallback`: the
    kernel balances them while it does not; `local_only`: the kernel path reaches only this
    host's endpoints (mTLS STRICT); `reason`: why, in one line."""

    path: Literal["kernel", "proxy"]
    fallback: bool
    local_only: bool
    reason: str

    @property
    def kernel_allowed(self) -> bool:
        return self.path == "kernel" or self.fallback


def choose(name: str, policy: ServicePolicy, env: Environment,
           local_endpoints: bool) -> PathChoice:
    """The service's path on this host (`local_endpoints`: it has endpoints here)."""
    needs = proxy_needs(name, policy, env)
    strict = mtls_mode(policy, env.mesh) == "STRICT"
    if needs is None and strict and not local_endpoints:
        needs = "mTLS STRICT and no endpoint on this host: other hosts take only mTLS"
    scope = " (this host's endpoints only: mTLS STRICT)" if strict else ""
    if policy.datapath == "proxy":
        if needs is not None:
            return PathChoice("proxy", False, strict, f"datapath proxy; while the proxy is "
                              f"down it fails {policy.fail_mode}: {needs}")
        if policy.fail_closed:
            return PathChoice("proxy", False, strict,
                              "datapath proxy; while the proxy is down it fails closed")
        return PathChoice("proxy", True, strict, "datapath proxy; balanced in the kernel "
                          f"while the proxy is down{scope}")
    if needs is not None:
        return PathChoice("proxy", False, strict, f"datapath {policy.datapath}, but {needs}")
    return PathChoice("kernel", False, strict,
                      f"datapath {policy.datapath}: opaque TCP needing nothing of the proxy, "
                      f"balanced in the kernel{scope}")


def _pick(policy: ServicePolicy) -> int:
    algorithm = policy.balancer.algorithm
    if algorithm == "ring-hash":
        return constants.LB_PICK_HASH
    if algorithm == "random":
        return constants.LB_PICK_RANDOM
    return constants.LB_PICK_ROTATE  # round-robin, and p2c-ewma without its feedback


def _tier(endpoints: list[Endpoint], node: str, zone: str) -> list[Endpoint]:
    """Locality: this node's endpoints if any, else this zone's, else all (the kernel path
    has no load feedback to spill over with)."""
    local = [e for e in endpoints if node and e.node == node]
    if local:
        return local
    zoned = [e for e in endpoints if zone and e.zone == zone]
    return zoned or endpoints


def tables(rec: ServiceRecord, choice: PathChoice, endpoints: Iterable[Endpoint],
           env: Environment) -> dict[LbKey, LbTable]:
    """The kernel path's tables of one service from its healthy `endpoints`: one per VIP
    port with endpoints (port 0, every port, for a service with a `port`)."""
    if not choice.kernel_allowed:
        return {}
    eps = [e for e in endpoints if not choice.local_only or e.node == env.node]
    groups: dict[int, list[Endpoint]] = {}
    for e in eps:
        groups.setdefault(0 if rec.port is not None else e.addr.port, []).append(e)
    pick = _pick(rec.policy)
    out: dict[LbKey, LbTable] = {}
    for port, group in groups.items():
        if rec.policy.balancer.locality:
            group = _tier(group, env.node, env.zone)
        filled = (slots.ring(group, constants.LB_RING_SLOTS) if pick == constants.LB_PICK_HASH
                  else slots.weighted(group, constants.LB_MAX_SLOTS))
        out[(rec.id, port)] = LbTable(rec.id, port, pick, filled,
                                      rec.policy.close_removed_connections)
    return out


@dataclass(frozen=True, slots=True)
class KernelPlan:
    """The kernel path of every service: the same object while nothing in it changed.
    `changed`: the tables that differ from those of the plan before it (`since`, whose `lb`
    it names), so a map sync writes only those instead of comparing every table."""

    kernel: frozenset[int] = frozenset()
    fallback: frozenset[int] = frozenset()
    lb: Mapping[LbKey, LbTable] = field(default_factory=dict, hash=False)
    changed: frozenset[LbKey] = frozenset()
    since: Mapping[LbKey, LbTable] | None = field(default=None, hash=False, compare=False)


@dataclass
class Planner:
    """Each service's choice and tables, redone for the services that changed; each plan
    costs the services that changed, not the mesh."""

    env: Environment | None = None
    choices: dict[str, PathChoice] = field(default_factory=dict)
    _records: dict[str, ServiceRecord] = field(default_factory=dict)
    _tables: dict[str, dict[LbKey, LbTable]] = field(default_factory=dict)
    _plan: KernelPlan = field(default_factory=KernelPlan)

    def keys_of(self, name: str) -> list[LbKey]:
        """The (service id, port) keys of one service's tables, in order."""
        return sorted(self._tables.get(name, {}))

    def plan(self, services: Mapping[str, ServiceRecord],
             healthy: Callable[[ServiceRecord], frozenset[Endpoint]],
             dirty: Collection[str], env: Environment) -> KernelPlan:
        """`healthy(rec)`: the endpoints the workers balance over (health applied); `dirty`:
        services whose record or health may have changed since the last call, removed ones
        included."""
        names: Iterable[str]
        if env != self.env:
            self.env = env
            names = {*services, *self._records}
        else:  # `dirty` names the services gone too (the compiler's change feed does)
            names = dirty
        changed: dict[str, tuple[ServiceRecord | None, PathChoice | None,
                                 dict[LbKey, LbTable]]] = {}
        for name in names:
            rec = services.get(name)
            if rec is None:
                if name in self._records:
                    changed[name] = (None, None, {})
                continue
            eps = healthy(rec)
            choice = choose(name, rec.policy, env, any(e.node == env.node for e in eps))
            new = tables(rec, choice, eps, env)
            old_rec = self._records.get(name)
            if (old_rec is not None and old_rec.id == rec.id and self.choices.get(name) == choice
                    and self._tables.get(name) == new):
                self._records[name] = rec
                continue
            changed[name] = (rec, choice, new)
        if changed:
            self._plan = self._next(changed)
        return self._plan

    def _next(self, changed: Mapping[str, tuple[ServiceRecord | None, PathChoice | None,
                                                dict[LbKey, LbTable]]]) -> KernelPlan:
        """The plan after `changed` (each service's new record, choice and tables; None: gone),
        from the last one by its differences."""
        old = self._plan
        lb = dict(old.lb)
        kernel, fallback = set(old.kernel), set(old.fallback)
        keys: set[LbKey] = set()
        for name, (rec, choice, new) in changed.items():
            prev = self._records.get(name)
            if prev is not None:
                kernel.discard(prev.id)
                fallback.discard(prev.id)
            for key in self._tables.get(name, {}):
                lb.pop(key, None)
                keys.add(key)
            if rec is None or choice is None:
                self._records.pop(name, None)
                self.choices.pop(name, None)
                self._tables.pop(name, None)
                continue
            self._records[name], self.choices[name], self._tables[name] = rec, choice, new
            if choice.path == "kernel":
                kernel.add(rec.id)
            elif choice.fallback:
                fallback.add(rec.id)
            lb.update(new)
            keys.update(new)
        return KernelPlan(
            old.kernel if kernel == old.kernel else frozenset(kernel),
            old.fallback if fallback == old.fallback else frozenset(fallback),
            lb, frozenset(keys), old.lb)
