"""The local mirror of the etcd registry: what `services()` serves without ever blocking.

Built from a full read of the prefix (a Reset, which also drops whatever the previous state
held) and then kept current by the watch's events and by the results of this agent's own
writes, so an agent reads its writes at once instead of waiting for its watch. Both feed the
same per-key mod revisions: an event older than what a key holds is stale and is dropped, and
keys this agent deleted keep a tombstone until the watch has passed that revision, so a late
event cannot bring them back. The cache file is this mirror as JSON: an agent restarting while
etcd is down serves it. No network I/O here; imports no etcd client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any

from meshnode.discovery.etcd_keys import (
    EndpointKey,
    HostKey,
    KeyLayout,
    ResourceKey,
    VipKey,
    decode_endpoint,
)
from meshnode.discovery.registry import (
    ChangeFeed,
    EndpointRecord,
    ServiceRecord,
    VipRange,
    service_record,
)
from meshnode.errors import RegistryError
from meshnode.host.statefile import write_atomic
from meshnode.model import HostPort
from meshnode.policy import store
from meshnode.policy.resources import Resource

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 1: services with inline settings (ignored: etcd refills the cache)

# (service, node, addr): what one endpoint key names
EndpointId = tuple[str, str, HostPort]


class Mirror:
    def __init__(self, layout: KeyLayout, vips: VipRange) -> None:
        self.layout = layout
        self.vips = vips
        self.revision = 0  # every watch event up to here is applied
        self.data_revision = 0  # the newest change to what agents serve (not their reports)
        self.feed = ChangeFeed()
        self._revs: dict[bytes, int] = {}  # mod revision of each key held
        self._tombs: dict[bytes, int] = {}  # deleted by our own writes, ahead of the watch
        self._resources: dict[tuple[str, str], Resource] = {}
        self._vip: dict[str, IPv4Address] = {}  # each Service's VIP (its resource's status)
        self._eps: dict[str, dict[tuple[str, HostPort], tuple[EndpointRecord, int]]] = {}
        self._hosts: dict[str, dict[str, Any]] = {}  # every agent's report
        self._reserved: dict[IPv4Address, str] = {}  # VIP reservation keys: their service
        self._view: dict[str, ServiceRecord] = {}
        self._view_proxy = MappingProxyType(self._view)
        self._resources_view = MappingProxyType(self._resources)

    # -- reads ----------------------------------------------------------------------------
    def services(self) -> Mapping[str, ServiceRecord]:
        return self._view_proxy

    def resources(self) -> Mapping[tuple[str, str], Resource]:
        """A read-only view: read it, do not keep it across an await."""
        return self._resources_view

    def vip_of(self, name: str) -> IPv4Address | None:
        return self._vip.get(name)

    def reserved_vips(self) -> Mapping[IPv4Address, str]:
        """Every VIP reservation and its service (a live view: read, do not keep)."""
        return self._reserved

    def service_vips(self) -> Mapping[str, IPv4Address]:
        """Every known Service's VIP (a live view: read, do not keep)."""
        return self._vip

    def hosts(self) -> dict[str, dict[str, Any]]:
        return dict(self._hosts)

    def endpoint(self, service: str, node: str, addr: HostPort
                 ) -> tuple[EndpointRecord, int] | None:
        """One endpoint key's record and lease, if held."""
        return self._eps.get(service, {}).get((node, addr))

    def endpoints_of_node(self, node: str) -> dict[EndpointId, tuple[EndpointRecord, int]]:
        """Every endpoint key `node` holds (including those of unknown services), with the
        lease each is bound to."""
        return {(svc, n, addr): v for svc, eps in self._eps.items()
                for (n, addr), v in eps.items() if n == node}

    def endpoint_nodes(self, service: str, addrs: set[HostPort]) -> list[tuple[str, HostPort]]:
        return [(n, a) for (n, a) in self._eps.get(service, {}) if a in addrs]

    # -- changes --------------------------------------------------------------------------
    def reset(self, kvs: Iterable[tuple[bytes, bytes, int, int]], revision: int) -> None:
        """Replace everything with a full read at `revision`: (key, value, mod_rev, lease)."""
        self.revision = revision
        self.data_revision = 0
        self.feed.reset()
        self._revs.clear()
        self._tombs.clear()
        self._resources.clear()
        self._vip.clear()
        self._eps.clear()
        self._hosts.clear()
        self._reserved.clear()
        self._view.clear()
        for key, value, rev, lease in kvs:
            if self._put(key, value, rev, lease) is not None:
                self.data_revision = max(self.data_revision, rev)
        for name in {n for k, n in self._resources if k == "Service"} | set(self._eps):
            self._rebuild(name)

    def put(self, key: bytes, value: bytes, rev: int, lease: int) -> str | None:
        """Apply a put; what changed (a service's name, or another resource's kind/name), if
        anything the agent serves from did."""
        if rev <= max(self._revs.get(key, 0), self._tombs.get(key, 0)):
            return None  # already applied (our own write), or older than what we hold
        name = self._put(key, value, rev, lease)
        if name is not None:
            self.data_revision = max(self.data_revision, rev)
            self._rebuild(name)
        return name

    def delete(self, key: bytes, rev: int, *, local: bool = False) -> str | None:
        """Apply a delete. `local`: the result of our own write, which the watch has not
        delivered yet; keep a tombstone so older events for the key are dropped."""
        name = self._delete(key, rev, local)
        if name is not None:
            self.data_revision = max(self.data_revision, rev)
        return name

    def _delete(self, key: bytes, rev: int, local: bool) -> str | None:
        if rev <= self._revs.get(key, 0):
            return None
        if local:
            self._tombs[key] = max(rev, self._tombs.get(key, 0))
        self._revs.pop(key, None)
        parsed = self.layout.parse(key)
        if isinstance(parsed, ResourceKey):
            if self._resources.pop((parsed.kind, parsed.name), None) is None:
                return None
            if parsed.kind != "Service":
                return f"{parsed.kind}/{parsed.name}"
            self._vip.pop(parsed.name, None)
            self._rebuild(parsed.name)
            return parsed.name
        if isinstance(parsed, HostKey):
            # reports do not shape what the agent serves: no listener hears of them (an agent
            # reacting to another's report would report again, and so on round the mesh)
            self._hosts.pop(parsed.node, None)
            return None
        if isinstance(parsed, VipKey):
            if self._reserved.pop(parsed.vip, None) is not None:
                self.vips.release(parsed.vip)
            return None
        if isinstance(parsed, EndpointKey):
            eps = self._eps.get(parsed.service, {})
            if eps.pop((parsed.node, parsed.addr), None) is None:
                return None
            if not eps:
                self._eps.pop(parsed.service, None)
            self._rebuild(parsed.service)
            return parsed.service
        return None

    def drop_lease(self, node: str, lease: int) -> None:
        """Forget `node`'s endpoints bound to `lease`: we revoked it, and stop watching."""
        for (svc, n, addr), (_, held) in self.endpoints_of_node(node).items():
            if held == lease:
                key = self.layout.endpoint(svc, n, addr)
                self._revs.pop(key, None)
                self._eps[svc].pop((n, addr), None)
                if not self._eps[svc]:
                    del self._eps[svc]
                self._rebuild(svc)

    def advance(self, revision: int) -> None:
        """The watch has delivered everything up to `revision`: tombstones at or below it have
        done their job."""
        self.revision = max(self.revision, revision)
        if self._tombs:
            self._tombs = {k: r for k, r in self._tombs.items() if r > self.revision}

    def _put(self, key: bytes, value: bytes, rev: int, lease: int) -> str | None:
        parsed = self.layout.parse(key)
        try:
            if isinstance(parsed, ResourceKey):
                r, status = store.decode(value, rev)
                if r.key != (parsed.kind, parsed.name):
                    raise RegistryError(f"the document names {r.kind} {r.name}",
                                        "rewrite it with meshnode apply")
                if r.kind == "Service":
                    vip = IPv4Address(str(status.get("vip")))
                    self.vips.id_of(vip)  # inside the range, or not a service of this mesh
                    self._vip[r.name] = vip
                self._resources[r.key] = r
                self._revs[key] = rev
                return r.name if r.kind == "Service" else f"{r.kind}/{r.name}"
            if isinstance(parsed, VipKey):
                self._reserved[parsed.vip] = value.decode()
                self._revs[key] = rev
                return None
            if isinstance(parsed, HostKey):
                self._hosts[parsed.node] = {**json.loads(value), "node": parsed.node}
                self._revs[key] = rev
                return None
            if isinstance(parsed, EndpointKey):
                ep = decode_endpoint(value)
                # the key says who owns it (its lease is that node's), whatever the value says
                ep = replace(ep, addr=parsed.addr, node=parsed.node)
                self._eps.setdefault(parsed.service, {})[(parsed.node, parsed.addr)] = (ep,
                                                                                         lease)
                self._revs[key] = rev
                return parsed.service
        except (RegistryError, ValueError, TypeError, RecursionError) as exc:
            # someone wrote garbage (by hand, or a newer format): skip that key, keep the rest
            # (TypeError: a host report that is JSON but no object)
            log.warning("ignoring etcd key %r: %s", key, exc)
            return self.delete(key, rev)
        return None  # VIP reservations, claims and history do not shape the snapshot

    def _rebuild(self, name: str) -> None:
        self.feed.add(name)
        # endpoints of a service that does not exist (yet) are kept but not shown
        rec = service_record(name, self._resources.get(("Service", name)), self._vip.get(name),
                             self.vips, (e for e, _ in self._eps.get(name, {}).values()))
        if rec is None:
            self._view.pop(name, None)
        else:
            self._view[name] = rec

    # -- the cache file -------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the snapshot atomically (host/statefile.py); StateError when it cannot."""
        write_cache(path, self.cache_snapshot())

    def cache_snapshot(self) -> CacheSnapshot:
        """What the cache file holds, copied (cheaply: the records are immutable) so that it
        can be written from another thread while the watch goes on changing the mirror."""
        return CacheSnapshot(self.layout.prefix, self.revision, self.data_revision,
                             dict(self._resources), dict(self._vip),
                             {name: tuple(e for e, _ in eps.values())
                              for name, eps in self._eps.items()})

    def load(self, path: Path) -> bool:
        """Serve the cache until etcd answers. False (and empty) without a usable cache."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            if data.get("format") != CACHE_FORMAT or data.get("prefix") != self.layout.prefix:
                return False
            items = [(item, *store.decode(json.dumps(item["doc"]).encode(),
                                          int(item["version"])))
                     for item in data.get("resources", [])]
            # every VIP read (and checked against the range) before anything is replaced
            vips = {r.name: IPv4Address(item["vip"]) for item, r, _ in items
                    if r.kind == "Service"}
            for vip in vips.values():
                self.vips.id_of(vip)
            eps = {name: [EndpointRecord.from_json(e) for e in recs]
                   for name, recs in data.get("endpoints", {}).items()}
            revision = int(data.get("revision", 0))
            data_revision = int(data.get("data_revision", revision))
        except FileNotFoundError:
            return False
        except Exception as exc:
            # only a cache: etcd is the truth, so a bad file costs nothing but a warning
            log.warning("ignoring the etcd cache %s: %s", path, exc)
            return False
        self.reset([], 0)  # revision 0: the first Reset from etcd replaces every key
        for _, r, _ in items:
            self._resources[r.key] = r
        self._vip.update(vips)
        for name, recs in eps.items():
            self._eps[name] = {(e.node, e.addr): (e, 0) for e in recs}
        for name in {n for k, n in self._resources if k == "Service"}:
            self._rebuild(name)
        self.revision, self.data_revision = revision, data_revision
        return True


@dataclass(frozen=True)
class CacheSnapshot:
    prefix: str
    revision: int
    data_revision: int
    resources: dict[tuple[str, str], Resource]
    vips: dict[str, IPv4Address]
    endpoints: dict[str, tuple[EndpointRecord, ...]]


def write_cache(path: Path, snap: CacheSnapshot) -> None:
    """The cache file (compact JSON: it can be megabytes), atomically; StateError when it
    cannot be written. Safe to run off the agent's loop."""
    data = {"format": CACHE_FORMAT, "prefix": snap.prefix, "revision": snap.revision,
            "data_revision": snap.data_revision,
            "resources": [{"doc": r.to_doc(with_version=False), "version": r.version,
                           "vip": str(snap.vips[n]) if k == "Service" else None}
                          for (k, n), r in sorted(snap.resources.items())
                          if k != "Service" or n in snap.vips],
            "endpoints": {name: [e.to_json() for e in eps]
                          for name, eps in sorted(snap.endpoints.items())}}
    write_atomic(path, json.dumps(data, separators=(",", ":")).encode())
