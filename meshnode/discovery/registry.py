"""The registry interface: services, their VIPs and endpoints.

One host uses the embedded store (`embedded.EmbeddedRegistry`); many hosts will use etcd behind
the same Protocol. Records are immutable snapshots; the agent diffs snapshots into the
Reset/Add/Remove/DoesNotExist updates the proxy workers consume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import Any, Protocol

from meshnode.errors import UsageError
from meshnode.model import (
    BalancerConfig,
    Endpoint,
    HealthConfig,
    HostPort,
    OutlierConfig,
    ServiceSpec,
    service_name,
)


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
    name: str
    id: int  # unique among the services one agent knows; keys the kernel's service flags
    vip: IPv4Address
    port: int | None = None
    fail_closed: bool = False
    lb: BalancerConfig = field(default_factory=BalancerConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    endpoints: frozenset[EndpointRecord] = field(default_factory=frozenset)

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec(self.name, self.id, self.vip, self.port, self.fail_closed, self.lb,
                           self.outlier)

    def endpoint_set(self) -> frozenset[Endpoint]:
        return frozenset(e.endpoint for e in self.endpoints)

    def settings_json(self) -> dict[str, Any]:
        """Everything but the endpoints (which etcd keeps under leases of their own)."""
        return {"name": self.name, "id": self.id, "vip": str(self.vip), "port": self.port,
                "fail_closed": self.fail_closed, "lb": self.lb.to_wire(),
                "outlier": self.outlier.to_wire(), "health": self.health.to_wire()}

    def to_json(self) -> dict[str, Any]:
        return {**self.settings_json(),
                "endpoints": [e.to_json() for e in sorted(self.endpoints, key=lambda e: e.addr)]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServiceRecord:
        return cls(str(d["name"]), int(d["id"]), IPv4Address(d["vip"]), d.get("port"),
                   bool(d.get("fail_closed")), BalancerConfig.from_wire(d.get("lb")),
                   OutlierConfig.from_wire(d.get("outlier")),
                   HealthConfig.from_wire(d.get("health")),
                   frozenset(EndpointRecord.from_json(e) for e in d.get("endpoints", [])))


Listener = Callable[[], None]


class Registry(Protocol):
    """Services, VIPs and endpoints, shared by every agent that uses the same store.

    Reads come from a local snapshot and never block (an agent keeps serving from its last
    state when the store is unreachable); writes are coroutines. Endpoints written by an agent
    belong to its node: with etcd they live under that agent's lease, so a dead agent's
    endpoints disappear by themselves."""

    async def start(self) -> None:
        """Connect (and for a distributed store: load everything and start watching)."""
        ...

    async def close(self) -> None:
        """Stop watching; a distributed store also revokes this node's lease."""
        ...

    def services(self) -> dict[str, ServiceRecord]: ...

    async def ensure_service(self, name: str, *, port: int | None = None,
                             fail_closed: bool | None = None, lb: BalancerConfig | None = None,
                             outlier: OutlierConfig | None = None,
                             health: HealthConfig | None = None) -> ServiceRecord:
        """Create the service (allocating its VIP, unique across every agent) or update the
        settings given (None leaves one as it is)."""
        ...

    async def remove_service(self, name: str) -> None: ...

    async def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None:
        """Register endpoints of this node. ConflictError if an address is another service's."""
        ...

    async def remove_endpoints(self, name: str, addrs: Iterable[HostPort]) -> None: ...

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` after every change, local or (with etcd) from another agent."""
        ...

    def describe(self) -> dict[str, Any]:
        """For `meshnode status`: which store, connected or not, and the last error."""
        ...


def apply_settings(rec: ServiceRecord, *, port: int | None = None,
                   fail_closed: bool | None = None, lb: BalancerConfig | None = None,
                   outlier: OutlierConfig | None = None,
                   health: HealthConfig | None = None) -> ServiceRecord:
    """`rec` with the settings that are given; None keeps the current one."""
    return replace(
        rec,
        port=rec.port if port is None else port,
        fail_closed=rec.fail_closed if fail_closed is None else fail_closed,
        lb=rec.lb if lb is None else lb,
        outlier=rec.outlier if outlier is None else outlier,
        health=rec.health if health is None else health,
    )


def check_service_args(name: str, port: int | None) -> None:
    """What every registry checks before creating or changing a service."""
    service_name(name)
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"invalid service port {port}", "use a port from 1 to 65535")
