"""`meshnode authz suggest`: least-privilege AuthorizationPolicy resources from observed traffic.

The input is the (source, destination service) edges the proxy counted over a window, with
the endpoint port when it is known; the output is one ALLOW policy per destination service
that lists the callers seen (as services when the source is a service or a service identity,
as identities otherwise), with the ports seen when every edge of a caller has one. Sources
the proxy could not name ("unknown") cannot be listed: they are reported, since applying the
policy would deny them.

Pure: imports nothing of meshnode's but the policy documents and resources.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshnode.policy.authz import KIND, service_of
from meshnode.policy.document import parse
from meshnode.policy.resources import NAME_RE, Resource, check_identity_pattern

__all__ = ["Edge", "Suggestion", "policy_name", "suggest"]

UNKNOWN_SOURCE = "unknown"  # proxy/stats.py's name for a caller it cannot tell
_SUFFIX = "-allow"


@dataclass(frozen=True, slots=True)
class Edge:
    src: str  # a source service, a SPIFFE ID, or "unknown"
    dst: str  # the destination service
    connections: int  # opened in the window (or open now)
    port: int | None = None  # the endpoint port; None: not recorded


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
    suggestion would replace a policy)."""
    out = Suggestion()
    # destination -> caller -> the ports seen (None in it: a connection without one)
    seen: dict[str, dict[tuple[str, str], set[int | None]]] = {}
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
    for dst, n in sorted(unnamed.items()):
        out.notes.append(f"{dst}: {n} connections from callers the proxy could not identify "
                         "(source unknown) are not in the policy and would be denied")
    for dst in sorted(seen):
        name = policy_name(dst)
        if stored is not None and (KIND, name) in stored:
            out.notes.append(f"{dst}: AuthorizationPolicy {name} exists; applying replaces it "
                             "(see the change first: meshnode diff -f FILE)")
        out.policies.append(_policy(name, dst, seen[dst], dry_run))
    return out


def _policy(name: str, dst: str, callers: Mapping[tuple[str, str], set[int | None]],
            dry_run: bool) -> Resource:
    # callers with the same ports share a rule; a caller with an unknown port: any port
    rules: dict[tuple[int, ...], dict[str, list[str]]] = {}
    for (field_name, value), ports in sorted(callers.items()):
        key = () if None in ports else tuple(sorted(p for p in ports if p is not None))
        rules.setdefault(key, {}).setdefault(field_name, []).append(value)
    spec: dict[str, Any] = {"target": dst, "action": "ALLOW"}
    if dry_run:
        spec["dryRun"] = True
    spec["rules"] = [{"from": who, **({"to": {"ports": list(ports)}} if ports else {})}
                     for ports, who in sorted(rules.items())]
    return parse({"kind": KIND, "name": name, "spec": spec}, f"suggestion for {dst}")
