"""`meshnode explain PID HOST:PORT`: what would happen to a connection from that process to that
address right now, decided by the same code that decides it for real:

  1. capture: only connects from processes below the apps cgroup are looked at; for those,
     `route.classify` (the kernel hooks' decision, tested against the BPF programs) over the
     capture state the agent gives the kernel: redirect to the proxy, refuse, pass, or (port 53
     while the agent's DNS redirect is on) to the agent's DNS server;
  2. routing: `route.ServiceTable.route` (rules a/b/c) on a table filled with what the workers
     were given (the registry's endpoints less those failing health checks), with the workers'
     outlier ejections replayed into it, and on one filled with every registered endpoint, to
     list the candidates the health checks took out;
  3. the balancer (balance/factory.py) that orders the candidates, read off that table;
  4. authorization (explain_authz.py): the caller's identity (spiffe://<trust
     domain>/svc/<its enrolled service>) and what `AuthzTable.decide` (policy/authz.py, the
     function the workers call) says for each endpoint port the connection may land on; on
     an HTTP-family port, how its requests are authorized, and one request's decision when
     asked (`meshnode explain PID DEST --method GET --path /x`);
  5. DEST an http(s) URL (`meshnode explain PID http://reviews.mesh/x -H 'x-canary: 1'`): the
     request as the Routes steer it, explain_http.py, which builds on `connection` here (its
     `RequestStep` takes over once the proxy has the connection).

Reads only an `ExplainInputs` snapshot the agent builds per request, never the agent itself.
Read-only: nothing here changes any state. Runs in the agent: imports the pure route and
balance packages, discovery's values and host/ (cgroups, processes); never the proxy or bcc.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol

import psutil

from meshnode.agent.explain_authz import explain_authz, parse_request
from meshnode.agent.explain_kernel import kernel_step, table_shares
from meshnode.agent.explain_route import is_url
from meshnode.balance.load import tier_of
from meshnode.balance.locality import Locality
from meshnode.discovery.dns_zone import MeshZone
from meshnode.discovery.registry import EndpointRecord, ServiceRecord
from meshnode.errors import CgroupError, NotFoundError, UsageError
from meshnode.host import cgroup, process
from meshnode.model import CaptureState, Endpoint, HostPort
from meshnode.policy import compiler
from meshnode.policy.authz import AuthzTable
from meshnode.policy.datapath import PathChoice
from meshnode.policy.identity import BUNDLE_NAME, service_id
from meshnode.policy.resources import Resource
from meshnode.policy.traffic import RouteSpec
from meshnode.route import (
    KernelAction,
    KernelVerdict,
    NoEndpoint,
    Passthrough,
    Route,
    ServiceTable,
    ToEndpoint,
    ToService,
    classify,
)

__all__ = ["BALANCER_RULES", "DEFAULT_TRUST_DOMAIN", "ExplainInputs", "HealthView", "Proc",
           "RequestStep", "Result", "balancer_info", "candidate", "connection", "ejections",
           "explain", "gateways_of", "inspect_process", "live_table", "mesh_zone",
           "parse_dest", "routing_table", "trust_domain"]

DEFAULT_TRUST_DOMAIN = "local"  # the trust domain identities are named in before a CA exists

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


class HealthView(Protocol):
    """The health checks' verdicts (discovery.health.HealthMonitor)."""

    def healthy(self, service: str, addr: HostPort) -> bool: ...

    def describe(self, service: str, addr: HostPort) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ExplainInputs:
    """What explain reads, taken by the agent when the request comes in."""

    services: Mapping[str, ServiceRecord]  # the registry's snapshot
    pushed: compiler.Snapshot  # what the workers were given: per service, its healthy endpoints
    capture: CaptureState  # what the kernel is given for `services` (compiler.capture_state)
    ready: bool  # the proxy serves every service (capture redirects)
    backend: str  # the capture backend's name: "ebpf" | "iptables"
    capture_reason: str
    outbound_port: int  # the proxy's listener on 127.0.0.1
    dns_port: int | None  # where enrolled processes' DNS queries go; None: redirect off
    dns_suffix: str
    node: str  # this agent's node and zone (locality)
    zone: str
    cgroup_mount: Path
    root_cgroup: Path  # this agent's cgroup subtree: apps/ (enrolled) and proxy/ below it
    enrollments: Sequence[Mapping[str, Any]]  # EnrollmentManager.describe()
    health: HealthView
    # per service, per endpoint: seconds until the workers let it back in (the longest any
    # worker reports; only endpoints ejected now)
    ejected_for: Mapping[str, Mapping[HostPort, float]] = field(default_factory=dict)
    authz: AuthzTable = field(default_factory=AuthzTable)  # policy/authz.compile_authz's
    trust_domain: str = DEFAULT_TRUST_DOMAIN  # `trust_domain(resources)`
    routes: Mapping[str, RouteSpec] = field(default_factory=dict)  # routes_api.route_specs
    gateways: Mapping[str, str] = field(default_factory=dict)  # Gateway name -> its service
    # each service's path on this host and why (meshnode.policy.datapath.Planner.choices)
    datapath: Mapping[str, PathChoice] = field(default_factory=dict)


