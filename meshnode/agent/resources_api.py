"""The control operations on resources: apply, get, delete, history, rollback.

The agent validates every document again (it never trusts its caller), hands the whole change
to the registry as one atomic compare-and-swap apply, then waits until its own workers and
kernel run it, so the caller's next connection already sees the change. Other hosts follow
through the registry's watch. Takes the registry and a settle callback, not the agent.

Apply answers `warnings` too: a Route whose backend or mirror no current endpoint can serve
(a subset no endpoint carries, a service with no endpoints) is accepted, since the endpoints
may enroll later, but the operator is told now rather than by a 503 later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from meshnode.agent.control import Handler
from meshnode.discovery.registry import Registry
from meshnode.errors import NotFoundError, UsageError
from meshnode.policy.document import parse, parse_all
from meshnode.policy.labels import subset_warnings
from meshnode.policy.resources import Resource, kind_info
from meshnode.policy.store import Delete, HistoryEntry


class ResourceApi:
    def __init__(self, registry: Registry, settle: Callable[[], Awaitable[None]]) -> None:
        self.registry = registry
        self.settle = settle

    def handlers(self) -> dict[str, Handler]:
        return {"apply": self.apply, "get": self.get, "delete": self.delete,
                "history": self.history, "rollback": self.rollback}

    async def apply(self, args: dict[str, Any]) -> Any:
        docs = args.get("docs")
        if not isinstance(docs, list) or not docs:
            raise UsageError("apply needs at least one document", "meshnode apply -f FILE")
        sources = args.get("sources") or []
        if not isinstance(sources, list):
            raise UsageError("sources must be a list of document names", "meshnode apply -f FILE")
        where = [str(sources[i]) if i < len(sources) else f"document {i + 1}"
                 for i in range(len(docs))]
        puts = parse_all(zip(where, docs, strict=True))
        outcomes = await self.registry.apply(puts)
        if any(o.action != "unchanged" for o in outcomes):
            await self.settle()
        return {"results": [o.to_json() for o in outcomes],
                "revision": self.registry.revision(), "warnings": self._warnings(puts)}

    def _warnings(self, puts: list[Resource]) -> list[str]:
        routes = [r for r in puts if r.kind == "Route"]
        if not routes:
            return []
        from meshnode.policy.traffic import backend_refs

        services = self.registry.services()
        labels = {name: [e.labels for e in rec.endpoints] for name, rec in services.items()}
        return [w for r in routes
                for w in subset_warnings(f"Route {r.name}", backend_refs(r.spec), labels)]

    def _stored(self, kind: str, name: str) -> Resource:
        kind_info(kind)
        r = self.registry.resources().get((kind, name))
        if r is None:
            raise NotFoundError(f"no {kind} named {name!r}", f"list them: meshnode get {kind}")
        return r

    async def get(self, args: dict[str, Any]) -> Any:
        kind = _kind(args)
        name = args.get("name")
        if name:
            return {"items": [self._stored(kind, str(name)).to_doc()]}
        items = [r.to_doc() for (k, _), r in sorted(self.registry.resources().items())
                 if k == kind]
        return {"items": items, "revision": self.registry.revision()}

    async def delete(self, args: dict[str, Any]) -> Any:
        kind, name = _kind(args), str(args.get("name") or "")
        try:
            version = int(args.get("version") or 0)
        except (TypeError, ValueError):
            raise UsageError(f"invalid version {args.get('version')!r}",
                             "use a version `meshnode get` shows, or none") from None
        outcomes = await self.registry.apply([], [Delete(kind, name, version)])
        await self.settle()
        return {"results": [o.to_json() for o in outcomes]}

    async def history(self, args: dict[str, Any]) -> Any:
        kind, name = _kind(args), str(args.get("name") or "")
        entries = await self.registry.history(kind, name)
        if not entries:
            raise NotFoundError(f"no history for {kind} {name!r}",
                                f"list them: meshnode get {kind}")
        current = self.registry.resources().get((kind, name))
        return {"kind": kind, "name": name,
                "current": current.version if current else None,
                "versions": [e.to_json() for e in entries]}

    async def rollback(self, args: dict[str, Any]) -> Any:
        """Apply an earlier version's spec again (a new version, like `kubectl rollout undo`);
        by default the one before the current."""
        kind, name = _kind(args), str(args.get("name") or "")
        entries = await self.registry.history(kind, name)
        current = self.registry.resources().get((kind, name))
        target = _target(entries, current, args.get("to"), kind, name)
        assert target.spec is not None
        r = parse({"kind": kind, "name": name, "spec": target.spec,
                   "version": current.version if current else 0},
                  f"{kind} {name} version {target.version}")
        outcomes = await self.registry.apply([r])
        await self.settle()
        return {"results": [o.to_json() for o in outcomes], "from": target.version}


def _kind(args: dict[str, Any]) -> str:
    kind = str(args.get("kind") or "")
    kind_info(kind)
    return kind


def _target(entries: list[HistoryEntry], current: Resource | None, to: Any, kind: str,
            name: str) -> HistoryEntry:
    live = [e for e in entries if e.spec is not None]
    if to is not None:
        try:
            version = int(to)
        except (TypeError, ValueError):
            raise UsageError(f"invalid version {to!r}", "use a version `meshnode history` "
                             "lists") from None
        for e in live:
            if e.version == version:
                return e
        raise NotFoundError(f"{kind} {name} has no version {version} in its history",
                            f"see the versions kept: meshnode history {kind} {name}")
    earlier = [e for e in live if current is None or e.version < current.version]
    if not earlier:
        raise NotFoundError(f"{kind} {name} has no earlier version to roll back to",
                            f"see the versions kept: meshnode history {kind} {name}")
    return earlier[-1]
