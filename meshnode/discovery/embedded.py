"""The embedded registry: one host's resources, VIPs and endpoints on disk, surviving agent
restarts, with writes that cost what they change, not what the mesh holds.

On disk: a snapshot (`registry.json`) and a journal beside it (`registry.journal`), one JSON
line per committed change. A write appends its line and fsyncs it before memory changes, so a
change the caller saw succeed survives a crash, and a write that failed (disk full, read-only
state directory) changed nothing. Loading reads the snapshot and replays the journal (a torn
last line, from a crash mid-append, is dropped: its write never returned). When the journal
outgrows the snapshot, a new snapshot is written atomically and the journal starts over, so
the O(mesh) cost is paid once per many changes.

Every write bumps the store's revision, and the resources it writes take it as their version
(as etcd's mod revision does). An apply is planned by meshnode.policy.store (compare-and-swap,
references) and is one journal line: all or nothing. VIPs come from the loopback range in
constants.VIP_CIDR (`VipRange`, the same ids as etcd), so a connection to a VIP that capture
missed is refused on the host and never leaves it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType
from typing import Any

from meshnode import constants as C
from meshnode.discovery.registry import (
    ChangeFeed,
    EndpointRecord,
    Listener,
    ServiceRecord,
    VipRange,
    service_record,
)
from meshnode.errors import ConflictError, MeshnodeError, NotFoundError, RegistryError
from meshnode.host.statefile import write_atomic
from meshnode.model import HostPort
from meshnode.policy import store
from meshnode.policy.resources import Resource
from meshnode.policy.store import Delete, HistoryEntry, Outcome

log = logging.getLogger(__name__)

FORMAT = 2  # 1: services with their settings inline (read and converted on load)
COMPACT_MIN = 1 << 20  # bytes of journal before it may be folded into the snapshot

Key = tuple[str, str]
Op = dict[str, Any]
# What reading a snapshot or journal written with garbage raises: valid JSON of the wrong shape
# (a list where an object belongs: AttributeError), Infinity where a revision belongs
# (OverflowError), deep nesting (RecursionError), a bad address (UsageError).
_GARBAGE = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError,
            MeshnodeError)


class EmbeddedRegistry:
    def __init__(self, path: Path, vip_cidr: str = C.VIP_CIDR) -> None:
        self.path = path
        self.journal = path.with_suffix(".journal")
        self._vips = VipRange(vip_cidr)
        self._listeners: list[Listener] = []
        self._revision = 0
        self._resources: dict[Key, Resource] = {}
        self._vip: dict[str, IPv4Address] = {}
        self._vip_owner: dict[IPv4Address, str] = {}
        self._history: dict[Key, list[HistoryEntry]] = {}
        self._endpoints: dict[str, frozenset[EndpointRecord]] = {}
        self._owner: dict[HostPort, str] = {}  # which service each endpoint address serves
        self._services: dict[str, ServiceRecord] = {}
        self._view = MappingProxyType(self._services)
        self._resources_view = MappingProxyType(self._resources)
        self.feed = ChangeFeed()
        self._host: dict[str, Any] = {}
        self._journal_bytes = 0
        self._snapshot_bytes = 0
        self._load()

    # -- loading --------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            text = self.path.read_text()
            self._snapshot_bytes = len(text)
            data: dict[str, Any] = json.loads(text)
            if int(data.get("format", 1)) == 1:
                data = _from_format_1(data)
            self._revision = int(data["revision"])
            for item in data["resources"]:
                self._put_resource(item)
            for key, entries in data.get("history", {}).items():
                kind, _, name = key.partition("/")
                self._history[(kind, name)] = [HistoryEntry.from_json(e) for e in entries]
            for name, eps in data.get("endpoints", {}).items():
                self._set_endpoints(name, [EndpointRecord.from_json(e) for e in eps])
        except FileNotFoundError:
            pass
        except (OSError, *_GARBAGE) as exc:
            raise RegistryError(f"registry file {self.path} is unreadable: {exc}",
                                "fix or move the file away; the agent starts empty without it"
                                ) from exc
        self._replay()
        for name in {n for k, n in self._resources if k == "Service"}:
            self._rebuild(name)

    def _replay(self) -> None:
        try:
            with open(self.journal, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RegistryError(f"registry journal {self.journal} is unreadable: {exc}",
                                "fix its permissions, or move it away (losing the changes "
                                "since the last snapshot)") from exc
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                entry = json.loads(line)
                if int(entry["revision"]) <= self._revision:
                    continue  # already in the snapshot (a crash between snapshot and reset)
                self._apply_ops(entry["ops"])
                self._revision = int(entry["revision"])
            except _GARBAGE as exc:
                if i == len(lines) - 1 or all(not rest for rest in lines[i + 1:]):
                    log.warning("dropping a torn last journal line of %s (a crash while "
                                "writing it; that write never returned)", self.journal)
                    self._heal_journal()  # the next line must not be glued onto it
                    break
                raise RegistryError(f"registry journal {self.journal} is corrupt at line "
                                    f"{i + 1}: {exc}",
                                    "move it away (losing the changes since the last "
                                    "snapshot) and restart the agent") from exc
            self._journal_bytes += len(line) + 1

    # -- the one write path ---------------------------------------------------------------
    def _commit(self, ops: list[Op], touched: Iterable[str]) -> int:
        """Make `ops` durable as revision+1, then apply them to memory and tell listeners."""
        rev = self._revision + 1
        line = json.dumps({"revision": rev, "ops": ops}, separators=(",", ":")).encode() + b"\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(28, "short write (no space left on device?)")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._heal_journal()
            raise RegistryError(f"cannot write the registry journal {self.journal}: "
                                f"{exc.strerror or exc}",
                                "free space or fix permissions in the state directory; "
                                "nothing was changed") from exc
        self._journal_bytes += len(line)
        self._apply_ops(ops)
        self._revision = rev
        for name in set(touched):
            self._rebuild(name)
        if self._journal_bytes > max(COMPACT_MIN, self._snapshot_bytes):
            self._compact()
        for listener in list(self._listeners):
            listener()
        return rev

    def _heal_journal(self) -> None:
        """After a failed append: cut what part of the line may have landed, so the next
        line starts clean (best effort: a failing disk may refuse this too)."""
        with contextlib.suppress(OSError):
            os.truncate(self.journal, self._journal_bytes)

    def _compact(self) -> None:
        """Fold the journal into a new snapshot (atomic), then start the journal over. A
        failure keeps the journal as it is: nothing is lost, compaction is tried again."""
        data = {
            "format": FORMAT, "revision": self._revision,
            "resources": [{"doc": r.to_doc(with_version=False), "version": r.version,
                           "status": self._status(k, n)}
                          for (k, n), r in sorted(self._resources.items())],
            "history": {f"{k}/{n}": [e.to_json() for e in h]
                        for (k, n), h in sorted(self._history.items())},
            "endpoints": {name: [e.to_json() for e in sorted(eps, key=lambda e: e.addr)]
                          for name, eps in sorted(self._endpoints.items()) if eps},
        }
        blob = json.dumps(data, separators=(",", ":")).encode()
        try:
            write_atomic(self.path, blob)
            os.truncate(self.journal, 0)
        except (OSError, MeshnodeError) as exc:
            log.warning("registry snapshot not written (%s); the journal keeps growing", exc)
            return
        self._snapshot_bytes, self._journal_bytes = len(blob), 0

    def _status(self, kind: str, name: str) -> dict[str, Any]:
        return {"vip": str(self._vip[name])} if kind == "Service" else {}

    # -- applying ops (from a commit or a replay) -----------------------------------------
    def _apply_ops(self, ops: list[Op]) -> None:
        for op in ops:
            if "put" in op:
                self._put_resource(op["put"])
            elif "delete" in op:
                kind, name = op["delete"]
                self._resources.pop((kind, name), None)
                if kind == "Service":
                    self._set_vip(name, None)
                    self._set_endpoints(name, [])
            elif "history" in op:
                kind, name, entry = op["history"]
                key = (kind, name)
                self._history[key] = store.trimmed(self._history.get(key, []),
                                                   HistoryEntry.from_json(entry))
            elif "endpoints" in op:
                name, eps = op["endpoints"]
                self._set_endpoints(name, [EndpointRecord.from_json(e) for e in eps])
            else:
                raise RegistryError(f"unknown journal operation {sorted(op)}",
                                    "the journal was written by a newer meshnode")

    def _put_resource(self, item: Mapping[str, Any]) -> None:
        r, status = store.decode(json.dumps(item["doc"]).encode(), int(item["version"]))
        status = {**status, **item.get("status", {})}
        self._resources[r.key] = r
        if r.kind == "Service":
            self._set_vip(r.name, IPv4Address(status["vip"]))

    def _set_vip(self, name: str, vip: IPv4Address | None) -> None:
        old = self._vip.pop(name, None)
        if old is not None and old != vip:
            self._vip_owner.pop(old, None)
            self._vips.release(old)
        if vip is not None:
            self._vip[name] = vip
            self._vip_owner[vip] = name

    def _set_endpoints(self, name: str, eps: Iterable[EndpointRecord]) -> None:
        for e in self._endpoints.pop(name, frozenset()):
            if self._owner.get(e.addr) == name:
                del self._owner[e.addr]
        new = frozenset(eps)
        if new:
            self._endpoints[name] = new
            for e in new:
                self._owner[e.addr] = name

    def _rebuild(self, name: str) -> None:
        self.feed.add(name)
        rec = service_record(name, self._resources.get(("Service", name)), self._vip.get(name),
                             self._vips, self._endpoints.get(name, frozenset()))
        if rec is None:
            self._services.pop(name, None)
        else:
            self._services[name] = rec

    # -- queries --------------------------------------------------------------------------
    def services(self) -> Mapping[str, ServiceRecord]:
        return self._view

    def changes(self, cursor: int) -> tuple[int, set[str] | None]:
        return self.feed.seq, self.feed.since(cursor)

    def resources(self) -> Mapping[Key, Resource]:
        return self._resources_view

    def revision(self) -> int:
        return self._revision

    async def history(self, kind: str, name: str) -> list[HistoryEntry]:
        return list(self._history.get((kind, name), []))

    def owner_of(self, addr: HostPort) -> str | None:
        return self._owner.get(addr)

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

    async def detach(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"backend": "embedded", "path": str(self.path), "connected": True,
                "revision": self._revision, "journal_bytes": self._journal_bytes}

    # -- changes --------------------------------------------------------------------------
    async def apply(self, puts: Sequence[Resource], deletes: Sequence[Delete] = ()
                    ) -> list[Outcome]:
        outcomes = store.plan(self._resources, puts, deletes)
        if all(o.action == "unchanged" for o in outcomes):
            return outcomes
        changed = [r for r, o in zip(puts, outcomes, strict=False) if o.action != "unchanged"]
        vips = self._vips.assign(self._vip, self._vip_owner, changed,
                                 [d.name for d in deletes if d.kind == "Service"])
        rev, now = self._revision + 1, time.time()
        ops: list[Op] = []
        for r in changed:
            ops.append({"put": {"doc": r.to_doc(with_version=False), "version": rev,
                                "status": {"vip": str(vips[r.name])}
                                if r.kind == "Service" else {}}})
            ops.append({"history": [r.kind, r.name,
                                    HistoryEntry(rev, r.spec_builtins(), now).to_json()]})
        for d in deletes:
            ops.append({"delete": [d.kind, d.name]})
            ops.append({"history": [d.kind, d.name, HistoryEntry(rev, None, now).to_json()]})
        self._commit(ops, [o.name for o in outcomes if o.kind == "Service"])
        return [o if o.action in ("unchanged", "deleted") else
                Outcome(o.kind, o.name, o.action, rev) for o in outcomes]

    async def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None:
        if name not in self._services:
            raise NotFoundError(f"no service named {name!r}",
                                f"create it: meshnode service add {name}")
        have = self._endpoints.get(name, frozenset())
        # one record per address: a record for an address held replaces it (weight, health)
        new = {e.addr: e for e in endpoints if e not in have}
        for e in new.values():
            owner = self.owner_of(e.addr)
            if owner is not None and owner != name:
                raise ConflictError(f"endpoint {e.addr} already belongs to service {owner!r}",
                                    f"remove it there first: meshnode service remove {owner} "
                                    f"--endpoint {e.addr}")
        if new:
            self._write_endpoints(name, frozenset(
                {e for e in have if e.addr not in new} | set(new.values())))

    async def remove_endpoints(self, name: str, addrs: Iterable[HostPort]) -> None:
        have = self._endpoints.get(name)
        if not have:
            return
        gone = set(addrs)
        kept = frozenset(e for e in have if e.addr not in gone)
        if kept != have:
            self._write_endpoints(name, kept)

    def _write_endpoints(self, name: str, eps: frozenset[EndpointRecord]) -> None:
        self._commit([{"endpoints": [name, [e.to_json() for e in sorted(
            eps, key=lambda e: e.addr)]]}], [name])


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