def gateways_of(resources: Mapping[tuple[str, str], Resource]) -> dict[str, str]:
    """`ExplainInputs.gateways`: every Gateway resource's service, by its name."""
    return {name: str(r.spec.service) for (kind, name), r in sorted(resources.items())
            if kind == "Gateway"}


def trust_domain(resources: Mapping[tuple[str, str], Resource]) -> str:
    """The mesh's trust domain: the TrustBundle's, else DEFAULT_TRUST_DOMAIN."""
    bundle = resources.get(("TrustBundle", BUNDLE_NAME))
    return str(bundle.spec.trust_domain) if bundle is not None else DEFAULT_TRUST_DOMAIN


def ejections(totals: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[HostPort, float]]:
    """`ExplainInputs.ejected_for` from the workers' summed counters (per service, an
    "endpoints" map of address text to its report, with "ejected_for" in seconds)."""
    out: dict[str, dict[HostPort, float]] = {}
    for name, counters in totals.items():
        for addr, report in (counters.get("endpoints") or {}).items():
            secs = float(report.get("ejected_for", 0) or 0)
            if secs > 0:
                out.setdefault(name, {})[HostPort.parse(addr)] = secs
    return out


@dataclass
class Proc:
    pid: int
    comm: str
    cgroup: str | None  # relative to the cgroup2 mount, "/..."; None: no v2 membership
    enrolled: bool
    service: str | None  # the service cgroup below apps it is in
    identity: str | None  # its service's SPIFFE ID (None: not enrolled in a service)
    proxy: bool  # one of this agent's proxy workers
    same_netns: bool
    enrollment: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "cgroup": self.cgroup,
                "enrolled": self.enrolled, "service": self.service, "identity": self.identity,
                "proxy_worker": self.proxy,
                "same_netns": self.same_netns, "enrollment": self.enrollment}


@dataclass
class Result:
    verdict: str = ""
    outcome: str = ""  # proxied | kernel | no-endpoint | passthrough | refused | direct
    captured: bool = False
    rule: str | None = None  # the proxy's routing rule: a, b or c
    candidates: list[dict[str, Any]] = field(default_factory=list)
    balancer: dict[str, Any] | None = None
    steps: list[str] = field(default_factory=list)
    authorization: dict[str, Any] | None = None
    request: dict[str, Any] | None = None  # an http(s) URL's request (explain_http.py)


# explain_http.py's step for a captured connection: True when it explained the rest
RequestStep = Callable[[Result, Proc, ServiceRecord, HostPort], bool]


# -- inputs ----------------------------------------------------------------------------------
def mesh_zone(inp: ExplainInputs) -> MeshZone:
    """The agent DNS server's view of names (same suffix, the same snapshot's VIPs)."""

    def resolve(service: str) -> IPv4Address | None:
        rec = inp.services.get(service)
        return rec.vip if rec is not None else None

    return MeshZone(resolve, inp.dns_suffix)


def parse_dest(dest: str, zone: MeshZone) -> tuple[HostPort, str | None]:
    """DEST as an address, and the mesh name it was given as (None for an IPv4 address)."""
    hint = _DEST_FORMS.format(zone.suffix)
    host, sep, port = dest.strip().rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
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


