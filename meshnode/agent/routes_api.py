"""Effective routing per service: `meshnode get routes` (the `routes` control operation) and
the Route marks of the dashboard's services (split, fault, mirror, rate limit).

For each service with a Route: its rules in order, each with what it matches (the words
`meshnode explain` uses: route/traffic.py's compiled matches), its weighted backends and how
many endpoints each backend's subset has now (in the workers' table: healthy; and
registered), and its fault, mirror, rate-limit, timeout and retry marks; its TCP split. A
service without one is "direct". Gateway hosts are listed with the Route serving them.

Read-only. Takes the registry (services, resources) and the workers' pushed snapshot, not the
agent; runs in the agent, imports the pure route and policy packages.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from meshnode.model import Endpoint
from meshnode.policy import compiler
from meshnode.policy.labels import carries, labels_json
from meshnode.policy.records import ServiceRecord
from meshnode.policy.resources import Resource
from meshnode.policy.traffic import Backend, RouteRule, RouteSpec, subset_key
from meshnode.route import ServiceTable
from meshnode.route.traffic import CompiledRoute, Pick, TrafficTable

if TYPE_CHECKING:
    from meshnode.agent.control import Handler
    from meshnode.agent.parts import Parts

__all__ = ["RoutesApi", "effective_routes", "route_specs", "service_marks"]


def route_specs(resources: Mapping[tuple[str, str], Resource]) -> dict[str, RouteSpec]:
    """Every Route resource's spec, by name."""
    return {name: r.spec for (kind, name), r in sorted(resources.items()) if kind == "Route"}


class RoutesApi:
    def __init__(self, parts: Parts) -> None:
        self.p = parts

    def handlers(self) -> dict[str, Handler]:
        return {"routes": self.routes}

    async def routes(self, _: dict[str, Any]) -> Any:
        p = self.p
        services = p.registry.services()
        live = ServiceTable(p.node, p.cfg.zone, rng=random.Random(0))
        for update in compiler.resets(p.compiler.pushed):
            live.apply(update)
        return effective_routes(route_specs(p.registry.resources()), services, live)


def effective_routes(routes: Mapping[str, RouteSpec], services: Mapping[str, ServiceRecord],
                     live: ServiceTable) -> dict[str, Any]:
    """`live`: a table of what the workers were given (their healthy endpoints)."""
    traffic = TrafficTable(routes)
    counts = _Counts(services, live)
    names = set(services) | {s.service for s in routes.values() if s.service is not None}
    rows = []
    for name in sorted(names):
        compiled = traffic.service(name)
        rec = services.get(name)
        row: dict[str, Any] = {"service": name, "known": rec is not None,
                               "route": None, "mode": "direct", "rules": [], "tcp": []}
        if compiled is not None:
            row.update(route=compiled.name, mode="routed",
                       rules=_rules(compiled, routes[compiled.name], counts),
                       tcp=[_backend(p, w, compiled.tcp_split, counts)
                            for p, w in compiled.tcp_split])
        rows.append(row)
    hosts: list[dict[str, Any]] = []
    for route_name, spec in sorted(routes.items()):
        compiled = traffic.routes[route_name]
        for h in spec.hosts:
            hosts.append({"host": h, "route": route_name, "service": spec.service,
                          "rules": _rules(compiled, spec, counts)})
    hosts.sort(key=lambda h: h["host"])
    return {"services": rows, "hosts": hosts}


class _Counts:
    """Endpoints of a backend now: in the workers' table (healthy) and registered."""

    def __init__(self, services: Mapping[str, ServiceRecord], live: ServiceTable) -> None:
        self.services, self.live = services, live

    def of(self, pick: Pick) -> tuple[int, int, str | None]:
        """(healthy, registered, why none or None)."""
        rec = self.services.get(pick.service)
        if rec is None:
            return 0, 0, f"no service named {pick.service}"
        every = _matching((e.endpoint for e in rec.endpoints), pick)
        healthy = _matching(self.live.endpoints(pick.service), pick)
        if healthy:
            return healthy, every, None
        if not rec.endpoints:
            why = f"{pick.service} has no endpoints"
        elif not every:
            on = f" on port {pick.port}" if pick.port is not None else ""
            carrying = f" carries {','.join(f'{k}={v}' for k, v in pick.subset)}" \
                if pick.subset else ""
            why = f"no endpoint of {pick.service}{on}{carrying}"
        else:
            why = f"none of {pick.service}'s {every} endpoint{'s' if every != 1 else ''} " \
                  "in it is healthy"
        return 0, every, why + ": its requests get 503"


