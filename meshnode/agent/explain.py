"""`meshnode explain PID HOST:PORT`: what would happen to a connection from that process to that
address right now, decided from the agent's current state the way each layer decides it:

  1. capture (bpf/mn_connect.c, iptables/*.rules): only connects from processes below the apps
     cgroup, only to mesh destinations (an endpoint's exact address first, then any port of a
     VIP). Ready -> redirected to the proxy; fail-closed and not ready -> refused; else untouched.
  2. routing (proxy/routing.py, rules a/b/c) over what the workers were given: the registry's
     endpoints less those failing health checks (updates.snapshot), then less the outlier-ejected
     ones (all of them if none would remain).
  3. the balancer (balance/factory.py) that orders the candidates.

The agent must not import the proxy package (it pulls uvloop), so rules a/b/c are restated here:
keep them in step with `ServiceTable.route`. Read-only: nothing here changes any state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from meshnode.agent.names import registry_resolver
from meshnode.balance.load import tier_of
from meshnode.discovery.dns import MeshZone
from meshnode.discovery.registry import EndpointRecord, ServiceRecord
from meshnode.errors import CgroupError, NotFoundError, UsageError
from meshnode.host import cgroup, process
from meshnode.model import HostPort

if TYPE_CHECKING:
    from meshnode.agent.host_agent import HostAgent

__all__ = ["BALANCER_RULES", "explain"]

# One line per algorithm of model.LB_ALGORITHMS: how it picks (see balance/*.py).
BALANCER_RULES: dict[str, str] = {
    "p2c-ewma": "power of two choices by peak-EWMA latency × in-flight "  # noqa: RUF001
                "(two weighted random candidates, the less loaded wins)",
    "round-robin": "each connection starts at the next candidate in turn (by weight)",
    "random": "a random candidate, in proportion to its weight",
    "ring-hash": "consistent hash of the client IP: the same client keeps the same endpoint",
}
_TIERS = ("this node", "this zone", "elsewhere")  # balance.load.tier_of's 0, 1, 2
_DEST_FORMS = ("write HOST:PORT, HOST an IPv4 address or SERVICE.{0} "
               "(e.g. 127.0.0.1:8080 or web.{0}:80)")


@dataclass
class _Proc:
    pid: int
    comm: str
    cgroup: str | None  # relative to the cgroup2 mount, "/..."; None: no v2 membership
    enrolled: bool
    service: str | None  # the service cgroup below apps it is in
    proxy: bool  # one of this agent's proxy workers
    same_netns: bool
    enrollment: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "cgroup": self.cgroup,
                "enrolled": self.enrolled, "service": self.service, "proxy_worker": self.proxy,
                "same_netns": self.same_netns, "enrollment": self.enrollment}


@dataclass
class _Result:
    verdict: str = ""
    outcome: str = ""  # proxied | no-endpoint | passthrough | refused | direct
    captured: bool = False
    rule: str | None = None  # the proxy's routing rule: a, b or c
    candidates: list[dict[str, Any]] = field(default_factory=list)
    balancer: dict[str, Any] | None = None
    steps: list[str] = field(default_factory=list)


# -- inputs ----------------------------------------------------------------------------------
def _zone(agent: HostAgent) -> MeshZone:
    """The agent DNS server's view of names (same suffix, same registry lookup)."""
    assert agent.registry is not None
    return MeshZone(registry_resolver(agent.registry), agent.cfg.dns_suffix)


def parse_dest(dest: str, zone: MeshZone) -> tuple[HostPort, str | None]:
    """DEST as an address, and the mesh name it was given as (None for an IPv4 address)."""
    hint = _DEST_FORMS.format(zone.suffix)
    host, sep, port = dest.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"invalid destination {dest!r}", hint)
    try:
        return HostPort(IPv4Address(host), int(port)), None
    except ValueError:
        pass
    service = zone.service_of(host)
    if not service:
        raise UsageError(f"invalid destination {dest!r}: {host!r} is neither an IPv4 address "
                         f"nor a name under .{zone.suffix}", hint)
    vip = zone.resolve(service)
    if vip is None:
        raise NotFoundError(f"{host} does not resolve: no service named {service!r} (NXDOMAIN)",
                            "see the services: meshnode status")
    return HostPort(vip, int(port)), host.rstrip(".").lower()