def inspect_process(inp: ExplainInputs, pid: int) -> Proc:
    if pid <= 0:
        raise UsageError(f"invalid PID {pid}", "give the PID of a running process")
    mount = inp.cgroup_mount
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
    apps, proxy = inp.root_cgroup / "apps", inp.root_cgroup / "proxy"
    enrolled = path is not None and path.is_relative_to(apps)
    service = None
    if path is not None and enrolled and path != apps:
        service = path.relative_to(apps).parts[0]
    return Proc(pid, comm, None if path is None else _rel(path, mount), enrolled, service,
                 None if service is None else service_id(inp.trust_domain, service),
                 path is not None and path.is_relative_to(proxy), same_netns,
                 _enrollment(inp, pid) if enrolled else None)


def _rel(path: Path, mount: Path) -> str:
    """A cgroup as /proc/PID/cgroup names it: relative to the mount, with a leading slash."""
    return "/" if path == mount else "/" + str(path.relative_to(mount))


def _enrollment(inp: ExplainInputs, pid: int) -> dict[str, Any] | None:
    """Its enrollment record, or that of the enrolled ancestor it descends from."""
    records = {e["pid"]: dict(e) for e in inp.enrollments}
    if pid in records:
        return records[pid]
    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process(pid).parents():
            if parent.pid in records:
                return {**records[parent.pid], "via_parent": True}
    return None


def routing_table(inp: ExplainInputs, snap: compiler.Snapshot) -> ServiceTable:
    """A routing table as a worker of this agent builds it from `snap` (Reset per service).
    Its own RNG: the order balancers return is not what explain reports."""
    table = ServiceTable(inp.node, inp.zone, rng=random.Random(0))
    for update in compiler.resets(snap):
        table.apply(update)
    return table


def live_table(inp: ExplainInputs) -> ServiceTable:
    """The workers' table: what they were given, with their ejections replayed."""
    table = routing_table(inp, inp.pushed)
    for name, reported in inp.ejected_for.items():
        table.hold_ejections(name, reported)
    return table


# -- the decision ----------------------------------------------------------------------------
def explain(inp: ExplainInputs, pid: int, dest: str, method: str | None = None,
            path: str | None = None, headers: Sequence[str] = ()) -> dict[str, Any]:
    """`method`/`path`: also explain that request on the connection (explain_authz.py).
    DEST an http(s) URL: that request (`method`, `headers`) as the Routes steer it
    (explain_http.py)."""
    if is_url(dest):
        # imported here: explain_http builds on this module
        from meshnode.agent.explain_http import explain_request

        if path is not None:
            raise UsageError("--path does not go with a URL: the URL has the path",
                             f"e.g. meshnode explain {pid} http://web.{inp.dns_suffix}/api")
        return explain_request(inp, pid, dest, method, headers)
    if headers:
        raise UsageError("-H goes with a URL destination",
                         f"e.g. meshnode explain {pid} http://web.{inp.dns_suffix}/ "
                         "-H 'x-canary: 1'")
    request = parse_request(method, path)
    addr, name = parse_dest(dest, mesh_zone(inp))
    return connection(inp, pid, dest, addr, name, request)


