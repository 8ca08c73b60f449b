"""Where one HTTP request goes under the Route resources, the same for HTTP/1.1 and HTTP/2:
the traffic decision (meshnode/route/traffic.py) turned into what the exchange runs: the
target service's HTTP settings (`ServiceHttp`), the route plan (the rule's name, timeouts
and retries over the service's), the backend to balance over (service + subset; None: the
destination as dialled), the fault delay, the mirror, or the answer the proxy gives itself
(rate limited, fault abort, no route for a gateway's host).

A captured connection's requests are decided by the Route of the service they were sent to;
a gateway connection's by the Route serving the request's host. With no Route, a request
costs one dict lookup here.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshnode.proxy.http.exchange import RequestRecord, RoutePlan, ServiceHttp
from meshnode.route.traffic import Decision, Pick, RequestView
from meshnode.route.traffic import steer as route_steer

if TYPE_CHECKING:
    from meshnode.proxy.http.front import HttpFront

__all__ = ["Refusal", "Steer", "dialled_port", "header_map", "peer_ip", "steer"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The proxy's own answer: `outcome` (x-meshnode-error), `detail` (the body),
    `status` (None: the outcome's), `grpc_status` (None: the outcome's), extra headers."""

    outcome: str
    detail: str
    status: int | None = None
    grpc_status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Steer:
    svc: ServiceHttp
    plan: RoutePlan
    pick: Pick | None = None  # balance over this backend (None: the destination dialled)
    delay: float = 0.0
    mirror: Pick | None = None
    refusal: Refusal | None = None
    decision: Decision | None = None


def header_map(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Request headers as the rules read them: lower-case names, repeats joined (a
    cookie's with "; "), pseudo-headers left out (their values are the view's own)."""
    out: dict[str, str] = {}
    for name, value in headers:
        n = bytes(name).lower().decode("latin-1")
        if n[:1] == ":":
            continue
        v = bytes(value).decode("latin-1")
        if n in out:
            out[n] += ("; " if n == "cookie" else ", ") + v
        else:
            out[n] = v
    return out


def steer(front: HttpFront, gateway: str, service: str, rec: RequestRecord,
          headers: Callable[[], Mapping[str, str]], client: str = "") -> Steer:
    """The request `rec` (method, path, authority, src filled in) on a connection to
    `service` (a gateway's: `gateway` names it, and the host decides). Sets rec.dst and
    rec.route. `client`: the client's address (a gateway's per-source limits key on it)."""
    traffic = front.traffic
    if not traffic:
        return _default(front, service, rec)
    route = traffic.host(rec.authority) if gateway else traffic.service(service)
    # a per-source rate limit keys on the calling service; at a gateway (callers from outside
    # the mesh, all "from" the gateway's service) on the client's address
    source = f"{rec.src}@{client}" if gateway else rec.src
    view = RequestView(rec.method, rec.path, rec.authority,
                       headers() if route is not None and route.reads_headers else {}, source)
    s = route_steer(traffic, gateway, service, view)
    rec.dst = target = s.target
    if s.refusal is not None:
        return _refused(front, target, rec, Refusal(*s.refusal))
    d = s.decision
    if d is None or not d.rule:  # no rule took it: the target's own routes
        out = _default(front, target, rec)
        out.pick = s.pick
        return out
    svc = front.services.get(target, front.table.policy(target))
    base = svc.route(rec.method, rec.path)
    plan = RoutePlan(d.rule, d.timeouts or base.timeouts, d.retry or base.retry)
    rec.route = d.rule
    out = Steer(svc, plan, s.pick, d.delay, d.mirror, None, d)
    if d.retry_after is not None:
        wait = max(1, math.ceil(d.retry_after))
        out.refusal = Refusal("rate_limited", f"rate limit of route {d.rule} "
                              f"(Route {d.route}) reached: retry after {wait}s",
                              headers=(("retry-after", str(wait)),))
    elif d.abort is not None:
        status, grpc = d.abort
        out.refusal = Refusal("fault_abort", f"fault injected by route {d.rule} "
                              f"(Route {d.route})", status, grpc)
    return out


def dialled_port(down: Any) -> int:
    """The service port a connection dialled, which picks a backend's endpoints; 0 for a
    gateway's (no service port: every endpoint of the backend)."""
    return 0 if down.gateway else int(down.dst.port)


def peer_ip(down: Any) -> str:
    """A gateway connection's client address ("" for a captured one: its caller is a
    service)."""
    if not down.gateway:
        return ""
    peer = down.info.peer
    return str(peer[0]) if peer else ""


def _default(front: HttpFront, service: str, rec: RequestRecord) -> Steer:
    svc = front.services.get(service, front.table.policy(service))
    plan = svc.route(rec.method, rec.path)
    rec.route = plan.name
    return Steer(svc, plan)


def _refused(front: HttpFront, service: str, rec: RequestRecord, refusal: Refusal) -> Steer:
    out = _default(front, service, rec)
    out.refusal = refusal
    return out


def grpc_code(refusal: Refusal, local: Callable[[str], int], of_http: Callable[[int], int]
              ) -> int:
    """The gRPC status a refused call gets: the configured one, else the HTTP status's."""
    if refusal.grpc_status is not None:
        return refusal.grpc_status
    if refusal.status is not None:
        return of_http(refusal.status)
    return local(refusal.outcome)
