"""The registry interface: resources, services with their VIPs, and endpoints.

One host uses the embedded store (`embedded.EmbeddedRegistry`), many hosts etcd
(`etcd.EtcdRegistry`), behind the same Protocol. The rules both stores follow are written
once, here and in meshnode.policy.store: the apply plan, VIP and id assignment (`VipRange`),
the field-level service patch of the CLI's shortcuts. Records are immutable snapshots; the
agent compiles them into what the workers, the kernel and the health checker need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

import msgspec

from meshnode import constants as C
from meshnode.errors import ConflictError, RegistryError, UsageError
from meshnode.model import (
    BalancerConfig,
    Endpoint,
    HealthConfig,
    HostPort,
    OutlierConfig,
    ServicePolicy,
    ServiceSpec,
    service_name,
)
from meshnode.policy.document import parse
from meshnode.policy.resources import Resource
from meshnode.policy.store import Delete, HistoryEntry, Outcome


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    addr: HostPort
    source: str  # "process" (an enrolled process's listener) or "static" (service add)
    pid: int | None = None
    node: str = ""  # the agent that registered it (its lease owns it, with etcd)
    zone: str = ""
    weight: int = 1

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.addr, self.node, self.zone, self.weight)

    def to_json(self) -> dict[str, Any]:
        return {"addr": str(self.addr), "source": self.source, "pid": self.pid,
                "node": self.node, "zone": self.zone, "weight": self.weight}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EndpointRecord:
        return cls(HostPort.parse(d["addr"]), str(d["source"]), d.get("pid"),
                   str(d.get("node", "")), str(d.get("zone", "")), int(d.get("weight", 1)))


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """A service as the agent uses it: the Service resource's policy at `version`, the VIP the
    registry gave it (the id is the VIP's offset, the same on every host), and its endpoints."""

    name: str
    id: int  # keys the kernel's service flags; VipRange.id_of(vip) on every host
    vip: IPv4Address
    policy: ServicePolicy = field(default_factory=ServicePolicy)
    version: int = 0
    endpoints: frozenset[EndpointRecord] = field(default_factory=frozenset)

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec(self.name, self.id, self.vip, self.policy)

    @property
    def port(self) -> int | None:
        return self.policy.port

    @property
    def fail_closed(self) -> bool:
        return self.policy.fail_closed

    @property
    def lb(self) -> BalancerConfig:
        return self.policy.balancer

    @property
    def outlier(self) -> OutlierConfig:
        return self.policy.outlier

    @property
    def health(self) -> HealthConfig:
        return self.policy.health

    def endpoint_set(self) -> frozenset[Endpoint]:
        return frozenset(e.endpoint for e in self.endpoints)

    def settings_json(self) -> dict[str, Any]:
        """Everything but the endpoints, as `status` shows it."""
        return {"name": self.name, "id": self.id, "vip": str(self.vip), "port": self.port,
                "version": self.version, "fail_closed": self.fail_closed,
                "lb": msgspec.to_builtins(self.lb, order="deterministic"),
                "outlier": _snake(self.outlier), "health": _snake(self.health),
                "policy": msgspec.to_builtins(self.policy)}


def _snake(value: Any) -> dict[str, Any]:
    """A policy struct with every field, by its Python name (status and explain read these)."""
    return {f: getattr(value, f) for f in value.__struct_fields__}


class VipRange:
    """The VIP range, and service ids derived from a VIP's offset in it.

    The id keys the kernel's per-service flags on every host, so all agents must agree on it
    without talking to each other: the offset does that, and a VIP is never held by two
    services at once (the store guarantees it), so neither is an id. Both stores use it."""

    def __init__(self, cidr: str = C.VIP_CIDR) -> None:
        self.net = IPv4Network(cidr)

    def id_of(self, vip: IPv4Address) -> int:
        if vip not in self.net or vip in (self.net.network_address, self.net.broadcast_address):
            raise RegistryError(f"VIP {vip} is outside {self.net}",
                                "every agent must use the same VIP range")
        return int(vip) - int(self.net.network_address)

    def check_pinned(self, vip: str, service: str) -> IPv4Address:
        ip = IPv4Address(vip)
        if ip not in self.net or ip in (self.net.network_address, self.net.broadcast_address):
            raise UsageError(f"Service {service}: pinned VIP {ip} is outside {self.net}",
                             f"pick a VIP inside {self.net}, or leave spec.vip out")
        return ip

    def first_free(self, used: Iterable[IPv4Address]) -> IPv4Address:
        taken = set(used)
        for ip in self.net.hosts():
            if ip not in taken:
                return ip
        raise RegistryError(f"no free VIP left in {self.net}",
                            "remove unused services with: meshnode delete Service NAME")

    def assign(self, current: Mapping[str, IPv4Address], puts: Iterable[Resource],
               deleted: Iterable[str] = (), reserved: Iterable[IPv4Address] = ()
               ) -> dict[str, IPv4Address]:
        """The VIP of each Service put: its pinned one, else the one it has, else the first
        free (not in `current`, nor `reserved`: held by services this snapshot does not know
        yet). ConflictError when a pinned VIP is another service's."""
        gone = set(deleted)
        held = {name: vip for name, vip in current.items() if name not in gone}
        out: dict[str, IPv4Address] = {}
        services = [r for r in puts if r.kind == "Service"]
        for r in services:  # pinned first, so an allocation never takes a pinned address
            if r.spec.vip is not None:
                out[r.name] = self.check_pinned(r.spec.vip, r.name)
        for r in services:
            if r.name not in out and r.name in held:
                out[r.name] = held[r.name]
        owners = {vip: name for name, vip in held.items()}
        for name, vip in out.items():
            owner = owners.get(vip)
            if owner is not None and owner != name and owner not in out:
                raise ConflictError(f"Service {name}: VIP {vip} belongs to Service {owner}",
                                    "pin another VIP, or leave spec.vip out")
        taken = {*out.values(), *(v for n, v in held.items() if n not in out), *reserved}
        for r in services:
            if r.name not in out:
                out[r.name] = self.first_free(taken)
                taken.add(out[r.name])
        if len(set(out.values())) != len(out):
            raise ConflictError("two Services pin the same VIP",
                                "give each Service its own spec.vip")
        return out


Listener = Callable[[], None]


class Registry(Protocol):
    """Resources (Service and the policy kinds), VIPs and endpoints, shared by every agent
    that uses the same store.

    Reads come from a local snapshot and never block (an agent keeps serving from its last
    state when the store is unreachable); writes are coroutines. Resource writes are
    compare-and-swap and an apply is atomic (store.plan decides, the store writes it in one
    step). Endpoints written by an agent belong to its node: with etcd they live under that
    agent's lease, so a dead agent's endpoints disappear by themselves."""

    async def start(self) -> None:
        """Connect (and for a distributed store: load everything and start watching)."""
        ...

    async def close(self) -> None:
        """Stop watching; a distributed store also revokes this node's lease."""
        ...

    def services(self) -> dict[str, ServiceRecord]: ...

    def resources(self) -> dict[tuple[str, str], Resource]:
        """Every stored resource, of every kind, with its version."""
        ...

    def revision(self) -> int:
        """The store's revision of this snapshot: grows with every change of any kind."""
        ...

    async def apply(self, puts: Sequence[Resource], deletes: Sequence[Delete] = ()
                    ) -> list[Outcome]:
        """Write all of it or nothing (store.plan says why not)."""
        ...

    async def history(self, kind: str, name: str) -> list[HistoryEntry]:
        """The last versions of a resource, oldest first (deletions included)."""
        ...

    async def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None:
        """Register endpoints of this node. ConflictError if an address is another service's."""
        ...

    async def remove_endpoints(self, name: str, addrs: Iterable[HostPort]) -> None: ...

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` after every change, local or (with etcd) from another agent."""
        ...

    async def publish_host(self, report: Mapping[str, Any]) -> None:
        """This node's agent report (agent/report.py), for every agent to read in hosts()."""
        ...

    def hosts(self) -> dict[str, dict[str, Any]]:
        """Every live agent's last report, by node."""
        ...

    def describe(self) -> dict[str, Any]:
        """For `meshnode status`: which store, connected or not, and the last error."""
        ...


# -- operations both stores share, written once over the protocol -------------------------
CAS_RETRIES = 8  # a field-level change re-reads and retries when another write came first


async def patch_service(reg: Registry, name: str, patch: Mapping[str, Any]) -> ServiceRecord:
    """Create a Service or change some of its fields (a partial spec, camelCase, nested
    mappings merged), as the CLI's `service add` flags do. The merge runs over the stored
    version and writes compare-and-swap, retried over the new version when another write came
    first: concurrent operators never lose each other's fields."""
    service_name(name)
    for _ in range(CAS_RETRIES):
        old = reg.resources().get(("Service", name))
        base = old.spec_builtins() if old else {}
        merged = _merge(base, patch)
        health = merged.get("health") or {}
        if "interval" in (patch.get("health") or {}) and "timeout" not in (
                patch.get("health") or {}):
            # a check may not outlast its interval: a shorter interval brings the timeout along
            health["timeout"] = min(float(health.get("timeout", 1.0)), float(health["interval"]))
        new = parse({"kind": "Service", "name": name, "spec": merged,
                     "version": old.version if old else 0}, f"service {name}")
        try:
            if old is None or new.spec != old.spec:
                if old is None:
                    new = Resource(new.kind, new.name, new.spec, 0)
                await reg.apply([new])
        except ConflictError:
            continue
        return reg.services()[name]
    raise ConflictError(f"Service {name} kept changing under this write",
                        "retry; another writer is updating it in a loop")


def _merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def service_records(resources: Mapping[tuple[str, str], Resource],
                    vips: Mapping[str, IPv4Address], vip_range: VipRange,
                    endpoints: Mapping[str, frozenset[EndpointRecord]]) -> dict[str, ServiceRecord]:
    """The Service resources as records: policy, VIP and id, endpoints."""
    out: dict[str, ServiceRecord] = {}
    for (kind, name), r in resources.items():
        vip = vips.get(name)
        if kind != "Service" or vip is None:
            continue
        out[name] = ServiceRecord(name, vip_range.id_of(vip), vip, r.spec, r.version,
                                  endpoints.get(name, frozenset()))
    return out


def check_service_args(name: str, port: int | None) -> None:
    """What every registry checks before creating or changing a service."""
    service_name(name)
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"invalid service port {port}", "use a port from 1 to 65535")
