"""`meshnode explain PID http://HOST[:PORT]/PATH [-X METHOD] [-H 'NAME: VALUE']...`: what
would happen to that HTTP request, from that process, right now.

HOST a mesh name (`reviews.mesh`) or an IPv4 address: the connection is explained as for
`explain PID HOST:PORT` (agent/explain.py: process, capture, kernel), then, once the proxy has
it, the request: the Route governing the destination service, the rule that takes it and why,
the split, the backend (service and subset) and its endpoints as `ServiceTable.route_backend`
gives them on the workers' table (none: the 503 the proxy answers, with its reason), the rule's
fault, mirror and rate limit, the timeouts and retries in force (explain_route.py), and the
authorization verdict where it lands (explain_authz.py, for the backend service). With no
Route, or a rule that sends it on as dialled, the connection's own routing follows.

HOST a host a Route serves for the ingress gateway (`shop.example.com`): the request comes
from outside the mesh through a Gateway listener, so no process or capture applies (PID is
not read); the same steps follow, with the gateway's service as the caller.

Read-only, as explain.py; runs in the agent, never imports the proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

from meshnode.agent.explain import (
    ExplainInputs,
    Proc,
    Result,
    balancer_info,
    candidate,
    connection,
    live_table,
    mesh_zone,
    parse_dest,
    routing_table,
)
from meshnode.agent.explain_authz import explain_authz
from meshnode.agent.explain_route import HttpAsk, Steered, parse_url, steer
from meshnode.errors import UsageError
from meshnode.model import HostPort
from meshnode.policy import compiler
from meshnode.policy.identity import service_id
from meshnode.policy.records import ServiceRecord
from meshnode.route import NoEndpoint, ServiceTable, ToService
from meshnode.route.traffic import Pick, TrafficTable

__all__ = ["explain_request"]


def explain_request(inp: ExplainInputs, pid: int, url: str, method: str | None,
                    headers: Sequence[str] = ()) -> dict[str, Any]:
    ask = parse_url(url, method, headers)
    zone = mesh_zone(inp)
    traffic = TrafficTable(inp.routes)
    if not _is_ipv4(ask.host) and zone.service_of(ask.host) is None:
        if traffic.host(ask.authority) is None:
            raise UsageError(f"{ask.host} is neither an IPv4 address, a name under "
                             f".{zone.suffix}, nor a host any Route serves (spec.hosts)",
                             f"give a mesh destination (http://web.{zone.suffix}/) or a "
                             "gateway host: meshnode get routes")
        return _gateway(inp, ask, traffic)
    addr, name = parse_dest(f"{ask.host}:{ask.port}", zone)
    step = _Step(inp, ask, traffic)
    out = connection(inp, pid, url, addr, name, (ask.method, ask.path), step)
    if out["request"] is None:  # not captured, or no service: the proxy never sees it
        out["request"] = {"method": ask.method, "url": url, "path": ask.path,
                          "authority": ask.authority, "headers": dict(ask.headers),
                          "route": None, "rule": None, "applies": False}
    return out


def _is_ipv4(host: str) -> bool:
    try:
        IPv4Address(host)
    except ValueError:
        return False
    return True


class _Step:
    """explain.RequestStep: the request's routing once the proxy has the connection."""

    def __init__(self, inp: ExplainInputs, ask: HttpAsk, traffic: TrafficTable) -> None:
        self.inp, self.ask, self.traffic = inp, ask, traffic

    def __call__(self, r: Result, proc: Proc, rec: ServiceRecord, addr: HostPort) -> bool:
        inp, ask = self.inp, self.ask
        protocol = rec.policy.protocol_for(addr.port)
        if protocol == "tcp":
            r.request = {"method": ask.method, "url": ask.url, "path": ask.path,
                         "route": None, "rule": None, "applies": False}
            r.steps.append(f"request: port {addr.port} of {rec.name} is tcp: the proxy relays "
                           "bytes and sees no request; a Route's HTTP rules do not apply")
            compiled = self.traffic.service(rec.name)
            if compiled is not None and compiled.tcp_split:
                r.steps.append(f"tcp split (Route {compiled.name}): " + ", ".join(
                    f"{p} weight {w}" for p, w in compiled.tcp_split)
                    + "; each connection goes to one by weight")
            return False
        if ask.scheme == "https":
            r.steps.append("note: https to a mesh destination is the client's own TLS: the "
                           "proxy sees its requests only if the client speaks plain HTTP to "
                           "it; explained as if it did")
        view = ask.view(proc.service or "")  # the worker knows the caller's service only
        s = steer(self.traffic, inp.routes, ask, rec.name, "", view,
                  {n: x.policy for n, x in inp.services.items()})
        r.request = s.info
        r.steps += s.steps
        if s.pick is None:
            return False  # the destination as dialled: the connection's routing says where
        _backend(inp, r, s, s.pick, addr.port, proc.identity or "", addr.port, protocol,
                 f"captured by {inp.backend} → ")
        return True


