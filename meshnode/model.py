"""Value types shared by every layer: addresses, services, endpoints, discovery updates,
and the capture state the agent hands to a capture backend.

Imports nothing of meshnode's but errors, the policy resources and labels (pure).
Their wire form is meshnode.wire's (generic: encoded and rebuilt field by field).
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from meshnode.errors import UsageError
from meshnode.policy.labels import Labels
from meshnode.policy.resources import (
    LB_ALGORITHMS,
    BalancerConfig,
    HealthConfig,
    OutlierConfig,
    ServicePolicy,
    check_name,
)

# re-exported: the balancers and the registry name these policy values by their model names
__all__ = ["LB_ALGORITHMS", "Add", "BalancerConfig", "CaptureRule", "CaptureState", "ClientAddr",
           "DoesNotExist", "Endpoint", "HealthConfig", "HostPort", "InboundRule", "Labels",
           "OrigDstAddr",
           "OutlierConfig",
           "PolicyView", "Remove", "Reset", "ServicePolicy", "ServiceSpec", "Update",
           "in_network", "service_name"]


def service_name(name: str) -> str:
    """Validate a service name: a DNS label, so `<name>.mesh` is always a valid name."""
    return check_name(name, "service")


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
    `weight` scales its share of traffic (1 is the norm); `labels` (sorted pairs, the canonical
    form of meshnode.policy.labels) put it in the subsets a Route's backend can name."""

    addr: HostPort
    node: str = ""
    zone: str = ""
    weight: int = 1
    labels: Labels = ()


class PolicyView:
    """The policy fields most readers want, on a value that carries a service's policy."""

    __slots__ = ()
    policy: ServicePolicy

    @property
    def port(self) -> int | None:
        """VIP:port reaches every endpoint; None: VIP:P reaches the endpoints on P."""
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


@dataclass(frozen=True, slots=True)
class ServiceSpec(PolicyView):
    """What a proxy worker needs to route a service: its id and VIP, and its policy (the
    Service resource's spec, meshnode.policy.resources.ServicePolicy) as one value, so a new
    per-service option reaches the workers without touching this class or the wire."""

    name: str
    id: int
    vip: IPv4Address
    policy: ServicePolicy = field(default_factory=ServicePolicy)

    @classmethod
    def build(cls, name: str, id: int, vip: IPv4Address, port: int | None = None,
              fail_closed: bool = False, lb: BalancerConfig | None = None,
              outlier: OutlierConfig | None = None) -> ServiceSpec:
        """A spec from the settings most callers (tests, the bench) give by hand."""
        return cls(name, id, vip, ServicePolicy(
            port=port, fail_mode="closed" if fail_closed else "open",
            balancer=lb or BalancerConfig(), outlier=outlier or OutlierConfig()))



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


# What the kernel must redirect: handed whole to a capture backend on every change.
@dataclass(frozen=True, order=True, slots=True)
class CaptureRule:
    """Connections to ip:port (port 0: any port, a service VIP) belong to `service_id`."""

    ip: IPv4Address
    port: int
    service_id: int


@dataclass(frozen=True, order=True, slots=True)
class InboundRule:
    """Plaintext TCP connections from other hosts to local port `port` (an endpoint of
    `service` on this host) are refused at once (`strict`: the service's mTLS mode is STRICT)
    or let through and counted (PERMISSIVE). Ports of DISABLE services have no rule; local
    sources always pass."""

    port: int
    service_id: int
    strict: bool
    service: str = ""  # the service's name, for the per-service counters


