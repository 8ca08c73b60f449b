"""What an apply does to the stored resources, decided once for every store.

`plan` turns (stored resources, the resources to put, the ones to delete) into the outcome of
each (created / configured / unchanged / deleted) or raises: a version the caller expects that
is not the stored one is a ConflictError, never a silent overwrite; deleting what does not
exist is a NotFoundError; a dangling reference is a UsageError. The embedded store and etcd
both call it and then write the whole plan in one step (a file rename, one etcd transaction),
so an apply is all or nothing. Also the history record each write keeps.

Pure: imports nothing of meshnode's but the policy resources and errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from meshnode.errors import ConflictError, NotFoundError, RegistryError
from meshnode.policy.document import check_references, check_sets, parse
from meshnode.policy.resources import Resource

HISTORY_DEPTH = 10  # versions of each resource kept for `history` and `rollback`

Key = tuple[str, str]
Action = Literal["created", "configured", "unchanged", "deleted"]


@dataclass(frozen=True, slots=True)
class Delete:
    kind: str
    name: str
    expect: int = 0  # the version the caller saw; 0: whatever is stored

    @property
    def key(self) -> Key:
        return (self.kind, self.name)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    name: str
    action: Action
    version: int  # after the apply (the old one for unchanged and deleted)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "action": self.action,
                "version": self.version}


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored version: its spec (None: the resource was deleted at that version)."""

    version: int
    spec: dict[str, Any] | None
    at: float  # wall-clock time of the write

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "spec": self.spec, "at": self.at,
                "deleted": self.spec is None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HistoryEntry:
        spec = d.get("spec")
        return cls(int(d["version"]), None if spec is None else dict(spec), float(d["at"]))


def _conflict(kind: str, name: str, expect: int, stored: int) -> ConflictError:
    now = f"version {stored}" if stored else "deleted"
    return ConflictError(
        f"{kind} {name} changed since version {expect} (now {now}): not applied",
        f"see what changed: meshnode get {kind} {name}; then apply again without 'version' "
        "to overwrite, or with the new version")


def plan(stored: Mapping[Key, Resource], puts: Sequence[Resource],
         deletes: Sequence[Delete] = ()) -> list[Outcome]:
    """The outcome of each change, in the order given; raises before anything is written.
    Versions of created and configured resources are left 0: the store assigns them."""
    out: list[Outcome] = []
    touched: set[Key] = set()

    def once(kind: str, name: str) -> None:
        if (kind, name) in touched:
            raise ConflictError(f"{kind} {name} is changed twice in one apply",
                                "keep one document per resource")
        touched.add((kind, name))

    for r in puts:
        once(r.kind, r.name)
        old = stored.get(r.key)
        if r.version and (old is None or old.version != r.version):
            raise _conflict(r.kind, r.name, r.version, old.version if old else 0)
        if old is None:
            out.append(Outcome(r.kind, r.name, "created", 0))
        elif old.spec == r.spec:
            out.append(Outcome(r.kind, r.name, "unchanged", old.version))
        else:
            out.append(Outcome(r.kind, r.name, "configured", 0))
    for d in deletes:
        once(d.kind, d.name)
        old = stored.get(d.key)
        if old is None:
            raise NotFoundError(f"no {d.kind} named {d.name!r}",
                                f"list them: meshnode get {d.kind}")
        if d.expect and old.version != d.expect:
            raise _conflict(d.kind, d.name, d.expect, old.version)
        out.append(Outcome(d.kind, d.name, "deleted", old.version))
    check_references(puts, stored, [d.key for d in deletes])
    check_sets(puts, stored, [d.key for d in deletes])
    return out


def encode(r: Resource, extra: Mapping[str, Any] | None = None) -> bytes:
    """A resource as stored: its document without the version (the store's own counter or
    etcd's mod revision is the version), plus store-owned fields (a Service's VIP)."""
    doc = r.to_doc(with_version=False)
    if extra:
        doc["status"] = dict(extra)
    return msgspec.json.encode(doc)


def decode(data: bytes, version: int) -> tuple[Resource, dict[str, Any]]:
    """A stored resource and its status; RegistryError for one that does not parse (written
    by hand, or by a newer meshnode with a field this one does not know)."""
    try:
        doc = msgspec.json.decode(data)
        status = dict(doc.pop("status", None) or {})
        r = parse(doc, "stored resource")
    except Exception as exc:
        raise RegistryError(f"unreadable stored resource: {exc}",
                            "rewrite it with meshnode apply, or delete it") from exc
    return Resource(r.kind, r.name, r.spec, version), status


def trimmed(history: Sequence[HistoryEntry], entry: HistoryEntry) -> list[HistoryEntry]:
    """`history` with `entry` appended, at most HISTORY_DEPTH long (oldest dropped)."""
    return [*history, entry][-HISTORY_DEPTH:]