def _backend(inp: ExplainInputs, r: Result, s: Steered, pick: Pick, dst_port: int,
             caller: str, port: int, protocol: str, prefix: str) -> None:
    """Where the Route's backend takes the request: `route_backend` on the workers' table
    (`live`) and on every registered endpoint (the candidates the health checks took out),
    then authorization at the backend service."""
    live = live_table(inp)
    every = routing_table(inp, compiler.snapshot(inp.services))
    _split_counts(s, live, dst_port)
    target = inp.services.get(pick.service)
    found = live.route_backend(pick.service, dst_port, pick.subset, pick.port)
    listed = every.route_backend(pick.service, dst_port, pick.subset, pick.port)
    cands = sorted(listed.attempts, key=lambda e: e.addr) if isinstance(listed, ToService) \
        else []
    rotation = {e.addr for e in found.attempts} if isinstance(found, ToService) else set()
    if target is not None:
        records = {e.addr: e for e in target.endpoints}
        held = inp.ejected_for.get(target.name, {})
        r.candidates = [candidate(inp, target, records[e.addr], held,
                                  in_rotation=e.addr in rotation)
                        for e in cands if e.addr in records]
    route_text = f"Route {s.info['route']} rule {s.info['rule']} → {pick}"
    if isinstance(found, NoEndpoint) or target is None or not rotation:
        reason = found.reason if isinstance(found, NoEndpoint) else \
            f"no endpoint of {pick.service} can take the request"
        healthy = f" ({len(cands)} registered, none healthy)" if cands else ""
        r.outcome = "no-endpoint"
        r.steps.append(f"backend {pick}: {reason}{healthy} → the proxy answers 503 "
                       "(x-meshnode-error: no_endpoint)")
        s.info["refusal"] = {"status": 503, "outcome": "no_endpoint", "detail": reason}
        r.verdict = (f"{prefix}{route_text}, which has no endpoint: the proxy "
                     f"answers 503 (x-meshnode-error: no_endpoint: {reason})")
        return
    assert isinstance(found, ToService)
    r.outcome, r.rule = "proxied", "backend"
    n = len(rotation)
    r.steps.append(f"backend {pick}: {n} of {len(cands)} endpoint{'s' if len(cands) != 1 else ''}"
                   " in rotation" + (f" (subset {','.join(f'{k}={v}' for k, v in pick.subset)})"
                                     if pick.subset else ""))
    r.balancer = balancer_info(inp, target, found)
    r.steps.append(f"balancer: {target.lb.algorithm}: {r.balancer['rule']}; the others follow "
                   "as failover")
    r.verdict = (f"{prefix}{route_text}: {target.lb.algorithm} over {n} healthy "
                 f"endpoint{'s' if n != 1 else ''}")
    ports = sorted({e.addr.port for e in found.attempts})
    a = explain_authz(inp.authz, caller, target.name, port, protocol, ports,
                      (s.info["method"], s.info["path"]))
    r.authorization = {"identity": caller or None, "trust_domain": inp.trust_domain,
                       **a.info}
    r.steps += a.steps
    if a.denied is not None:
        r.outcome = "denied"
        r.verdict = f"{prefix}{route_text}, then {a.denied.reason}"
    else:
        r.verdict += a.note


def _split_counts(s: Steered, live: ServiceTable, dst_port: int) -> None:
    """Each split backend's endpoints in rotation now (0: its requests get 503)."""
    for b in s.info["split"]:
        subset = tuple(sorted(b["subset"].items()))
        found = live.route_backend(b["service"], dst_port, subset, b["port"])
        b["endpoints"] = len(found.attempts) if isinstance(found, ToService) else 0
        b["reason"] = found.reason if isinstance(found, NoEndpoint) else None


def _gateway(inp: ExplainInputs, ask: HttpAsk, traffic: TrafficTable) -> dict[str, Any]:
    """A request for a gateway host: no process, no capture; the Route serving the host."""
    compiled = traffic.host(ask.authority)
    assert compiled is not None
    r = Result()
    gateway, gw_service = next(iter(sorted(inp.gateways.items())), ("", ""))
    hosts = ", ".join(inp.routes[compiled.name].hosts)
    r.steps.append(f"host: {ask.authority} is served by Route {compiled.name} (hosts {hosts}): "
                   "a request from outside the mesh through a gateway listener; the PID is "
                   "not used")
    if gateway:
        caller = service_id(inp.trust_domain, gw_service)
        r.steps.append(f"gateway: Gateway {gateway} calls into the mesh as service "
                       f"{gw_service} ({caller})")
    else:
        caller = ""
        r.steps.append("gateway: no Gateway resource: no listener takes this host's requests "
                       "yet (meshnode apply a Gateway)")
    service = compiled.service or gw_service
    view = ask.view(gw_service)
    s = steer(traffic, inp.routes, ask, service, gateway or "gateway", view,
              {n: x.policy for n, x in inp.services.items()})
    r.request = s.info
    r.steps += s.steps
    if s.refusal is not None:
        r.outcome = "refused"
        r.verdict = (f"gateway: the proxy answers {s.refusal['status']} itself "
                     f"(x-meshnode-error: {s.refusal['outcome']}): {s.refusal['detail']}")
    else:
        assert s.pick is not None  # a gateway's request always names its backend
        target = inp.services.get(s.pick.service)
        port = target.port if target is not None and target.port is not None else 0
        protocol = target.policy.protocol_for(port) if target is not None else "http"
        _backend(inp, r, s, s.pick, 0, caller, port, protocol, "gateway → ")
    return {"pid": None, "dest": ask.url, "address": None, "name": ask.host,
            "verdict": r.verdict, "outcome": r.outcome, "captured": False,
            "backend": inp.backend, "capture_reason": inp.capture_reason, "ready": inp.ready,
            "kernel": None, "process": None, "gateway": gateway or None,
            "destination": {"kind": "gateway-host", "service": s.target, "vip": None,
                            "service_port": None},
            "service": None, "rule": r.rule, "authorization": r.authorization,
            "balancer": r.balancer, "candidates": r.candidates, "request": r.request,
            "steps": r.steps}
