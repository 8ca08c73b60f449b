"""The worker's service table, fed by discovery updates, and the routing decision for one
accepted connection by its original destination.

Owns: applying Reset / Add / Remove / DoesNotExist, the VIP and endpoint-address indexes, one
balancer per candidate set, and `ServiceTable.route` (the contract's rules a, b, c):
  (a) the destination's IP is a service VIP: if the service has a `port` and the destination port
      equals it, every endpoint is a candidate; otherwise the endpoints listening on the
      destination port. No candidate: `NoEndpoint`.
  (b) the destination is a known endpoint address: that service, that endpoint only.
  (c) anything else: `Passthrough` to the destination itself (fail open).

Updates are rare and routing happens per connection, so updates rebuild the derived tuples and
routing is a couple of dict lookups.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from meshnode.balance import Balancer
from meshnode.balance.round_robin import RoundRobin
from meshnode.model import (
    Add,
    DoesNotExist,
    Endpoint,
    HostPort,
    Remove,
    Reset,
    ServiceSpec,
    Update,
)

__all__ = ["NoEndpoint", "Passthrough", "Route", "ServiceTable", "ToService"]

log = logging.getLogger(__name__)

# Addresses are indexed by (ip, port) tuples, not HostPort: the model's dataclasses compare
# equal only to their own class, and an OrigDstAddr must find a HostPort-keyed endpoint.
_AddrKey = tuple[IPv4Address, int]


@dataclass(frozen=True, slots=True)
class ToService:
    """Connect to `attempts` in order; the first that answers serves the connection."""

    service: str
    attempts: Sequence[Endpoint]


@dataclass(frozen=True, slots=True)
class NoEndpoint:
    """A service destination with nothing to serve it: refuse the client."""

    service: str


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not a mesh destination: connect straight to it."""

    dst: HostPort


Route = ToService | NoEndpoint | Passthrough


class _Service:
    __slots__ = ("all", "balancers", "by_port", "endpoints", "spec")

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.endpoints: dict[_AddrKey, Endpoint] = {}  # insertion-ordered: stable rotation
        self.all: tuple[Endpoint, ...] = ()
        self.by_port: dict[int, tuple[Endpoint, ...]] = {}
        # One balancer per candidate set (None: all endpoints; P: those on port P), so each
        # set rotates on its own turn. They survive endpoint changes.
        self.balancers: dict[int | None, Balancer] = {}

    def rebuild(self) -> None:
        self.all = tuple(self.endpoints.values())
        by_port: dict[int, list[Endpoint]] = {}
        for ep in self.all:
            by_port.setdefault(ep.addr.port, []).append(ep)
        self.by_port = {port: tuple(eps) for port, eps in by_port.items()}


class ServiceTable:
    """Services by name, by VIP, and by endpoint address."""

    def __init__(self, balancer_factory: Callable[[], Balancer] = RoundRobin) -> None:
        self._new_balancer = balancer_factory
        self._services: dict[str, _Service] = {}
        self._by_vip: dict[IPv4Address, _Service] = {}
        # An address could be claimed by two services for a moment (an endpoint moving between
        # them); each address keeps its claimants in order and routes to the first.
        self._by_addr: dict[_AddrKey, dict[str, Endpoint]] = {}

    # -- updates -----------------------------------------------------------------------------

    def apply(self, update: Update) -> None:
        match update:
            case Reset(spec, eps):
                self._reset(spec, eps)
            case Add(name, eps):
                svc = self._services.get(name)
                if svc is None:
                    log.warning("add for unknown service %s ignored (no reset yet)", name)
                    return
                for ep in eps:
                    self._add_ep(svc, ep)
                svc.rebuild()
            case Remove(name, eps):
                svc = self._services.get(name)
                if svc is None:
                    return
                for ep in eps:
                    self._remove_ep(svc, _key(ep.addr))
                svc.rebuild()
            case DoesNotExist(name):
                self._drop(name)

    def _reset(self, spec: ServiceSpec, eps: Sequence[Endpoint]) -> None:
        old = self._services.get(spec.name)
        if old is not None:
            balancers = old.balancers
            self._drop(spec.name)
        else:
            balancers = {}
        svc = _Service(spec)
        svc.balancers = balancers
        self._services[spec.name] = svc
        self._by_vip[spec.vip] = svc
        for ep in eps:
            self._add_ep(svc, ep)
        svc.rebuild()

    def _drop(self, name: str) -> None:
        svc = self._services.pop(name, None)
        if svc is None:
            return
        if self._by_vip.get(svc.spec.vip) is svc:
            del self._by_vip[svc.spec.vip]
        for key in list(svc.endpoints):
            self._remove_ep(svc, key)

    def _add_ep(self, svc: _Service, ep: Endpoint) -> None:
        key = _key(ep.addr)
        svc.endpoints[key] = ep
        self._by_addr.setdefault(key, {})[svc.spec.name] = ep

    def _remove_ep(self, svc: _Service, key: _AddrKey) -> None:
        svc.endpoints.pop(key, None)
        claimants = self._by_addr.get(key)
        if claimants is not None:
            claimants.pop(svc.spec.name, None)
            if not claimants:
                del self._by_addr[key]

    # -- queries -----------------------------------------------------------------------------

    def route(self, dst: HostPort, key: int = 0) -> Route:
        """Where a connection to `dst` goes; `key` is handed to hash-based balancers."""
        svc = self._by_vip.get(dst.ip)
        if svc is not None:  # (a) a VIP
            port = svc.spec.port
            if port is not None and dst.port == port:
                candidates, set_key = svc.all, None
            else:
                candidates, set_key = svc.by_port.get(dst.port, ()), dst.port
            if not candidates:
                return NoEndpoint(svc.spec.name)
            balancer = svc.balancers.get(set_key)
            if balancer is None:
                balancer = svc.balancers[set_key] = self._new_balancer()
            return ToService(svc.spec.name, balancer.order(candidates, key))
        claimants = self._by_addr.get((dst.ip, dst.port))
        if claimants:  # (b) an endpoint address: exactly that endpoint
            name, ep = next(iter(claimants.items()))
            return ToService(name, (ep,))
        return Passthrough(dst)  # (c) not ours: fail open

    def services(self) -> list[str]:
        return list(self._services)

    def endpoints(self, name: str) -> tuple[Endpoint, ...]:
        svc = self._services.get(name)
        return svc.all if svc is not None else ()


def _key(addr: HostPort) -> _AddrKey:
    return (addr.ip, addr.port)