def _matching(eps: Iterable[Endpoint], pick: Pick) -> int:
    return sum(1 for e in eps if carries(e.labels, pick.subset)
               and (pick.port is None or e.addr.port == pick.port))


def _rules(compiled: CompiledRoute, spec: RouteSpec, counts: _Counts) -> list[dict[str, Any]]:
    out = []
    for compiled_rule in compiled.rules:
        rule: RouteRule = compiled_rule.rule
        texts = [m.text for m in compiled_rule.matches] or ["any request"]
        backends: tuple[Backend, ...] = rule.backends
        if backends:
            split = tuple((Pick(b.service, subset_key(b.subset), b.port), b.weight)
                          for b in backends)
        else:  # none: the Route's service, as dialled
            assert spec.service is not None  # else validation requires backends
            split = ((Pick(spec.service), 1),)
        out.append({"name": rule.name, "match": texts,
                    "backends": [_backend(p, w, split, counts) for p, w in split],
                    "fault": _fault(rule), "mirror": _mirror(rule),
                    "rate_limit": _rate_limit(rule),
                    "timeouts": rule.timeouts is not None, "retry": rule.retry is not None})
    return out


def _backend(pick: Pick, weight: int, split: tuple[tuple[Pick, int], ...],
             counts: _Counts) -> dict[str, Any]:
    healthy, registered, why = counts.of(pick)
    total = sum(w for _, w in split) or 1
    return {"service": pick.service, "subset": labels_json(pick.subset), "port": pick.port,
            "text": str(pick), "weight": weight, "percent": round(weight * 100 / total, 2),
            "endpoints": healthy, "registered": registered, "problem": why}


def _fault(rule: RouteRule) -> str | None:
    f = rule.fault
    if f is None:
        return None
    parts = []
    if f.abort is not None:
        parts.append(f"abort {f.abort.status or f'grpc {f.abort.grpc_status}'} "
                     f"{f.abort.percent:g}%")
    if f.delay is not None:
        parts.append(f"delay {f.delay.seconds:g}s {f.delay.percent:g}%")
    if f.headers:
        parts.append("if " + ",".join(h.name for h in f.headers))
    return " ".join(parts)


def _mirror(rule: RouteRule) -> str | None:
    m = rule.mirror
    if m is None:
        return None
    return f"{m.percent:g}% to {Pick(m.service, subset_key(m.subset), m.port)}"


def _rate_limit(rule: RouteRule) -> str | None:
    rl = rule.rate_limit
    if rl is None:
        return None
    return f"{rl.requests_per_second:g}/s" + (f" burst {rl.burst}" if rl.burst else "") + \
        (" per source" if rl.per_source else "")


def service_marks(resources: Mapping[tuple[str, str], Resource]) -> dict[str, dict[str, Any]]:
    """Per service with a Route, what the dashboard marks: its splits (each rule's weights
    over two or more backends, and the TCP split), and the rules with a fault, a mirror or
    a rate limit."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in route_specs(resources).items():
        if spec.service is None:
            continue
        splits = [{"rule": r.name, "weights": [b.weight for b in r.backends],
                   "backends": [str(Pick(b.service, subset_key(b.subset), b.port))
                                for b in r.backends]}
                  for r in spec.rules if len(r.backends) > 1]
        if spec.tcp is not None and len(spec.tcp.backends) > 1:
            splits.append({"rule": "tcp", "weights": [b.weight for b in spec.tcp.backends],
                           "backends": [str(Pick(b.service, subset_key(b.subset), b.port))
                                        for b in spec.tcp.backends]})
        out[spec.service] = {
            "route": name, "rules": len(spec.rules), "splits": splits,
            "fault": [r.name for r in spec.rules if r.fault is not None],
            "mirror": [r.name for r in spec.rules if r.mirror is not None],
            "rate_limit": [r.name for r in spec.rules if r.rate_limit is not None],
            "hosts": list(spec.hosts)}
    return out