def _inspect(agent: HostAgent, pid: int, mount: Path) -> _Proc:
    if pid <= 0:
        raise UsageError(f"invalid PID {pid}", "give the PID of a running process")
    path: Path | None = None
    try:
        with contextlib.suppress(CgroupError):  # no cgroup v2 membership: enrolled in nothing
            path = cgroup.process_cgroup(pid, mount)
        same_netns = process.same_netns(pid)
    except NotFoundError:
        # bad input for explain (exit 64), unlike enroll's NotFoundError
        raise UsageError(f"no process with PID {pid}",
                         "give the PID of a running process (check it with: ps -p PID)") from None
    comm = ""
    with contextlib.suppress(OSError):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    apps, proxy = agent.root_cgroup / "apps", agent.root_cgroup / "proxy"
    enrolled = path is not None and path.is_relative_to(apps)
    service = None
    if path is not None and enrolled and path != apps:
        service = path.relative_to(apps).parts[0]
    return _Proc(pid, comm, None if path is None else _rel(path, mount), enrolled, service,
                 path is not None and path.is_relative_to(proxy), same_netns,
                 _enrollment(agent, pid) if enrolled else None)


def _rel(path: Path, mount: Path) -> str:
    """A cgroup as /proc/PID/cgroup names it: relative to the mount, with a leading slash."""
    return "/" if path == mount else "/" + str(path.relative_to(mount))


def _enrollment(agent: HostAgent, pid: int) -> dict[str, Any] | None:
    """Its enrollment record, or that of the enrolled ancestor it descends from."""
    assert agent.enrollments is not None
    records = {e["pid"]: e for e in agent.enrollments.describe()}
    if pid in records:
        return records[pid]
    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process(pid).parents():
            if parent.pid in records:
                return {**records[parent.pid], "via_parent": True}
    return None


def _classify(services: dict[str, ServiceRecord], addr: HostPort,
              ) -> tuple[ServiceRecord | None, EndpointRecord | None]:
    """The kernel's lookup: an endpoint's exact address first, then a VIP (any port)."""
    for rec in services.values():
        for e in rec.endpoints:
            if e.addr == addr:
                return rec, e
    for rec in services.values():
        if rec.vip == addr.ip:
            return rec, None
    return None, None


