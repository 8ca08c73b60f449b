"""`meshnode authz suggest`: least-privilege AuthorizationPolicy resources from observed traffic.

The input is the (source, destination service) edges the proxy counted over a window, with
the endpoint port when it is known and, for HTTP-family ports, the (route, method) pairs of
the requests; the output is one ALLOW policy per destination service that lists the callers
seen (as services when the source is a service or a service identity, as identities
otherwise), with the ports seen when every edge of a caller has one, and, when every edge of
a caller has requests, one rule per route it used: the methods seen on it and the route's
paths (its `match`: pathExact as it is, pathPrefix P as "P/*"; route "default" or a route
without a path: any path). Sources the proxy could not name ("unknown") cannot be listed:
they are reported, since applying the policy would deny them; so are the callers of an HTTP
service whose requests were not recorded (their rule allows every request).

Pure: imports nothing of meshnode's but the policy documents and resources.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshnode.policy.authz import KIND, service_of
from meshnode.policy.document import parse
from meshnode.policy.resources import (
    NAME_RE,
    Resource,
    ServicePolicy,
    check_identity_pattern,
    check_rule_path,
    normalize_path,
)

__all__ = ["Edge", "Suggestion", "policy_name", "suggest"]

UNKNOWN_SOURCE = "unknown"  # proxy/stats.py's name for a caller it cannot tell
OTHER_METHOD = "other"  # the request counters' label of a method outside the common ones
DEFAULT_ROUTE = "default"  # the route of requests no route of the Service takes
_SUFFIX = "-allow"
# a rule's HTTP conditions: (methods, paths), () meaning any
_Http = tuple[tuple[str, ...], tuple[str, ...]]
_ANY_REQUEST: _Http = ((), ())


@dataclass(frozen=True, slots=True)
class Edge:
    src: str  # a source service, a SPIFFE ID, or "unknown"
    dst: str  # the destination service
    connections: int  # opened in the window (or open now)
    port: int | None = None  # the endpoint port; None: not recorded
    # (route, method) of the requests in the window (counters' labels); empty: none recorded
    requests: tuple[tuple[str, str], ...] = ()


@dataclass
class Suggestion:
    policies: list[Resource] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the policies leave out, and why

    def docs(self) -> list[dict[str, Any]]:
        return [r.to_doc(with_version=False) for r in self.policies]


def policy_name(service: str) -> str:
    """`<service>-allow`, shortened to stay a resource name."""
    return service[: 63 - len(_SUFFIX)].rstrip("-") + _SUFFIX


def _caller(src: str) -> tuple[str, str] | None:
    """("services", NAME) or ("identities", SPIFFE ID) for a source; None: not nameable."""
    if src.startswith("spiffe://"):
        svc = service_of(src)
        if svc is not None and NAME_RE.fullmatch(svc):
            return ("services", svc)
        try:
            return ("identities", check_identity_pattern(src))
        except ValueError:
            return None
    if src != UNKNOWN_SOURCE and NAME_RE.fullmatch(src):
        return ("services", src)
    return None


def suggest(edges: Iterable[Edge], services: Collection[str], *, only: str | None = None,
            dry_run: bool = False,
            stored: Mapping[tuple[str, str], Resource] | None = None) -> Suggestion:
    """One ALLOW policy per destination in `services` (the Service resources) that `edges`
    reach; `only`: that destination alone. `stored`: the resources now stored (to say when a
    suggestion would replace a policy, and to read the Services' protocols and routes)."""
    out = Suggestion()
    # destination -> caller -> the ports seen (None in it: a connection without one), and
    # the (route, method) pairs of its requests (None in it: an edge without them)
    seen: dict[str, dict[tuple[str, str], set[int | None]]] = {}
    asked: dict[str, dict[tuple[str, str], set[tuple[str, str] | None]]] = {}
    unnamed: dict[str, int] = {}
    for e in edges:
        if e.connections <= 0 or (only is not None and e.dst != only):
            continue
        if e.dst not in services:
            out.notes.append(f"{e.dst}: not a Service any more, no policy "
                             f"({e.connections} connections from {e.src})")
            continue
        caller = _caller(e.src)
        if caller is None:
            unnamed[e.dst] = unnamed.get(e.dst, 0) + e.connections
            continue
        seen.setdefault(e.dst, {}).setdefault(caller, set()).add(e.port)
        asked.setdefault(e.dst, {}).setdefault(caller, set()).update(e.requests or [None])
    for dst, n in sorted(unnamed.items()):
        out.notes.append(f"{dst}: {n} connections from callers the proxy could not identify "
                         "(source unknown) are not in the policy and would be denied")
    for dst in sorted(seen):
        name = policy_name(dst)
        if stored is not None and (KIND, name) in stored:
            out.notes.append(f"{dst}: AuthorizationPolicy {name} exists; applying replaces it "
                             "(see the change first: meshnode diff -f FILE)")
        svc = stored.get(("Service", dst)) if stored is not None else None
        spec = svc.spec if svc is not None and isinstance(svc.spec, ServicePolicy) else None
        http: dict[tuple[str, str], set[_Http]] = {}
        unrecorded = []
        for caller, pairs in sorted(asked[dst].items()):
            if spec is not None and spec.l7 and None not in pairs:
                http[caller] = _conditions({p for p in pairs if p is not None}, spec)
            else:
                http[caller] = {_ANY_REQUEST}
                unrecorded.append(caller[1])
        if spec is not None and spec.l7 and unrecorded:
            out.notes.append(f"{dst}: an HTTP service, but the requests of {', '.join(unrecorded)}"
                             " were not recorded: their rules allow every method and path "
                             "(narrow them with to.methods and to.paths, checked per request)")
        out.policies.append(_policy(name, dst, seen[dst], http, dry_run))
    return out


def _conditions(pairs: set[tuple[str, str]], spec: ServicePolicy) -> set[_Http]:
    """Per route used, the methods seen on it and the route's paths."""
    methods: dict[tuple[str, ...], set[str]] = {}
    for route, method in pairs:
        methods.setdefault(_route_paths(route, spec), set()).add(method)
    return {((), paths) if OTHER_METHOD in ms else (tuple(sorted(ms)), paths)
            for paths, ms in methods.items()}


def _route_paths(route: str, spec: ServicePolicy) -> tuple[str, ...]:
    """The paths a route takes, as `to.paths`; (): any path (the default route, a route whose
    match names no path, one that no longer exists, or a path no rule can say)."""
    match = next((r.match for r in spec.http.routes if r.name == route), None)
    if route == DEFAULT_ROUTE or match is None:
        return ()
    if match.path_exact is not None:
        path = normalize_path(match.path_exact)
    elif match.path_prefix is not None and (prefix := normalize_path(match.path_prefix)
                                            .rstrip("/")):
        path = prefix + "/*"
    else:
        return ()
    try:
        return (check_rule_path(path),)
    except ValueError:
        return ()


def _policy(name: str, dst: str, callers: Mapping[tuple[str, str], set[int | None]],
            http: Mapping[tuple[str, str], set[_Http]], dry_run: bool) -> Resource:
    # callers with the same ports and HTTP conditions share a rule; a caller with an unknown
    # port: any port
    rules: dict[tuple[tuple[int, ...], _Http], dict[str, list[str]]] = {}
    for caller, ports in sorted(callers.items()):
        field_name, value = caller
        key = () if None in ports else tuple(sorted(p for p in ports if p is not None))
        for conditions in sorted(http[caller]):
            rules.setdefault((key, conditions), {}).setdefault(field_name, []).append(value)
    spec: dict[str, Any] = {"target": dst, "action": "ALLOW"}
    if dry_run:
        spec["dryRun"] = True
    spec["rules"] = [{"from": who, **_to(ports, methods, paths)}
                     for (ports, (methods, paths)), who in sorted(rules.items())]
    return parse({"kind": KIND, "name": name, "spec": spec}, f"suggestion for {dst}")


def _to(ports: tuple[int, ...], methods: tuple[str, ...], paths: tuple[str, ...]
        ) -> dict[str, Any]:
    to = {k: list(v) for k, v in (("ports", ports), ("methods", methods), ("paths", paths))
          if v}
    return {"to": to} if to else {}
