"""The registry interface: services, their VIPs and endpoints.

One host uses the embedded store (`embedded.EmbeddedRegistry`); many hosts will use etcd behind
the same Protocol. Records are immutable snapshots; the agent diffs snapshots into the
Reset/Add/Remove/DoesNotExist updates the proxy workers consume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Protocol

from meshnode.model import Endpoint, HostPort, ServiceSpec


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    addr: HostPort
    source: str  # "process" (an enrolled process's listener) or "static" (service add)
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"addr": str(self.addr), "source": self.source, "pid": self.pid}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EndpointRecord:
        return cls(HostPort.parse(d["addr"]), str(d["source"]), d.get("pid"))


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    name: str
    id: int
    vip: IPv4Address
    port: int | None = None
    fail_closed: bool = False
    endpoints: frozenset[EndpointRecord] = field(default_factory=frozenset)

    @property
    def spec(self) -> ServiceSpec:
        return ServiceSpec(self.name, self.id, self.vip, self.port, self.fail_closed)

    def endpoint_set(self) -> frozenset[Endpoint]:
        return frozenset(Endpoint(e.addr) for e in self.endpoints)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "vip": str(self.vip), "port": self.port,
                "fail_closed": self.fail_closed,
                "endpoints": [e.to_json() for e in sorted(self.endpoints, key=lambda e: e.addr)]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServiceRecord:
        return cls(str(d["name"]), int(d["id"]), IPv4Address(d["vip"]), d.get("port"),
                   bool(d.get("fail_closed")),
                   frozenset(EndpointRecord.from_json(e) for e in d.get("endpoints", [])))


Listener = Callable[[], None]


class Registry(Protocol):
    def services(self) -> dict[str, ServiceRecord]: ...

    def ensure_service(self, name: str, *, port: int | None = None,
                       fail_closed: bool | None = None) -> ServiceRecord:
        """Create the service (allocating its VIP) or update the given settings."""
        ...

    def remove_service(self, name: str) -> None: ...

    def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None: ...

    def remove_endpoints(self, name: str, addrs: Iterable[HostPort]) -> None: ...

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` after every change (it reads the new snapshot itself)."""
        ...