# -- the decision ----------------------------------------------------------------------------
async def explain(agent: HostAgent, pid: int, dest: str) -> dict[str, Any]:
    assert agent.registry is not None and agent.capture is not None
    zone = _zone(agent)
    addr, name = parse_dest(dest, zone)
    mount = cgroup.cgroup2_mount()  # the agent's own mount namespace: the same as the CLI's
    proc = _inspect(agent, pid, mount)
    services = agent.registry.services()
    rec, ep = _classify(services, addr)
    backend = agent.capture.name
    apps_rel = _rel(agent.root_cgroup / "apps", mount)
    r = _Result()

    where = f"in cgroup {proc.cgroup}" if proc.cgroup else "with no cgroup v2 membership"
    r.steps.append(f"process: PID {pid}" + (f" ({proc.comm})" if proc.comm else "") + f" {where}")
    if proc.enrolled:
        via = ""
        if proc.enrollment and proc.enrollment.get("via_parent"):
            via = f", as a child of enrolled PID {proc.enrollment['pid']}"
        r.steps.append(f"enrolled: yes, service {proc.service or '?'} (below {apps_rel}){via}")
    else:
        why = ": it is a meshnode proxy worker" if proc.proxy else ""
        r.steps.append(f"enrolled: no, not below {apps_rel}{why}; capture never applies to it")
    if not proc.same_netns:
        r.steps.append("note: it runs in another network namespace than this agent: its "
                       "addresses are not the agent's")
    if name is not None:
        line = f"name: {name} → {addr.ip} (the agent's DNS, which enrolled processes are sent to)"
        if not proc.enrolled:
            line += "; this process's queries do not reach it, the name may not resolve"
        r.steps.append(line)
    if rec is None:
        r.steps.append(f"destination: {addr} is no VIP or endpoint of any service")
    elif ep is None:
        r.steps.append(f"destination: {addr} is the VIP of service {rec.name} "
                       "(a VIP is captured on every port)")
    else:
        r.steps.append(f"destination: {addr} is an endpoint of service {rec.name}")

    vip_note = " (a VIP: nothing listens there, expect connection refused)" \
        if rec is not None and ep is None else ""
    if not proc.enrolled:
        r.outcome = "direct"
        r.steps.append(f"kernel ({backend}): only connects from {apps_rel} are looked at "
                       "→ untouched")
        r.verdict = (f"not captured: PID {pid} is not enrolled (cgroup {proc.cgroup or '-'}); "
                     f"the connection goes straight to {addr}{vip_note}")
    elif rec is None:
        r.outcome = "direct"
        r.steps.append(f"kernel ({backend}): not a mesh destination → untouched")
        r.verdict = f"not captured: {addr} is not a mesh destination; it passes through untouched"
    elif not agent.ready:
        if rec.fail_closed:
            r.outcome = "refused"
            how = "connect fails with EPERM" if backend == "ebpf" else \
                "TCP reset: connection refused"
            r.steps.append(f"kernel ({backend}): proxy NOT ready and service {rec.name} is "
                           f"fail-closed → refused ({how})")
            r.verdict = (f"refused: the proxy is not ready and service {rec.name} is "
                         f"fail-closed; {backend} refuses the connect ({how})")
        else:
            r.outcome = "direct"
            r.steps.append(f"kernel ({backend}): proxy NOT ready, service {rec.name} fails open "
                           "→ untouched")
            r.verdict = (f"not captured: the proxy is not ready and service {rec.name} fails "
                         f"open; the connection goes straight to {addr}{vip_note}")
    else:
        r.captured = True
        r.steps.append(f"kernel ({backend}): mesh destination, proxy ready → redirected to "
                       f"127.0.0.1:{agent.cfg.outbound_port}")
        totals, _ = await agent._proxy_counters()
        _route(agent, r, rec, ep, addr, totals.get(rec.name, {}).get("endpoints", {}))
    if rec is not None and proc.enrolled and agent.ready:  # not ready: said above already
        r.steps.append("if the proxy is not ready: " + (
            "refused (fail-closed)" if rec.fail_closed else
            f"straight to {addr} (fail-open)"))

    return {
        "pid": pid,
        "dest": dest,
        "address": str(addr),
        "name": name,
        "verdict": r.verdict,
        "outcome": r.outcome,
        "captured": r.captured,
        "backend": backend,
        "capture_reason": agent.capture_reason,
        "ready": agent.ready,
        "process": proc.to_json(),
        "destination": {"kind": "none" if rec is None else "vip" if ep is None else "endpoint",
                        "service": rec.name if rec else None,
                        "vip": str(rec.vip) if rec else None,
                        "service_port": rec.port if rec else None},
        "service": None if rec is None else {
            **rec.settings_json(),
            "fail_mode": "fail-closed" if rec.fail_closed else "fail-open"},
        "rule": r.rule,
        "balancer": r.balancer,
        "candidates": r.candidates,
        "steps": r.steps,
    }