def connection(inp: ExplainInputs, pid: int, dest: str, addr: HostPort, name: str | None,
               request: tuple[str, str] | None,
               on_request: RequestStep | None = None) -> dict[str, Any]:
    """A connection from `pid` to `addr` (`name`: the mesh name it was given as), and
    `request` on it. `on_request`: explain_http.py's step for a captured connection (it
    returns False to leave the rest to the connection's own routing)."""
    proc = inspect_process(inp, pid)
    k = classify(inp.capture, addr, outbound_port=inp.outbound_port, dns_port=inp.dns_port)
    by_id = {rec.id: rec for rec in inp.services.values()}
    rec = by_id.get(k.service_id) if k.service_id is not None else None
    backend = inp.backend
    apps_rel = _rel(inp.root_cgroup / "apps", inp.cgroup_mount)
    r = Result()

    where = f"in cgroup {proc.cgroup}" if proc.cgroup else "with no cgroup v2 membership"
    r.steps.append(f"process: PID {pid}" + (f" ({proc.comm})" if proc.comm else "") + f" {where}")
    if proc.enrolled:
        via = ""
        if proc.enrollment and proc.enrollment.get("via_parent"):
            via = f", as a child of enrolled PID {proc.enrollment['pid']}"
        r.steps.append(f"enrolled: yes, service {proc.service or '?'} (below {apps_rel}){via}")
        if proc.identity:
            source = "" if inp.trust_domain != DEFAULT_TRUST_DOMAIN else \
                f" (no TrustBundle: trust domain {DEFAULT_TRUST_DOMAIN})"
            r.steps.append(f"identity: {proc.identity}{source}")
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
    elif k.match == "vip":
        r.steps.append(f"destination: {addr} is the VIP of service {rec.name} "
                       "(a VIP is captured on every port)")
    else:
        r.steps.append(f"destination: {addr} is an endpoint of service {rec.name}")

    vip_note = " (a VIP: nothing listens there, expect connection refused)" \
        if rec is not None and k.match == "vip" else ""
    choice = inp.datapath.get(rec.name) if rec is not None else None
    if choice is not None:
        r.steps.append(f"datapath: {choice.path} ({choice.reason})")
    if not proc.enrolled:
        r.outcome = "direct"
        r.steps.append(f"kernel ({backend}): only connects from {apps_rel} are looked at "
                       "→ untouched")
        r.verdict = (f"not captured: PID {pid} is not enrolled (cgroup {proc.cgroup or '-'}); "
                     f"the connection goes straight to {addr}{vip_note}")
    else:
        _kernel(inp, r, k, rec, addr, vip_note)
        if k.action is KernelAction.REDIRECT and rec is not None and (
                on_request is None or not on_request(r, proc, rec, addr)):
            _route(inp, r, rec, addr)
            _authorize(inp, r, proc, rec, addr, request)
    if (rec is not None and proc.enrolled and inp.ready  # not ready: said above already
            and k.action is not KernelAction.KERNEL):
        r.steps.append("if the proxy is not ready: " + (
            "balanced in the kernel (fallback)" if choice is not None and choice.fallback
            else "refused (fail-closed)" if rec.fail_closed else
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
        "capture_reason": inp.capture_reason,
        "ready": inp.ready,
        "kernel": {"action": k.action.value, "target": str(k.target), "match": k.match,
                   "endpoints": table_shares(k.table)},
        "datapath": None if choice is None else {
            "path": choice.path, "fallback": choice.fallback, "reason": choice.reason},
        "process": proc.to_json(),
        "destination": {"kind": k.match or "none",
                        "service": rec.name if rec else None,
                        "vip": str(rec.vip) if rec else None,
                        "service_port": rec.port if rec else None},
        "service": None if rec is None else {
            **rec.settings_json(),
            "fail_mode": "fail-closed" if rec.fail_closed else "fail-open"},
        "rule": r.rule,
        "authorization": r.authorization,
        "balancer": r.balancer,
        "candidates": r.candidates,
        "request": r.request,
        "steps": r.steps,
    }


def _kernel(inp: ExplainInputs, r: Result, k: KernelVerdict, rec: ServiceRecord | None,
            addr: HostPort, vip_note: str) -> None:
    """The capture step for an enrolled process, in words: `k` is route.classify's verdict."""
    backend = inp.backend
    if k.action is KernelAction.REDIRECT:
        r.captured = True
        r.steps.append(f"kernel ({backend}): mesh destination, proxy ready → redirected to "
                       f"{k.target}")
    elif k.action is KernelAction.REFUSE:
        assert rec is not None  # only a service's destination is refused
        r.outcome = "refused"
        how = "connect fails with EPERM" if backend == "ebpf" else \
            "TCP reset: connection refused"
        r.steps.append(f"kernel ({backend}): proxy NOT ready and service {rec.name} is "
                       f"fail-closed → refused ({how})")
        r.verdict = (f"refused: the proxy is not ready and service {rec.name} is "
                     f"fail-closed; {backend} refuses the connect ({how})")
    elif k.action is KernelAction.KERNEL:
        assert rec is not None  # only a service's destination is balanced
        step = kernel_step(k, rec, addr, inp.backend, rec.id not in inp.capture.kernel)
        r.outcome, r.verdict, r.candidates = step.outcome, step.verdict, step.candidates
        r.steps.append(step.step)
    elif k.action is KernelAction.DNS:
        r.outcome = "dns"
        why = "not a mesh destination" if rec is None else \
            f"proxy NOT ready, service {rec.name} fails open"
        r.steps.append(f"kernel ({backend}): {why}; port {addr.port} while the agent's DNS "
                       f"redirect is on → sent to the agent's DNS server {k.target}")
        r.verdict = (f"not proxied: a connect to port {addr.port} is a DNS query; it goes to "
                     f"the agent's DNS server {k.target}, answering as {addr}")
    elif rec is None:
        r.outcome = "direct"
        r.steps.append(f"kernel ({backend}): not a mesh destination → untouched")
        r.verdict = f"not captured: {addr} is not a mesh destination; it passes through untouched"
    else:
        r.outcome = "direct"
        r.steps.append(f"kernel ({backend}): proxy NOT ready, service {rec.name} fails open "
                       "→ untouched")
        r.verdict = (f"not captured: the proxy is not ready and service {rec.name} fails "
                     f"open; the connection goes straight to {addr}{vip_note}")


def _route(inp: ExplainInputs, r: Result, rec: ServiceRecord, addr: HostPort) -> None:
    """The proxy's decision for a captured connection: `ServiceTable.route` on what the
    workers have (`live`), and on every registered endpoint (`every`) for the candidates the
    health checks took out."""
    live = live_table(inp).route(addr)
    every = routing_table(inp, compiler.snapshot(inp.services)).route(addr)
    records = {e.addr: e for e in rec.endpoints}
    held = inp.ejected_for.get(rec.name, {})
    known = inp.pushed.get(rec.name, (None, frozenset()))[1]  # the workers' endpoints
    target = f"service {rec.name} (VIP {rec.vip}:{addr.port})"

    if isinstance(every, ToEndpoint):  # the address is an endpoint's own
        ep = records.get(every.attempts[0].addr)
        in_rotation = isinstance(live, ToEndpoint)
        if ep is not None:
            r.candidates = [candidate(inp, rec, ep, held, in_rotation=in_rotation)]
        if in_rotation:
            r.rule, r.outcome = "b", "proxied"
            r.steps.append("proxy rule (b): an endpoint address → that endpoint only, "
                           "never balanced, ejected or not")
            r.verdict = (f"captured by {inp.backend} → service {rec.name}, endpoint {addr} "
                         "only (an endpoint address is not balanced)")
            return
    if isinstance(live, Passthrough):  # rule (c): the workers do not know the address
        r.rule, r.outcome = "c", "passthrough"
        if isinstance(every, Passthrough):  # registered since the workers' last update
            r.steps.append(f"proxy rule (c): the workers do not know {addr} yet → passthrough "
                           "to it")
            r.verdict = (f"captured by {inp.backend}, but the proxy does not know {addr} yet: "
                         "it connects straight to it (passthrough)")
            return
        r.steps.append(f"proxy rule (c): {addr} fails its health checks, so the proxy does "
                       "not know it → passthrough to it")
        r.verdict = (f"captured by {inp.backend}, but endpoint {addr} of service {rec.name} "
                     "is unhealthy: the proxy connects straight to it (passthrough)")
        return

    r.rule = "a"
    cands = sorted(attempts_of(every), key=lambda e: e.addr)
    # In words only: which of rule (a)'s two candidate sets route() took shows in `cands`.
    if rec.port is not None and addr.port == rec.port:
        r.steps.append(f"proxy rule (a): port {addr.port} is the service port → every endpoint "
                       f"is a candidate ({len(cands)})")
        missing = "endpoint"
    else:
        why = "no service port" if rec.port is None else f"service port {rec.port}"
        r.steps.append(f"proxy rule (a): {why} → the endpoints listening on port {addr.port} "
                       f"are candidates ({len(cands)})")
        missing = f"endpoint on port {addr.port}"
    rotation = {e.addr for e in attempts_of(live)}
    live_cands = [e for e in cands if e in known]
    ejected = sorted(e.addr for e in live_cands if held.get(e.addr, 0) > 0)
    r.candidates = [candidate(inp, rec, records[e.addr], held, in_rotation=e.addr in rotation)
                    for e in cands if e.addr in records]
    down = [str(e.addr) for e in cands if e not in known]
    if cands:
        r.steps.append(f"health: {len(live_cands)} of {len(cands)} healthy"
                       + (f" (down: {', '.join(down)})" if down else ""))
    if isinstance(live, NoEndpoint):
        r.outcome = "no-endpoint"
        none = f"no healthy {missing} (of {len(cands)})" if cands else f"no {missing}"
        r.steps.append(f"→ NoEndpoint: {none}; the proxy accepts and resets the connection")
        r.verdict = (f"captured by {inp.backend} → {target}, but it has {none}: the proxy "
                     "refuses the connection (NoEndpoint)")
        return
    assert isinstance(live, ToService)
    left_out = [a for a in ejected if a not in rotation]
    if ejected:
        r.steps.append(f"outlier: {len(ejected)} ejected ("
                       + ", ".join(f"{a} for {held[a]:.0f}s" for a in ejected)
                       + "; per worker, the longest shown)"
                       + ("" if left_out else "; all are, so all are used anyway"))
    else:
        r.steps.append("outlier: none ejected")
    r.outcome = "proxied"
    r.balancer = balancer_info(inp, rec, live)
    r.steps.append(f"balancer: {rec.lb.algorithm}: {r.balancer['rule']}; the others follow "
                   "as failover")
    if r.balancer["locality"]:
        r.steps.append(f"locality: {r.balancer['locality']}")
    extra = f", {len(left_out)} ejected" if left_out else ""
    r.verdict = (f"captured by {inp.backend} → {target}, {rec.lb.algorithm} over "
                 f"{len(rotation)} healthy endpoint{'s' if len(rotation) != 1 else ''}{extra}")


def _authorize(inp: ExplainInputs, r: Result, proc: Proc, rec: ServiceRecord,
               addr: HostPort, request: tuple[str, str] | None) -> None:
    """Step 4, for a captured connection (explain_authz.py): what `AuthzTable.decide` says
    where the destination is, for the caller's identity and each endpoint port the connection
    may land on (rule b: the endpoint's; rule a: those of the candidates in rotation), and
    for its requests."""
    info: dict[str, Any] = {"identity": proc.identity, "trust_domain": inp.trust_domain,
                            "applies": False, "verdict": None, "decisions": []}
    r.authorization = info
    if r.outcome == "passthrough":
        r.steps.append("authorization: none: a passthrough connection has no destination "
                       "service")
        return
    if r.outcome != "proxied":
        return  # no endpoint: the proxy resets it, nothing is authorized
    ports = [addr.port] if r.rule == "b" else sorted(
        {HostPort.parse(c["addr"]).port for c in r.candidates if c["in_rotation"]})
    if not ports:
        return
    a = explain_authz(inp.authz, proc.identity or "", rec.name, addr.port,
                      rec.policy.protocol_for(addr.port), ports, request)
    info.update(a.info)
    r.steps += a.steps
    if a.denied is not None:
        r.outcome = "denied"
        r.verdict = (f"captured by {inp.backend} → service {rec.name}, then {a.denied.reason}: "
                     "the connection is reset")
    else:
        r.verdict += a.note


def attempts_of(route: Route) -> Sequence[Endpoint]:
    return route.attempts if isinstance(route, ToService) else ()


def balancer_info(inp: ExplainInputs, rec: ServiceRecord, route: ToService) -> dict[str, Any]:
    locality = ""
    if isinstance(route.balancer, Locality):  # what balance.factory.for_service built
        order = [f"this node ({inp.node})"] if inp.node else []
        order += [f"zone {inp.zone}"] if inp.zone else []
        locality = ("prefer " + ", then ".join([*order, "the rest"])
                    + "; spill over when the preferred tier is empty or overloaded")
    return {"algorithm": rec.lb.algorithm,
            "rule": BALANCER_RULES.get(rec.lb.algorithm, rec.lb.algorithm),
            "locality": locality}


def candidate(inp: ExplainInputs, rec: ServiceRecord, e: EndpointRecord,
               held: Mapping[HostPort, float], *, in_rotation: bool) -> dict[str, Any]:
    health = inp.health.describe(rec.name, e.addr)
    return {**e.to_json(), "healthy": bool(health.get("healthy", True)), "health": health,
            "ejected_for": held.get(e.addr, 0.0), "in_rotation": in_rotation,
            "tier": _TIERS[tier_of(e.endpoint, inp.node, inp.zone)]}
