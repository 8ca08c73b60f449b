"""The start of one attempt of a request, the same for HTTP/1.1 and HTTP/2: the endpoint
(the balancer's order, computed once per request; a retry takes the next endpoint not tried
yet, and when all were tried, any but the last that failed), authorization of the request to
it, circuit breaking, the balancer's and the counters' bookkeeping, and the per-try timer.
The handler then only finds a connection for the pool key it gets back.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from meshnode.model import Endpoint
from meshnode.proxy.http.exchange import RequestRecord, RoutePlan, ServiceHttp
from meshnode.proxy.http.steer import Steer, dialled_port
from meshnode.route.table import ToService

if TYPE_CHECKING:
    from meshnode.balance import Balancer, EndpointLoad
    from meshnode.balance.outlier import OutlierDetector

__all__ = ["Attempting", "begin_attempt"]


class Attempting(Protocol):
    """What an exchange (h1_exchange.Exchange, h2_exchange.H2Exchange) has for this."""

    down: Any  # its client connection: .front, .dst, .info, .service
    rec: RequestRecord
    svc: ServiceHttp
    plan: RoutePlan
    steer: Steer
    route: ToService | None
    tried: list[Endpoint]
    ep: Endpoint | None
    token: EndpointLoad | None
    balancer: Balancer | None
    outlier: OutlierDetector | None
    attempt_t0: float
    try_timer: asyncio.TimerHandle | None

    def _fail(self, outcome: str, detail: str) -> None: ...

    def _try_timed_out(self) -> None: ...


def begin_attempt(ex: Attempting) -> tuple[Any, str] | None:
    """Start `ex`'s next attempt: the pool key of its endpoint, or None when the request
    was answered instead (no endpoint, denied, bad path, circuit open)."""
    down, rec = ex.down, ex.rec
    front = down.front
    route = ex.route
    if route is None or all(e in ex.tried for e in route.attempts):
        pick = ex.steer.pick
        if pick is None:
            found = front.table.route(down.dst, down.info.peer)
        else:  # a Route's backend: that service, that subset
            found = front.table.route_backend(pick.service, dialled_port(down),
                                              pick.subset, pick.port, down.info.peer)
        if not isinstance(found, ToService) or not found.attempts:
            reason = getattr(found, "reason", "") or \
                f"no endpoint of {rec.dst} can take the request"
            ex._fail("no_endpoint", reason)
            return None
        route = ex.route = found
    tried = ex.tried
    ep = next((e for e in route.attempts if e not in tried), None) or next(
        (e for e in route.attempts if not tried or e != tried[-1]), route.attempts[0])
    tried.append(ep)
    refusal = front.authorize(rec, ep)
    if isinstance(refusal, str):
        ex._fail("bad_request", refusal)
        return None
    if refusal is not None:
        ex._fail("denied", refusal.reason or "denied by an AuthorizationPolicy")
        return None
    if not ex.svc.admit(ep.addr):
        ex._fail("circuit_open", f"{ep.addr} has {ex.svc.limits.max_requests} requests in "
                 "flight (limits.maxRequests)")
        return None
    ex.ep = ep
    ex.balancer, ex.outlier = route.balancer, route.outlier
    ex.token = route.balancer.on_start(ep)
    front.stats.selected(rec.dst, ep.addr)
    rec.attempts += 1
    rec.endpoint = ep.addr
    ex.attempt_t0 = front.clock()
    per_try = ex.plan.timeouts.per_try
    if per_try:
        ex.try_timer = front.loop.call_later(per_try, ex._try_timed_out)
    key: tuple[Any, str] = front.pool_key(ep, down.info.src)
    return key