def _route(agent: HostAgent, r: _Result, rec: ServiceRecord, ep: EndpointRecord | None,
           addr: HostPort, proxy_eps: dict[str, dict[str, Any]]) -> None:
    """The proxy's decision for a captured connection (routing.ServiceTable.route)."""
    healthy = [e for e in rec.endpoints if agent.health.healthy(rec.name, e.addr)]
    if ep is not None:
        r.candidates = [_candidate(agent, rec, ep, proxy_eps, in_rotation=ep in healthy)]
        if ep in healthy:  # (b) that endpoint only, ejected or not
            r.rule, r.outcome = "b", "proxied"
            r.steps.append("proxy rule (b): an endpoint address → that endpoint only, "
                           "never balanced, ejected or not")
            r.verdict = (f"captured by {_backend(agent)} → service {rec.name}, endpoint {addr} "
                         "only (an endpoint address is not balanced)")
        else:  # the workers only know healthy endpoints: (c) passthrough to the address itself
            r.rule, r.outcome = "c", "passthrough"
            r.steps.append(f"proxy rule (c): {addr} fails its health checks, so the proxy does "
                           "not know it → passthrough to it")
            r.verdict = (f"captured by {_backend(agent)}, but endpoint {addr} of service "
                         f"{rec.name} is unhealthy: the proxy connects straight to it "
                         "(passthrough)")
        return

    r.rule = "a"
    if rec.port is not None and addr.port == rec.port:
        cands = sorted(rec.endpoints, key=lambda e: e.addr)
        r.steps.append(f"proxy rule (a): port {addr.port} is the service port → every endpoint "
                       f"is a candidate ({len(cands)})")
        missing = "endpoint"
    else:
        cands = sorted((e for e in rec.endpoints if e.addr.port == addr.port),
                       key=lambda e: e.addr)
        why = "no service port" if rec.port is None else f"service port {rec.port}"
        r.steps.append(f"proxy rule (a): {why} → the endpoints listening on port {addr.port} "
                       f"are candidates ({len(cands)})")
        missing = f"endpoint on port {addr.port}"
    live = [e for e in cands if e in healthy]
    ejected = {e.addr for e in live if _ejected_for(proxy_eps, e.addr) > 0}
    rotation = [e for e in live if e.addr not in ejected] or live  # outlier.filter's fallback
    r.candidates = [_candidate(agent, rec, e, proxy_eps, in_rotation=e in rotation)
                    for e in cands]
    target = f"service {rec.name} (VIP {rec.vip}:{addr.port})"
    down = [str(e.addr) for e in cands if e not in healthy]
    if cands:
        r.steps.append(f"health: {len(live)} of {len(cands)} healthy"
                       + (f" (down: {', '.join(down)})" if down else ""))
    if not live:
        r.outcome = "no-endpoint"
        none = f"no healthy {missing} (of {len(cands)})" if cands else f"no {missing}"
        r.steps.append(f"→ NoEndpoint: {none}; the proxy accepts and resets the connection")
        r.verdict = (f"captured by {_backend(agent)} → {target}, but it has {none}: the proxy "
                     "refuses the connection (NoEndpoint)")
        return
    if ejected:
        r.steps.append(f"outlier: {len(ejected)} ejected ("
                       + ", ".join(f"{a} for {_ejected_for(proxy_eps, a):.0f}s"
                                   for a in sorted(ejected)) + "; per worker, the longest shown)"
                       + ("; all are, so all are used anyway" if len(ejected) == len(live)
                          else ""))
    else:
        r.steps.append("outlier: none ejected")
    r.outcome = "proxied"
    r.balancer = _balancer(agent, rec)
    r.steps.append(f"balancer: {rec.lb.algorithm}: {r.balancer['rule']}; the others follow "
                   "as failover")
    if r.balancer["locality"]:
        r.steps.append(f"locality: {r.balancer['locality']}")
    extra = f", {len(ejected)} ejected" if ejected and len(ejected) < len(live) else ""
    r.verdict = (f"captured by {_backend(agent)} → {target}, {rec.lb.algorithm} over "
                 f"{len(rotation)} healthy endpoint{'s' if len(rotation) != 1 else ''}{extra}")


def _backend(agent: HostAgent) -> str:
    return agent.capture.name if agent.capture is not None else "?"


def _ejected_for(proxy_eps: dict[str, dict[str, Any]], addr: HostPort) -> float:
    return float(proxy_eps.get(str(addr), {}).get("ejected_for", 0) or 0)


def _balancer(agent: HostAgent, rec: ServiceRecord) -> dict[str, Any]:
    node, zone = agent.cfg.node_name, agent.cfg.zone
    locality = ""
    if rec.lb.locality and (node or zone):  # as balance.factory.for_service decides
        order = [f"this node ({node})"] if node else []
        order += [f"zone {zone}"] if zone else []
        locality = ("prefer " + ", then ".join([*order, "the rest"])
                    + "; spill over when the preferred tier is empty or overloaded")
    return {"algorithm": rec.lb.algorithm,
            "rule": BALANCER_RULES.get(rec.lb.algorithm, rec.lb.algorithm),
            "locality": locality}


def _candidate(agent: HostAgent, rec: ServiceRecord, e: EndpointRecord,
               proxy_eps: dict[str, dict[str, Any]], *, in_rotation: bool) -> dict[str, Any]:
    health = agent.health.describe(rec.name, e.addr)
    return {**e.to_json(), "healthy": bool(health.get("healthy", True)), "health": health,
            "ejected_for": _ejected_for(proxy_eps, e.addr), "in_rotation": in_rotation,
            "tier": _TIERS[tier_of(e.endpoint, agent.cfg.node_name, agent.cfg.zone)]}
