"""The embedded registry: one host's resources, VIPs and endpoints in a JSON file that survives
agent restarts.

Every write bumps the store's revision, and the resources it writes take it as their version
(as etcd's mod revision does), so versions are comparable across kinds. An apply is planned by
meshnode.policy.store (compare-and-swap, references) and written with one atomic file
replacement: all of it or nothing. VIPs come from the loopback range in constants.VIP_CIDR
(`VipRange`, the same ids as etcd), so a connection to a VIP that capture missed is refused on
the host and never leaves it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from meshnode import constants as C
from meshnode.discovery.registry import (
    EndpointRecord,
    Listener,
    ServiceRecord,
    VipRange,
    service_records,
)
from meshnode.errors import ConflictError, NotFoundError, RegistryError
from meshnode.model import HostPort
from meshnode.policy import store
from meshnode.policy.resources import Resource
from meshnode.policy.store import Delete, HistoryEntry, Outcome

FORMAT = 2  # 1: services with their settings inline (read and converted on load)


class EmbeddedRegistry:
    def __init__(self, path: Path, vip_cidr: str = C.VIP_CIDR) -> None:
        self.path = path
        self._vips = VipRange(vip_cidr)
        self._listeners: list[Listener] = []
        self._revision = 0
        self._resources: dict[tuple[str, str], Resource] = {}
        self._status: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: dict[tuple[str, str], list[HistoryEntry]] = {}
        self._endpoints: dict[str, frozenset[EndpointRecord]] = {}
        self._services: dict[str, ServiceRecord] = {}
        self._host: dict[str, Any] = {}
        self._load()

    # -- persistence ----------------------------------------------------------------------
    def _load(self) -> None:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
            if int(data.get("format", 1)) == 1:
                data = _from_format_1(data)
            self._revision = int(data["revision"])
            for item in data["resources"]:
                doc = dict(item["doc"])
                r, status = store.decode(json.dumps(doc).encode(), int(item["version"]))
                self._resources[r.key] = r
                self._status[r.key] = {**status, **item.get("status", {})}
            for key, entries in data.get("history", {}).items():
                kind, _, name = key.partition("/")
                self._history[(kind, name)] = [HistoryEntry.from_json(e) for e in entries]
            for name, eps in data.get("endpoints", {}).items():
                self._endpoints[name] = frozenset(EndpointRecord.from_json(e) for e in eps)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, RegistryError) as exc:
            raise RegistryError(f"registry file {self.path} is unreadable: {exc}",
                                "fix or move the file away; the agent starts empty without it"
                                ) from exc
        self._rebuild()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT, "revision": self._revision,
            "resources": [{"doc": r.to_doc(with_version=False), "version": r.version,
                           "status": self._status.get(k, {})}
                          for k, r in sorted(self._resources.items())],
            "history": {f"{k}/{n}": [e.to_json() for e in h]
                        for (k, n), h in sorted(self._history.items())},
            "endpoints": {name: [e.to_json() for e in sorted(eps, key=lambda e: e.addr)]
                          for name, eps in sorted(self._endpoints.items()) if eps},
        }
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _rebuild(self) -> None:
        vips = {n: IPv4Address(self._status[(k, n)]["vip"]) for (k, n) in self._resources
                if k == "Service"}
        self._services = service_records(self._resources, vips, self._vips, self._endpoints)

    def _commit(self, undo: dict[str, Any]) -> None:
        """Write the new state; on a failed write put the old one back (nothing half-done)."""
        try:
            self._save()
        except OSError as exc:
            self.__dict__.update(undo)
            self._rebuild()
            raise RegistryError(f"cannot write the registry file {self.path}: "
                                f"{exc.strerror or exc}",
                                "free space or fix permissions in the state directory") from exc
        self._rebuild()
        for listener in list(self._listeners):
            listener()

    def _snapshot(self) -> dict[str, Any]:
        return {"_revision": self._revision, "_resources": dict(self._resources),
                "_status": dict(self._status), "_history": dict(self._history),
                "_endpoints": dict(self._endpoints)}

    # -- queries --------------------------------------------------------------------------
    def services(self) -> dict[str, ServiceRecord]:
        return dict(self._services)

    def resources(self) -> dict[tuple[str, str], Resource]:
        return dict(self._resources)

    def revision(self) -> int:
        return self._revision

    async def history(self, kind: str, name: str) -> list[HistoryEntry]:
        return list(self._history.get((kind, name), []))

    def owner_of(self, addr: HostPort) -> str | None:
        for name, eps in self._endpoints.items():
            if any(e.addr == addr for e in eps):
                return name
        return None

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def publish_host(self, report: Mapping[str, Any]) -> None:
        self._host = dict(report)  # one host: nobody else reads it, so memory is enough

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {str(self._host.get("node", "")): dict(self._host)} if self._host else {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"backend": "embedded", "path": str(self.path), "connected": True,
                "revision": self._revision}

    # -- changes --------------------------------------------------------------------------
    async def apply(self, puts: Sequence[Resource], deletes: Sequence[Delete] = ()
                    ) -> list[Outcome]:
        outcomes = store.plan(self._resources, puts, deletes)
        if all(o.action == "unchanged" for o in outcomes):
            return outcomes
        current = {n: IPv4Address(self._status[(k, n)]["vip"]) for (k, n) in self._resources
                   if k == "Service"}
        changed = [r for r, o in zip(puts, outcomes, strict=False) if o.action != "unchanged"]
        vips = self._vips.assign(current, changed,
                                 [d.name for d in deletes if d.kind == "Service"])
        undo = self._snapshot()
        self._revision += 1
        rev, now = self._revision, time.time()
        done: list[Outcome] = []
        for o in outcomes:
            key = (o.kind, o.name)
            if o.action == "unchanged":
                done.append(o)
                continue
            hist = self._history.get(key, [])
            if o.action == "deleted":
                del self._resources[key]
                self._status.pop(key, None)
                if o.kind == "Service":
                    self._endpoints.pop(o.name, None)
                self._history[key] = store.trimmed(hist, HistoryEntry(rev, None, now))
                done.append(o)
                continue
            r = next(p for p in puts if p.key == key)
            self._resources[key] = Resource(r.kind, r.name, r.spec, rev)
            if o.kind == "Service":
                self._status[key] = {"vip": str(vips[o.name])}
            self._history[key] = store.trimmed(hist, HistoryEntry(rev, r.spec_builtins(), now))
            done.append(Outcome(o.kind, o.name, o.action, rev))
        self._commit(undo)
        return done

    async def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None:
        if name not in self._services:
            raise NotFoundError(f"no service named {name!r}",
                                f"create it: meshnode service add {name}")
        have = self._endpoints.get(name, frozenset())
        new = {e for e in endpoints if e not in have}
        for e in new:
            owner = self.owner_of(e.addr)
            if owner is not None and owner != name:
                raise ConflictError(f"endpoint {e.addr} already belongs to service {owner!r}",
                                    f"remove it there first: meshnode service remove {owner} "
                                    f"--endpoint {e.addr}")
        if new:
            undo = self._snapshot()
            self._revision += 1
            self._endpoints[name] = have | new
            self._commit(undo)

    async def remove_endpoints(self, name: str, addrs: Iterable[HostPort]) -> None:
        have = self._endpoints.get(name)
        if not have:
            return
        gone = set(addrs)
        kept = frozenset(e for e in have if e.addr not in gone)
        if kept != have:
            undo = self._snapshot()
            self._revision += 1
            self._endpoints[name] = kept
            self._commit(undo)


def _from_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A registry file written before resources existed: each service's inline settings
    become its Service resource (VIP kept), its endpoints move beside it."""
    resources, endpoints = [], {}
    for i, d in enumerate(data.get("services", []), start=1):
        spec: dict[str, Any] = {"failMode": "closed" if d.get("fail_closed") else "open"}
        if d.get("port") is not None:
            spec["port"] = d["port"]
        for old, new in (("lb", "balancer"), ("outlier", "outlier"), ("health", "health")):
            if d.get(old):
                spec[new] = {_camel(k): v for k, v in d[old].items()}
        resources.append({"doc": {"kind": "Service", "name": d["name"], "spec": spec},
                          "version": i, "status": {"vip": d["vip"]}})
        endpoints[d["name"]] = d.get("endpoints", [])
    return {"format": FORMAT, "revision": len(resources), "resources": resources,
            "endpoints": endpoints}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)
