"""Value types shared by every layer: addresses, services, endpoints, discovery updates,
and the capture state the agent hands to a capture backend.

Imports nothing of meshnode's but errors.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from meshnode.errors import UsageError

_SERVICE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def service_name(name: str) -> str:
    """Validate a service name: a DNS label, so `<name>.mesh` is always a valid name."""
    if not _SERVICE_RE.match(name):
        raise UsageError(
            f"invalid service name {name!r}",
            "use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric",
        )
    return name


@dataclass(frozen=True, order=True, slots=True)
class HostPort:
    """An IPv4 address and TCP port."""

    ip: IPv4Address
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UsageError(f"port {self.port} out of range", "use a port from 1 to 65535")

    @classmethod
    def parse(cls, text: str) -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"invalid address {text!r}",
                             "write it as IPv4:PORT, e.g. 127.0.0.1:8080")
        try:
            ip = IPv4Address(host)
        except ValueError:
            raise UsageError(
                f"invalid address {text!r}: {host!r} is not an IPv4 address",
                "write it as IPv4:PORT, e.g. 127.0.0.1:8080",
            ) from None
        return cls(ip, int(port))

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"

    def __hash__(self) -> int:
        # Hashed per proxied connection (balancer, outlier and counter lookups); an
        # IPv4Address hashes through hex() and a string, about three times slower than this.
        return hash((int(self.ip), self.port))

    def pair(self) -> tuple[str, int]:
        return (str(self.ip), self.port)


class OrigDstAddr(HostPort):
    """Where a captured client meant to connect (recovered from the kernel)."""

    __slots__ = ()


class ClientAddr(HostPort):
    """The peer address of an accepted, captured connection."""

    __slots__ = ()


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """One address that serves a service, as the balancers see it.

    `node` names the agent (host) it runs on and `zone` that host's zone, for locality;
    `weight` scales its share of traffic (1 is the norm)."""

    addr: HostPort
    node: str = ""
    zone: str = ""
    weight: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {"addr": str(self.addr), "node": self.node, "zone": self.zone,
                "weight": self.weight}

    @classmethod
    def from_wire(cls, d: dict[str, Any] | str) -> Endpoint:
        if isinstance(d, str):
            return cls(HostPort.parse(d))
        return cls(HostPort.parse(d["addr"]), str(d.get("node", "")), str(d.get("zone", "")),
                   int(d.get("weight", 1)))


LB_ALGORITHMS = ("p2c-ewma", "round-robin", "random", "ring-hash")


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """How a service's endpoints are chosen. `algorithm` is one of LB_ALGORITHMS; `locality`
    prefers endpoints on this node, then this zone, spilling over when they are unhealthy or
    overloaded; ring-hash hashes the client address."""

    algorithm: str = "p2c-ewma"
    locality: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in LB_ALGORITHMS:
            raise UsageError(f"unknown balancing algorithm {self.algorithm!r}",
                             "use one of: " + ", ".join(LB_ALGORITHMS))

    def to_wire(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "locality": self.locality}

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None) -> BalancerConfig:
        d = d or {}
        return cls(str(d.get("algorithm", "p2c-ewma")), bool(d.get("locality", True)))


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive ejection: `consecutive_failures` connect failures in a row eject an endpoint
    for `base_ejection` seconds times the number of times it was ejected (at most
    `max_ejection`), never more than `max_ejected_share` of the service's endpoints at once."""

    consecutive_failures: int = 5
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    max_ejected_share: float = 0.5

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or not 0 <= self.max_ejected_share <= 1:
            raise UsageError("invalid outlier settings",
                             "consecutive failures >= 1, ejected share between 0 and 1")

    def to_wire(self) -> dict[str, Any]:
        return {"consecutive_failures": self.consecutive_failures,
                "base_ejection": self.base_ejection, "max_ejection": self.max_ejection,
                "max_ejected_share": self.max_ejected_share}

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None) -> OutlierConfig:
        return cls(**(d or {}))


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Active checks the agent runs against every endpoint of a service. `kind`: "tcp"
    (connect), "http" (GET `path`, 2xx is healthy) or "none"."""

    kind: str = "tcp"
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "http", "none"):
            raise UsageError(f"unknown health check {self.kind!r}", "use tcp, http or none")
        if self.interval <= 0 or self.timeout <= 0 or self.timeout > self.interval:
            raise UsageError("invalid health check timing",
                             "use 0 < timeout <= interval (seconds)")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise UsageError("invalid health thresholds", "thresholds are counts >= 1")
        if not self.path.startswith("/"):
            raise UsageError(f"invalid health check path {self.path!r}", "start it with /")

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "interval": self.interval,
                "timeout": self.timeout, "healthy_threshold": self.healthy_threshold,
                "unhealthy_threshold": self.unhealthy_threshold}

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None) -> HealthConfig:
        return cls(**(d or {}))


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What a proxy worker needs to route a service: its VIP, port and balancing policy."""

    name: str
    id: int
    vip: IPv4Address
    port: int | None  # VIP:port reaches every endpoint; None: VIP:P reaches endpoints on P
    fail_closed: bool = False
    lb: BalancerConfig = field(default_factory=BalancerConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "vip": str(self.vip), "port": self.port,
                "fail_closed": self.fail_closed, "lb": self.lb.to_wire(),
                "outlier": self.outlier.to_wire()}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ServiceSpec:
        return cls(str(d["name"]), int(d["id"]), IPv4Address(d["vip"]),
                   None if d.get("port") is None else int(d["port"]), bool(d.get("fail_closed")),
                   BalancerConfig.from_wire(d.get("lb")), OutlierConfig.from_wire(d.get("outlier")))


