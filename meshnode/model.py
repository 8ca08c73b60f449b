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
    """One address that serves a service. `pid` is set for enrolled local processes."""

    addr: HostPort
    pid: int | None = None

    def to_wire(self) -> str:
        return str(self.addr)

    @classmethod
    def from_wire(cls, text: str) -> Endpoint:
        return cls(HostPort.parse(text))


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What a proxy worker needs to route a service: its VIP and port."""

    name: str
    id: int
    vip: IPv4Address
    port: int | None  # VIP:port reaches every endpoint; None: VIP:P reaches endpoints on P
    fail_closed: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "vip": str(self.vip), "port": self.port,
                "fail_closed": self.fail_closed}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ServiceSpec:
        return cls(str(d["name"]), int(d["id"]), IPv4Address(d["vip"]),
                   None if d.get("port") is None else int(d["port"]), bool(d.get("fail_closed")))


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