@dataclass(frozen=True, slots=True)
class LbTable:
    """What the kernel path balances a connect to one (service, VIP port) over (port 0: every
    port of the VIP, a service with a `port`): `slots`, each endpoint as often as its share of
    the weights, in the order the hook rotates through (or hashes into: `pick`, one of
    constants.LB_PICK_*). `close_removed`: connections to an endpoint that leaves the table
    are closed (the service's closeRemovedConnections)."""

    service_id: int
    port: int
    pick: int
    slots: tuple[HostPort, ...]
    close_removed: bool = False

    def shares(self) -> dict[str, int]:
        """Each endpoint ("ip:port") and how many slots it holds, by address."""
        counts: dict[str, int] = {}
        for a in sorted(self.slots):
            counts[str(a)] = counts.get(str(a), 0) + 1
        return counts

    def gone_since(self, old: LbTable | None) -> set[tuple[IPv4Address, int]]:
        """The endpoints of `old` that this table no longer holds."""
        if old is None:
            return set()
        return {(a.ip, a.port) for a in old.slots} - {(a.ip, a.port) for a in self.slots}


LbKey = tuple[int, int]  # (service id, VIP port or 0)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class CaptureState:
    rules: frozenset[CaptureRule] = field(default_factory=frozenset)
    ready: frozenset[int] = field(default_factory=frozenset)  # proxy can serve these now
    fail_closed: frozenset[int] = field(default_factory=frozenset)
    # Inbound enforcement of this host's endpoint ports (independent of `ready`: refusing
    # plaintext from other hosts needs no proxy).
    inbound: frozenset[InboundRule] = field(default_factory=frozenset)
    # The kernel path: services balanced in the kernel always (`kernel`) or while the proxy is
    # not ready (`fallback`), and their tables (only healthy endpoints are in them).
    kernel: frozenset[int] = field(default_factory=frozenset)
    fallback: frozenset[int] = field(default_factory=frozenset)
    lb: Mapping[LbKey, LbTable] = field(default_factory=dict, hash=False)
    # A hint like the one below: the tables that differ from `lb_since`'s (None: compare).
    lb_changed: frozenset[LbKey] = field(default_factory=frozenset, compare=False, repr=False)
    lb_since: Mapping[LbKey, LbTable] | None = field(default=None, compare=False, repr=False)
    # A hint, not part of the value: the rules removed and added since `base` (a weak
    # reference: states must not keep their ancestors' rule sets alive), the state the
    # compiler made before this one, so a backend that synced `base` applies the change
    # without comparing the mesh's rule sets.
    base: weakref.ref[CaptureState] | None = field(default=None, compare=False, repr=False)
    removed: frozenset[CaptureRule] = field(default_factory=frozenset, compare=False,
                                            repr=False)
    added: frozenset[CaptureRule] = field(default_factory=frozenset, compare=False, repr=False)

    def changes_since(self, old: CaptureState) -> tuple[frozenset[CaptureRule],
                                                         frozenset[CaptureRule]] | None:
        """(removed, added) since `old` when this state says so, else None (compare)."""
        if old is self:
            return frozenset(), frozenset()
        base = self.base() if self.base is not None else None
        return (self.removed, self.added) if base is old else None

    def redirected(self) -> list[CaptureRule]:
        """The rules the kernel redirects to the proxy now: those of ready services not on
        the kernel path."""
        return sorted(r for r in self.rules
                      if r.service_id in self.ready and r.service_id not in self.kernel)

    def balanced(self, service_id: int) -> bool:
        """Whether the kernel balances this service's connects now (the kernel path)."""
        return service_id in self.kernel or (service_id in self.fallback
                                             and service_id not in self.ready)

    def refused(self) -> list[CaptureRule]:
        """Rules of fail-closed services that are not ready: the kernel refuses them."""
        return sorted(r for r in self.rules
                      if r.service_id in self.fail_closed and r.service_id not in self.ready
                      and not self.balanced(r.service_id))

    def inbound_modes(self) -> dict[int, bool]:
        """Local port -> strict, as the kernel enforces it: a port two services share is
        strict if either is (a STRICT service's port never takes plaintext from elsewhere)."""
        modes: dict[int, bool] = {}
        for r in self.inbound:
            modes[r.port] = modes.get(r.port, False) or r.strict
        return modes


def in_network(ip: IPv4Address, cidr: str) -> bool:
    return ip in ipaddress.IPv4Network(cidr)