# Discovery updates, as a balancer consumes them (after linkerd2-proxy's resolve stream).
@dataclass(frozen=True, slots=True)
class Reset:
    service: ServiceSpec
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Add:
    service: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Remove:
    service: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class DoesNotExist:
    service: str


Update = Reset | Add | Remove | DoesNotExist


def update_to_wire(u: Update) -> dict[str, Any]:
    match u:
        case Reset(service, eps):
            return {"t": "reset", "service": service.to_wire(), "eps": [e.to_wire() for e in eps]}
        case Add(name, eps):
            return {"t": "add", "service": name, "eps": [e.to_wire() for e in eps]}
        case Remove(name, eps):
            return {"t": "remove", "service": name, "eps": [e.to_wire() for e in eps]}
        case DoesNotExist(name):
            return {"t": "gone", "service": name}
    raise TypeError(u)


def update_from_wire(d: dict[str, Any]) -> Update:
    t = d["t"]
    if t == "reset":
        return Reset(ServiceSpec.from_wire(d["service"]),
                     tuple(Endpoint.from_wire(e) for e in d["eps"]))
    if t == "add":
        return Add(d["service"], tuple(Endpoint.from_wire(e) for e in d["eps"]))
    if t == "remove":
        return Remove(d["service"], tuple(Endpoint.from_wire(e) for e in d["eps"]))
    if t == "gone":
        return DoesNotExist(d["service"])
    raise ValueError(f"unknown update {t!r}")


# What the kernel must redirect: handed whole to a capture backend on every change.
@dataclass(frozen=True, order=True, slots=True)
class CaptureRule:
    """Connections to ip:port (port 0: any port, a service VIP) belong to `service_id`."""

    ip: IPv4Address
    port: int
    service_id: int


@dataclass(frozen=True, slots=True)
class CaptureState:
    rules: frozenset[CaptureRule] = field(default_factory=frozenset)
    ready: frozenset[int] = field(default_factory=frozenset)  # proxy can serve these now
    fail_closed: frozenset[int] = field(default_factory=frozenset)

    def redirected(self) -> list[CaptureRule]:
        """The rules the kernel redirects now: those of ready services."""
        return sorted(r for r in self.rules if r.service_id in self.ready)

    def refused(self) -> list[CaptureRule]:
        """Rules of fail-closed services that are not ready: the kernel refuses them."""
        return sorted(r for r in self.rules
                      if r.service_id in self.fail_closed and r.service_id not in self.ready)


def in_network(ip: IPv4Address, cidr: str) -> bool:
    return ip in ipaddress.IPv4Network(cidr)
