"""The control socket's operations (apart from the resource ones, resources_api.py): argument
checks, then calls into the collaborators the agent hands over once it runs.

Takes `Parts` (parts.py), the running agent's collaborators, never the HostAgent itself: what
an operation can reach is written down there. Status assembly is status.py's.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from meshnode import __version__
from meshnode.agent import cluster, status
from meshnode.agent.ca_api import CaApi
from meshnode.agent.control import Handler
from meshnode.agent.parts import Parts
from meshnode.agent.resources_api import ResourceApi
from meshnode.agent.routes_api import RoutesApi, route_specs
from meshnode.discovery.registry import EndpointRecord, patch_service
from meshnode.errors import UsageError
from meshnode.model import HostPort, Labels
from meshnode.policy import compiler
from meshnode.policy.labels import labels_from, labels_json
from meshnode.policy.store import Delete


class ControlApi:
    def __init__(self, parts: Parts) -> None:
        self.p = parts

    def handlers(self) -> dict[str, Handler]:
        return {
            "ping": self.ping,
            "status": self.status,
            "enroll": self.enroll,
            "unenroll": self.unenroll,
            "service.add": self.service_add,
            "service.remove": self.service_remove,
            "explain": self.explain,
            "authz.suggest": self.authz_suggest,
            "stat": self.stat,
            "top": self.top,
            "tap": self.tap,
            "hosts": self.hosts,
            "uninstall": self.uninstall,
            **ResourceApi(self.p.registry, self.p.settle).handlers(),
            **RoutesApi(self.p).handlers(),
            **CaApi(self.p.registry, self.p.cfg.state_path / "ca", self.p.node, self.p.ca,
                    self.p.ca_started).handlers(),
        }

    def hosts_view(self) -> dict[str, Any]:
        """Every agent's last report (etcd: the live ones), this one's fresh, each marked
        current or not (agent/cluster.py); the admin port serves it as /api/hosts."""
        return cluster.hosts_view(self.p.registry, self.p.report.current())

    async def hosts(self, _: dict[str, Any]) -> Any:
        return self.hosts_view()

    async def uninstall(self, _: dict[str, Any]) -> Any:
        """`meshnode uninstall`: the agent answers, then fails open, drains its workers,
        removes every kernel object it made and exits."""
        asyncio.get_running_loop().call_soon(self.p.uninstall)
        return {"pid": os.getpid(), "removing": True}

    async def ping(self, _: dict[str, Any]) -> Any:
        return {"version": __version__, "pid": os.getpid(), "ready": self.p.ready()}

    async def enroll(self, args: dict[str, Any]) -> Any:
        e = await self.p.enrollments.enroll(_int(args, "pid"), str(args.get("service", "")),
                                            _labels(args))
        await self.p.settle()
        return {"pid": e.pid, "service": e.service,
                "cgroup": str(self.p.enrollments.service_cgroup(e.service)),
                "endpoints": sorted(str(p) for p in e.ports), "labels": labels_json(e.labels)}

    async def unenroll(self, args: dict[str, Any]) -> Any:
        e = await self.p.enrollments.unenroll(_int(args, "pid"))
        await self.p.settle()
        return {"pid": e.pid, "service": e.service}

    async def service_add(self, args: dict[str, Any]) -> Any:
        """`service add`: the flags are a partial Service spec, merged in the registry over
        the stored version (compare-and-swap), then the static endpoints."""
        reg = self.p.registry
        name = str(args.get("name", ""))
        eps = [HostPort.parse(e) for e in _strings(args, "endpoints")]
        labels = _labels(args)
        if labels and not eps:
            raise UsageError("--label labels the endpoints added", "give --endpoint HOST:PORT")
        patch = args.get("patch") or {}
        if not isinstance(patch, dict):
            raise UsageError("service.add: patch must be an object", "upgrade the CLI")
        rec = await patch_service(reg, name, patch)
        if eps:
            weight = _int(args, "weight") if args.get("weight") is not None else 1
            await reg.add_endpoints(
                name, [EndpointRecord(a, "static", None, self.p.node, self.p.cfg.zone, weight,
                                      labels=labels)
                       for a in eps])
        await self.p.settle()
        return status.describe_service(reg.services()[rec.name], {}, self.p.health)

    async def service_remove(self, args: dict[str, Any]) -> Any:
        reg = self.p.registry
        name = str(args.get("name", ""))
        eps = [HostPort.parse(e) for e in _strings(args, "endpoints")]
        if eps:
            rec = reg.services().get(name)
            known = {e.addr for e in rec.endpoints} if rec else set()
            if missing := [str(a) for a in eps if a not in known]:
                raise UsageError(f"service {name!r} has no endpoint {', '.join(missing)}",
                                 "see its endpoints: meshnode status")
            await reg.remove_endpoints(name, eps)
        else:
            await reg.apply([], [Delete("Service", name)])
        await self.p.settle()
        return {"removed": name, "endpoints": [str(a) for a in eps]}

    async def stat(self, args: dict[str, Any]) -> Any:
        service = args.get("service")
        return await self.p.telemetry.stat(_window(args),
                                           None if service is None else str(service))

    async def top(self, args: dict[str, Any]) -> Any:
        return await self.p.telemetry.top(_window(args), _int(args, "limit"))

    async def tap(self, args: dict[str, Any]) -> Any:
        def opt(key: str) -> str | None:
            v = args.get(key)
            return None if v is None else str(v)

        return self.p.telemetry.open_tap(str(args.get("service") or "*"), opt("src"),
                                         opt("dst"), bool(args.get("failed_only")))

    async def explain(self, args: dict[str, Any]) -> Any:
        from meshnode.agent.explain import (
            ExplainInputs,
            ejections,
            explain,
            gateways_of,
            trust_domain,
        )
        from meshnode.policy.authz import compile_authz

        p = self.p
        services = p.registry.services()
        resources = p.registry.resources()
        ready = p.ready()
        dns = p.names.server.port if p.names.redirecting else None
        # ejections: from the same monotonic sums as status, stat and /metrics
        totals = (await p.telemetry.sample()).by_service() if ready else {}
        inputs = ExplainInputs(
            services=services, pushed=p.compiler.pushed, ready=ready,
            # what the kernel holds (kernel path and fallback included), else what it will
            capture=p.synced() or compiler.capture_state(services, ready),
            backend=p.capture.name,
            datapath=dict(p.planner.choices) if p.planner is not None else {},
            capture_reason=p.capture_reason, outbound_port=p.cfg.outbound_port,
            dns_port=dns, dns_suffix=p.cfg.dns_suffix, node=p.node,
            zone=p.cfg.zone, cgroup_mount=p.mount, root_cgroup=p.root_cgroup,
            enrollments=p.enrollments.describe(), health=p.health,
            ejected_for=ejections(totals), authz=compile_authz(resources),
            trust_domain=trust_domain(resources), routes=route_specs(resources),
            gateways=gateways_of(resources))
        return explain(inputs, _int(args, "pid"), str(args.get("dest", "")),
                       args.get("method"), args.get("path"), _strings(args, "headers"))

    async def authz_suggest(self, args: dict[str, Any]) -> Any:
        """`meshnode authz suggest`: ALLOW policies listing the callers this host's proxy saw
        over the window (policy/suggest.py)."""
        from meshnode.policy.suggest import Edge, suggest

        window = _window(args)
        service = args.get("service")
        stored = self.p.registry.resources()
        services = {name for kind, name in stored if kind == "Service"}
        if service is not None and str(service) not in services:
            raise UsageError(f"no service named {service!r}", "see them: meshnode get Service")
        span, pairs = await self.p.telemetry.edges(window)
        edges = [Edge(src, dst, f.connections or f.active) for src, dst, f in pairs]
        s = suggest(edges, services, only=None if service is None else str(service),
                    dry_run=bool(args.get("dry_run")), stored=stored)
        return {"node": self.p.node, "window": window, "span": span,
                "edges": [{"src": e.src, "dst": e.dst, "connections": e.connections,
                           "port": e.port} for e in edges
                          if service is None or e.dst == service],
                "policies": s.docs(), "notes": s.notes}

    async def status(self, _: dict[str, Any]) -> Any:
        return await status.status(self.p)


def _int(args: dict[str, Any], key: str) -> int:
    try:
        return int(args[key])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{key} must be a number", f"pass a valid {key}") from None


def _strings(args: dict[str, Any], key: str) -> list[str]:
    value = args.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{key} must be a list of strings", f"pass {key} as [\"...\", ...]")
    return value


def _labels(args: dict[str, Any]) -> Labels:
    """`labels`: an object of label -> value (the CLI's repeated --label KEY=VALUE)."""
    value = args.get("labels") or {}
    if not isinstance(value, dict):
        raise UsageError("labels must be an object", 'pass labels as {"version": "v2"}')
    return labels_from(value)


def _window(args: dict[str, Any]) -> float:
    try:
        window = float(args.get("window", 60))
    except (TypeError, ValueError):
        window = -1.0
    if not 0 < window <= 600:
        raise UsageError(f"invalid window {args.get('window')!r}",
                         "use --window SECONDS, up to 600 (10 minutes are kept)")
    return window
