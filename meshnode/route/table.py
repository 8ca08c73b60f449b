"""The worker's service table, fed by discovery updates, and the routing decision for one
accepted connection by its original destination.

Owns: applying Reset / Add / Remove / DoesNotExist, the VIP and endpoint-address indexes, and
per service: its endpoint load records (`Loads`, shared by its balancers), its outlier detector,
one balancer per candidate set built from the spec (`balance.factory.for_service`), and
`ServiceTable.route` (the contract's rules a, b, c):
  (a) the destination's IP is a service VIP: if the service has a `port` and the destination port
      equals it, every endpoint is a candidate; otherwise the endpoints listening on the
      destination port. No candidate: `NoEndpoint`. Else `ToService`: the candidates less the
      outlier-ejected ones (all of them if none would remain), in the balancer's order.
  (b) the destination is a known endpoint address: `ToEndpoint`, that service, that endpoint
      only, ejected or not.
  (c) anything else: `Passthrough` to the destination itself (fail open).

`ServiceTable.route_backend` is the same choice made by name, for a Route's backend (an L7
request's target, a TCP split's pick): the candidates are the service's endpoints on the port
(all of them when the backend names no port and the service has a `port`), less those that do
not carry every label of the backend's subset; one balancer per (port set, subset). A subset
with nothing in it is `NoEndpoint` with a `reason` the proxy can answer with (a 503's header).

The proxy worker routes every accepted connection through `route`, and `meshnode explain`
calls the same `route` on a table it fills from the agent's snapshot (`hold_ejections` replays
the workers' ejections into it), so the rules exist once.

Updates are rare and routing happens per connection, so updates rebuild the derived tuples and
routing is a couple of dict lookups, the outlier filter (a truth test when nothing is ejected)
and the balancer's pick. Load records and ejections survive Add/Remove for the endpoints that
stay; a Reset keeps them too, and rebuilds the balancers only when the spec's `lb` changed.

Pure and shared (worker and agent): imports only meshnode.model, meshnode.balance and
meshnode.policy.labels; never uvloop, bcc, pyroute2 or a process package (agent, proxy,
capture, bpf, host, discovery, cli).
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshnode.balance import Balancer
from meshnode.balance.factory import for_service
from meshnode.balance.load import Loads
from meshnode.balance.outlier import OutlierDetector
from meshnode.model import (
    Add,
    DoesNotExist,
    Endpoint,
    HostPort,
    Labels,
    Remove,
    Reset,
    ServicePolicy,
    ServiceSpec,
    Update,
)
from meshnode.policy.labels import carries, format_labels

__all__ = ["NoEndpoint", "Passthrough", "Route", "ServiceTable", "ToEndpoint", "ToService"]

log = logging.getLogger(__name__)

# Addresses are indexed by (ip, port) tuples of ints, not HostPort: the model's dataclasses
# compare equal only to their own class, and an OrigDstAddr must find a HostPort-keyed
# endpoint. Ints, since an IPv4Address hashes through hex() and a string on every lookup.
_AddrKey = tuple[int, int]
# A candidate set: None, every endpoint; P, those listening on port P. A subset's set is keyed
# (set, subset), so its balancer rotates apart from the whole set's.
_SetKey = int | None
_BalancerKey = _SetKey | tuple[_SetKey, Labels]


@dataclass(frozen=True, slots=True)
class ToService:
    """Connect to `attempts` in order; the first that answers serves the connection. Report
    each attempt to `balancer` (load feedback) and `outlier` (passive ejection)."""

    service: str
    attempts: Sequence[Endpoint]
    balancer: Balancer
    outlier: OutlierDetector


@dataclass(frozen=True, slots=True)
class ToEndpoint(ToService):
    """Rule (b): the client dialled an endpoint's own address, so `attempts` is that endpoint
    alone, never balanced and never left out for an ejection. A subclass, so the worker's
    `isinstance(route, ToService)` serves both rules at the same cost, and `explain` can tell
    them apart without restating the rules."""


@dataclass(frozen=True, slots=True)
class NoEndpoint:
    """A service destination with nothing to serve it: refuse the client. `reason` says why
    in one line ("no endpoint of reviews carries version=v3"), for a 503's header and explain."""

    service: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not a mesh destination: connect straight to it."""

    dst: HostPort


Route = ToService | NoEndpoint | Passthrough


class _Service:
    __slots__ = ("all", "balancers", "by_port", "endpoints", "hashes_client", "loads", "name",
                 "outlier", "port", "singles", "spec", "subsets")

    def __init__(self, spec: ServiceSpec, loads: Loads, outlier: OutlierDetector) -> None:
        self.spec = spec
        # Copied out of the spec: route() reads them per connection, and the spec's are
        # properties over its policy value (an attribute read is cheaper than a property call).
        self.name = spec.name
        self.port = spec.port
        self.hashes_client = spec.lb.algorithm == "ring-hash"  # wants route()'s client key
        self.endpoints: dict[_AddrKey, Endpoint] = {}  # insertion-ordered: stable rotation
        self.all: tuple[Endpoint, ...] = ()
        self.by_port: dict[int, tuple[Endpoint, ...]] = {}
        self.singles: dict[_AddrKey, tuple[Endpoint, ...]] = {}  # rule (b): one-endpoint sets
        self.loads = loads
        self.outlier = outlier
        # One balancer per candidate set (None: all endpoints; P: those on port P; and per
        # subset of either), so each set rotates on its own turn. They survive endpoint
        # changes; a new `lb` drops them.
        self.balancers: dict[_BalancerKey, Balancer] = {}
        # A subset's candidates, filled on first use and emptied by every endpoint change:
        # route_backend's per-request cost stays a dict lookup (and the outlier filter's
        # cache, which is by the tuple's identity, keeps hitting).
        self.subsets: dict[tuple[_SetKey, Labels], tuple[Endpoint, ...]] = {}

    def rebuild(self) -> None:
        self.all = tuple(self.endpoints.values())
        by_port: dict[int, list[Endpoint]] = {}
        for ep in self.all:
            by_port.setdefault(ep.addr.port, []).append(ep)
        self.by_port = {port: tuple(eps) for port, eps in by_port.items()}
        self.singles = {key: (ep,) for key, ep in self.endpoints.items()}
        self.subsets = {}
        self.loads.retain(self.all)
        self.outlier.retain(self.all)


class ServiceTable:
    """Services by name, by VIP, and by endpoint address."""

    def __init__(self, node: str = "", zone: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        # This worker's node and zone (locality), and the clock and RNG its balancers and
        # outlier detectors are given.
        self._node = node
        self._zone = zone
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._services: dict[str, _Service] = {}
        self._by_vip: dict[int, _Service] = {}
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
            # Keep what was learnt about the endpoints that stay (their EWMA, in-flight counts,
            # ejections); the balancers only while the algorithm and locality are unchanged.
            loads, outlier = old.loads, old.outlier
            outlier.config = spec.outlier
            balancers = old.balancers if old.spec.lb == spec.lb else {}
            self._drop(spec.name)
        else:
            loads = Loads(self._clock, self._node, self._zone)
            outlier = OutlierDetector(spec.outlier, self._clock)
            balancers = {}
        svc = _Service(spec, loads, outlier)
        svc.balancers = balancers
        self._services[spec.name] = svc
        self._by_vip[int(spec.vip)] = svc
        for ep in eps:
            self._add_ep(svc, ep)
        svc.rebuild()

    def _drop(self, name: str) -> None:
        svc = self._services.pop(name, None)
        if svc is None:
            return
        vip = int(svc.spec.vip)
        if self._by_vip.get(vip) is svc:
            del self._by_vip[vip]
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

    def route(self, dst: HostPort, client: tuple[str, int] | None = None) -> Route:
        """Where a connection to `dst` goes; `client` (the peer address) keys hash-based
        balancers (client affinity)."""
        ip = int(dst.ip)
        svc = self._by_vip.get(ip)
        if svc is not None:  # (a) a VIP
            port = svc.port
            if port is not None and dst.port == port:
                candidates, set_key = svc.all, None
            else:
                candidates, set_key = svc.by_port.get(dst.port, ()), dst.port
            if not candidates:
                return NoEndpoint(svc.name, _no_port(svc, dst.port))
            balancer = svc.balancers.get(set_key)
            if balancer is None:
                balancer = svc.balancers[set_key] = self._new_balancer(svc)
            healthy = svc.outlier.filter(candidates)
            key = _client_key(client) if svc.hashes_client else 0
            return ToService(svc.name, balancer.order(healthy, key), balancer, svc.outlier)
        addr = (ip, dst.port)
        claimants = self._by_addr.get(addr)
        if claimants:  # (b) an endpoint address: exactly that endpoint, ejected or not
            name = next(iter(claimants))
            svc = self._services[name]
            balancer = svc.balancers.get(None)
            if balancer is None:
                balancer = svc.balancers[None] = self._new_balancer(svc)
            return ToEndpoint(name, svc.singles[addr], balancer, svc.outlier)
        return Passthrough(dst)  # (c) not ours: fail open

    def route_backend(self, service: str, dst_port: int, subset: Labels = (),
                      port: int | None = None, client: tuple[str, int] | None = None
                      ) -> ToService | NoEndpoint:
        """Where a request (or connection) a Route sends to `service`'s `subset` goes: its
        endpoints listening on `port` (or `dst_port`, the port the client dialled), or all of
        them when `port` is None and the service has a `port` (VIP:port reaches every
        endpoint) or `dst_port` is 0 (a gateway's request: no service port was dialled),
        less those not carrying every label of `subset` (() : all). As `route` otherwise:
        outlier-ejected ones left out unless none would remain, the balancer's order,
        `client` keys ring-hash."""
        svc = self._services.get(service)
        if svc is None:
            return NoEndpoint(service, f"no service named {service}")
        set_key: _SetKey
        if port is None and (svc.port is not None or not dst_port):
            # VIP:port reaches every endpoint; so does a gateway's request (no port dialled)
            candidates, set_key = svc.all, None
        else:
            set_key = port or dst_port
            candidates = svc.by_port.get(set_key, ())
        key: _BalancerKey = set_key
        if subset:
            key = (set_key, subset)
            chosen = svc.subsets.get(key)
            if chosen is None:
                chosen = svc.subsets[key] = tuple(ep for ep in candidates
                                                  if carries(ep.labels, subset))
            candidates = chosen
        if not candidates:
            return NoEndpoint(svc.name, _why_none(svc, set_key, subset))
        balancer = svc.balancers.get(key)
        if balancer is None:
            balancer = svc.balancers[key] = self._new_balancer(svc)
        healthy = svc.outlier.filter(candidates)
        hash_key = _client_key(client) if svc.hashes_client else 0
        return ToService(svc.name, balancer.order(healthy, hash_key), balancer, svc.outlier)

    def _new_balancer(self, svc: _Service) -> Balancer:
        return for_service(svc.spec, self._node, self._zone, self._clock, self._rng, svc.loads)

    def services(self) -> list[str]:
        return list(self._services)

    def endpoints(self, name: str) -> tuple[Endpoint, ...]:
        svc = self._services.get(name)
        return svc.all if svc is not None else ()

    def spec(self, name: str) -> ServiceSpec | None:
        svc = self._services.get(name)
        return svc.spec if svc is not None else None

    def policy(self, name: str) -> ServicePolicy:
        """A routed service's policy (per connection: one dict lookup)."""
        svc = self._services.get(name)
        return svc.spec.policy if svc is not None else _DEFAULT_POLICY

    def hold_ejections(self, name: str, ejected_for: Mapping[HostPort, float]) -> None:
        """Eject these endpoints of service `name` for the given seconds from now, as the
        workers report them: `meshnode explain` replays the workers' ejections into a table of
        its own, so `route` leaves out exactly what theirs would. Unknown names and addresses
        are ignored (the workers may know an endpoint the snapshot no longer has)."""
        svc = self._services.get(name)
        if svc is None:
            return
        known = {ep.addr for ep in svc.all}
        svc.outlier.hold({addr: secs for addr, secs in ejected_for.items()
                          if addr in known and secs > 0})

    def endpoint_report(self, name: str) -> dict[str, dict[str, float | int]]:
        """Per endpoint of a current service: the stats message's `endpoints` entry."""
        svc = self._services.get(name)
        if svc is None:
            return {}
        report: dict[str, dict[str, float | int]] = {}
        now = self._clock()
        for ep in svc.all:
            rec = svc.loads.find(ep.addr)
            if rec is None:
                continue
            report[str(ep.addr)] = {
                "active": rec.inflight, "connections": rec.connections,
                "connect_errors": rec.failures, "ewma_ms": round(rec.ewma.peek(now) * 1000, 3),
                "ejected_for": round(svc.outlier.ejected_for(ep.addr), 3)}
        return report


_DEFAULT_POLICY = ServicePolicy()


def _no_port(svc: _Service, port: int) -> str:
    return (f"{svc.name} has no endpoint on port {port}" if svc.all
            else f"{svc.name} has no endpoints")


def _why_none(svc: _Service, set_key: _SetKey, subset: Labels) -> str:
    """Why a candidate set came out empty (the failure path only: it may scan)."""
    if not svc.all:
        return f"{svc.name} has no endpoints"
    if set_key is not None and not svc.by_port.get(set_key):
        return _no_port(svc, set_key)
    wanted = format_labels(subset)
    if set_key is not None and any(carries(ep.labels, subset) for ep in svc.all):
        return f"no endpoint of {svc.name} on port {set_key} carries {wanted}"
    return f"no endpoint of {svc.name} carries {wanted}"


def _client_key(client: tuple[str, int] | None) -> int:
    """The client's IPv4 address as an integer: the ring-hash key. An int, not a ClientAddr:
    no validation needed, and only ring-hash services pay for it."""
    try:
        return int.from_bytes(socket.inet_aton(client[0]), "big") if client else 0
    except (OSError, TypeError, IndexError):
        return 0


def _key(addr: HostPort) -> _AddrKey:
    return (int(addr.ip), addr.port)
