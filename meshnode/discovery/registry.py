"""The registry interface: resources, services with their VIPs, and endpoints.

One host uses the embedded store (`embedded.EmbeddedRegistry`), many hosts etcd
(`etcd.EtcdRegistry`), behind the same Protocol. The rules both stores follow are written
once, here and in meshnode.policy.store: the apply plan, VIP and id assignment (`VipRange`),
the field-level service patch of the CLI's shortcuts. Records are immutable snapshots; the
agent compiles them into what the workers, the kernel and the health checker need.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from meshnode import constants as C
from meshnode.errors import ConflictError, RegistryError, UsageError
from meshnode.model import (
    HostPort,
    service_name,
)
from meshnode.policy.document import parse
from meshnode.policy.records import EndpointRecord, ServiceRecord
from meshnode.policy.resources import Resource
from meshnode.policy.store import Delete, HistoryEntry, Outcome

__all__ = ["CAS_RETRIES", "ChangeFeed", "EndpointRecord", "Listener", "Registry",
           "ServiceRecord", "VipRange", "check_service_args", "patch_service",
           "service_record"]


class VipRange:
    """The VIP range, and service ids derived from a VIP's offset in it.

    The id keys the kernel's per-service flags on every host, so all agents must agree on it
    without talking to each other: the offset does that, and a VIP is never held by two
    services at once (the store guarantees it), so neither is an id. Both stores use it."""

    def __init__(self, cidr: str = C.VIP_CIDR) -> None:
        self.net = IPv4Network(cidr)
        self._hint = 1  # the lowest offset that may be free

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

    def first_free(self, taken: Callable[[IPv4Address], bool]) -> IPv4Address:
        """The lowest VIP not `taken`, scanning from the lowest one that may be free (so an
        allocation costs the allocations since the last release, not the mesh)."""
        base, last = int(self.net.network_address), self.net.num_addresses - 1
        for offset in range(max(self._hint, 1), last):
            ip = IPv4Address(base + offset)
            if not taken(ip):
                self._hint = offset
                return ip
        raise RegistryError(f"no free VIP left in {self.net}",
                            "remove unused services with: meshnode delete Service NAME")

    def release(self, vip: IPv4Address) -> None:
        """`vip` is free again: the next allocation may take it."""
        if vip in self.net:
            self._hint = min(self._hint, int(vip) - int(self.net.network_address))

    def assign(self, current: Mapping[str, IPv4Address], owners: Mapping[IPv4Address, str],
               puts: Iterable[Resource], deleted: Iterable[str] = ()
               ) -> dict[str, IPv4Address]:
        """The VIP of each Service put: its pinned one, else the one it has, else the first
        free. `current` is each service's VIP; `owners` each reserved VIP's service (it may
        hold reservations of services `current` does not know yet). ConflictError when a
        pinned VIP is another service's. Costs the services put, not the mesh."""
        gone = set(deleted)

        def owner(vip: IPv4Address) -> str | None:
            name = owners.get(vip)
            return None if name in gone else name

        out: dict[str, IPv4Address] = {}
        services = [r for r in puts if r.kind == "Service"]
        for r in services:  # pinned first, so an allocation never takes a pinned address
            if r.spec.vip is not None:
                out[r.name] = self.check_pinned(r.spec.vip, r.name)
        for r in services:
            if r.name not in out and r.name in current:
                out[r.name] = current[r.name]
        for name, vip in out.items():
            held_by = owner(vip)
            if held_by is not None and held_by != name and held_by not in out:
                raise ConflictError(f"Service {name}: VIP {vip} belongs to Service {held_by}",
                                    "pin another VIP, or leave spec.vip out")
        taken = set(out.values())
        for r in services:
            if r.name not in out:
                out[r.name] = self.first_free(lambda ip: ip in taken or owner(ip) is not None)
                taken.add(out[r.name])
        if len(taken) != len(out):
            raise ConflictError("two Services pin the same VIP",
                                "give each Service its own spec.vip")
        return out


Listener = Callable[[], None]


class ChangeFeed:
    """Which services' records changed, for consumers that must not scan the mesh to find
    out (the compiler): each change appends the service's name under a sequence number, and a
    consumer asks what changed since the number it last saw. None means "everything may
    have": the consumer fell further behind than the feed keeps, or the store was replaced
    whole (an etcd resync)."""

    def __init__(self, depth: int = 1 << 16) -> None:
        self.seq = 0
        self._log: deque[tuple[int, str]] = deque(maxlen=depth)
        self._floor = 0

    def add(self, name: str) -> None:
        self.seq += 1
        self._log.append((self.seq, name))

    def reset(self) -> None:
        self.seq += 1
        self._floor = self.seq
        self._log.clear()

    def since(self, cursor: int) -> set[str] | None:
        if cursor < self._floor or (self._log and cursor < self._log[0][0] - 1):
            return None
        out: set[str] = set()
        for seq, name in reversed(self._log):
            if seq <= cursor:
                break
            out.add(name)
        return out


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

    async def detach(self) -> None:
        """Stop watching but leave this node's entries (an agent restart: the next agent
        takes them over)."""
        ...

    def services(self) -> Mapping[str, ServiceRecord]:
        """A read-only view (not a copy: the mesh may be large); read it, do not keep it."""
        ...

    def changes(self, cursor: int) -> tuple[int, set[str] | None]:
        """(the feed's position now, the services changed since `cursor` or None: any)."""
        ...

    def resources(self) -> Mapping[tuple[str, str], Resource]:
        """Every stored resource, of every kind, with its version: a read-only view; read it,
        do not keep it across an await."""
        ...

    def revision(self) -> int:
        """The revision of the newest change to what agents serve (resources, VIPs,
        endpoints) in this snapshot; agents' reports do not move it, so agents that run the
        same data report the same number."""
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
        old = reg.resources().get(("Service", name))  # a view: no copy of the mesh
        base = old.spec_builtins() if old else {}
        merged = _merge(base, patch)
        health = merged.get("health") or {}
        if "interval" in (patch.get("health") or {}) and "timeout" not in (
                patch.get("health") or {}):
            # a check may not outlast its interval: a shorter interval brings the timeout along
            health["timeout"] = min(float(health.get("timeout", 1.0)), float(health["interval"]))
        new = parse({"kind": "Service", "name": name, "spec": merged,
                     "version": old.version if old else 0}, "service add")
        try:
            if old is None or new.spec != old.spec:
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


def service_record(name: str, resource: Resource | None, vip: IPv4Address | None,
                   vips: VipRange, endpoints: Iterable[EndpointRecord]) -> ServiceRecord | None:
    """A Service resource as the agent uses it, with its VIP and id; None until both the
    resource and its VIP are known (endpoints may arrive before their service)."""
    if resource is None or vip is None:
        return None
    return ServiceRecord(name, vips.id_of(vip), vip, resource.spec, resource.version,
                         frozenset(endpoints))


def check_service_args(name: str, port: int | None) -> None:
    """What every registry checks before creating or changing a service."""
    service_name(name)
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"invalid service port {port}", "use a port from 1 to 65535")
