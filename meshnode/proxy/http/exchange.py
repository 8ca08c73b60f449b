"""What the HTTP/1.1 and HTTP/2 handlers share per request: the request's record, its route
(timeouts and retries), the retry decision and its budget, circuit breaking per endpoint, and
the one place a finished request is counted, logged, tapped and traced (`Finisher`).

A request's life, in either handler:
  1. `HttpServices.get(service)` → `ServiceHttp` (built once per service policy);
  2. `svc.route(method, path)` → `RoutePlan` (name, timeouts, retry policy);
  3. authorization (`Authorizer`), then per attempt: the table's balancer order
     (`ServiceTable.route`, fresh per request: per-request P2C), `svc.admit(endpoint)` (circuit
     breaking), the upstream exchange, `svc.done(endpoint)`;
  4. on failure `svc.retry(plan, rec, cause)`: retry on another endpoint while the policy, the
     method, the body buffer and the budget allow;
  5. `Finisher.finish(rec)`: counters, histogram, access log line, tap event, span.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from meshnode.model import HostPort
from meshnode.policy.resources import (
    HttpLimits,
    HttpPolicy,
    HttpTimeouts,
    RetryPolicy,
    ServicePolicy,
)
from meshnode.policy.resources import (
    RetryBudget as RetryBudgetConfig,
)
from meshnode.proxy.telemetry import iso_ms, json_str

if TYPE_CHECKING:
    from meshnode.proxy.accesslog import AccessLog
    from meshnode.proxy.stats import WorkerStats

__all__ = ["DEFAULT_ROUTE", "ERROR_STATUS", "GRPC_STATUS", "Finisher", "HttpServices",
           "RequestRecord", "RetryBudget", "RoutePlan", "ServiceHttp", "backoff", "method_label",
           "request_line", "request_record", "status_class"]

DEFAULT_ROUTE = "default"

# gRPC status codes by number (grpc/doc/statuscodes.md): the status_class label of gRPC calls.
GRPC_STATUS = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
               "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
               "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
               "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
# outcome -> the HTTP status the proxy answers with itself (502 for any other failure)
ERROR_STATUS = {"proxy_error": 500, "bad_request": 400, "denied": 403, "header_timeout": 408,
                "body_too_large": 413, "header_too_large": 431, "no_endpoint": 503,
                "circuit_open": 503, "budget": 503, "timeout": 504, "per_try_timeout": 504,
                "no_route": 404, "rate_limited": 429, "fault_abort": 503}
# Label values must stay bounded: a method outside this set is counted as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                      "CONNECT"})


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


@dataclass(slots=True)
class RequestRecord:
    """One proxied request, filled in as it goes; the access log line, the tap event and the
    span are made from it. `outcome`: "ok" when the response reached the client, else why not
    (timeout, reset, no_endpoint, budget, circuit_open, denied, bad_request, upstream_error,
    client_gone); `status` is what the client got (0: nothing, the connection was closed)."""

    t0: float  # monotonic
    wall: float  # time.time() at t0, for logs and spans
    src: str
    dst: str
    protocol: str  # "http/1.1", "h2" or "grpc"
    method: str = ""
    path: str = ""
    authority: str = ""
    route: str = DEFAULT_ROUTE
    status: int = 0
    grpc_status: int | None = None
    endpoint: HostPort | None = None
    attempts: int = 0
    retries: int = 0
    bytes_in: int = 0  # request body bytes from the client
    bytes_out: int = 0  # response body bytes to the client
    outcome: str = "ok"
    t_end: float = 0.0
    src_identity: str = ""
    dst_identity: str = ""
    # W3C trace context: the ids of this proxy's span and of its parent ("": none)
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""
    sampled: bool = False
    tracestate: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return (self.t_end or time.monotonic()) - self.t0


def status_class(rec: RequestRecord) -> str:
    """The status_class label: the gRPC status name for gRPC calls that have one, else
    "2xx".."5xx", or "none" when the client got no response at all."""
    if rec.grpc_status is not None:
        code = rec.grpc_status
        return GRPC_STATUS[code] if 0 <= code < len(GRPC_STATUS) else "UNKNOWN"
    status = rec.status
    if 100 <= status < 600:
        return f"{status // 100}xx"
    return "none"


@dataclass(frozen=True, slots=True)
class RoutePlan:
    name: str
    timeouts: HttpTimeouts
    retry: RetryPolicy


class RetryBudget:
    """At most `ratio` retries per request of the last `window` seconds, plus `min_per_second`
    (Linkerd's and tower's budget): deposits are requests, withdrawals retries, kept in one
    bucket per second. Per worker and service."""

    __slots__ = ("_buckets", "_clock", "_min", "_ratio", "_second", "_slots", "exhausted")

    def __init__(self, config: RetryBudgetConfig, clock: Callable[[], float]) -> None:
        self._ratio = config.ratio
        self._slots = max(1, int(config.window))
        self._min = config.min_per_second * self._slots
        self._clock = clock
        # per second: [requests, retries]
        self._buckets = [[0, 0] for _ in range(self._slots)]
        self._second = int(clock())
        self.exhausted = 0

    def _now(self) -> list[int]:
        second = int(self._clock())
        if second != self._second:
            gap = min(second - self._second, self._slots)
            for i in range(1, gap + 1):
                self._buckets[(self._second + i) % self._slots] = [0, 0]
            self._second = second
        return self._buckets[second % self._slots]

    def deposit(self) -> None:
        """A request (not a retry) started."""
        self._now()[0] += 1

    def withdraw(self) -> bool:
        """Whether one more retry fits; counts it when it does."""
        bucket = self._now()
        requests = sum(b[0] for b in self._buckets)
        retries = sum(b[1] for b in self._buckets)
        if retries + 1 > self._min + self._ratio * requests:
            self.exhausted += 1
            return False
        bucket[1] += 1
        return True


class ServiceHttp:
    """One service's HTTP settings in a worker: routes, retry budget, per-endpoint in-flight
    requests (circuit breaking). Rebuilt when the service's policy changes (the budget and
    the in-flight counts carry over)."""

    __slots__ = ("_routes", "budget", "default", "http", "inflight", "limits", "name",
                 "policy")

    def __init__(self, name: str, policy: ServicePolicy, clock: Callable[[], float],
                 old: ServiceHttp | None = None) -> None:
        self.name = name
        self.policy = policy
        http: HttpPolicy = policy.http
        self.http = http
        self.limits: HttpLimits = http.limits
        self.default = RoutePlan(DEFAULT_ROUTE, http.timeouts, http.retry)
        self._routes = {r.name: RoutePlan(r.name, r.timeouts or http.timeouts,
                                          r.retry or http.retry) for r in http.routes}
        self.budget: RetryBudget = (
            old.budget if old is not None and old.http.retry_budget == http.retry_budget
            else RetryBudget(http.retry_budget, clock))
        self.inflight: dict[HostPort, int] = old.inflight if old is not None else {}

    def route(self, method: str, path: str) -> RoutePlan:
        """The first route whose match takes (method, path); else the default route."""
        if not self._routes:
            return self.default
        r = self.http.route_for(method, path)
        return self.default if r is None else self._routes[r.name]

    def admit(self, ep: HostPort) -> bool:
        """Count a request to `ep` in flight, or refuse it (maxRequests reached)."""
        n = self.inflight.get(ep, 0)
        limit = self.limits.max_requests
        if limit and n >= limit:
            return False
        self.inflight[ep] = n + 1
        return True

    def done(self, ep: HostPort) -> None:
        n = self.inflight.get(ep, 0) - 1
        if n > 0:
            self.inflight[ep] = n
        else:
            self.inflight.pop(ep, None)

    def retry(self, plan: RoutePlan, rec: RequestRecord, cause: str, buffered: bool,
              grpc_status: int | None = None) -> Literal["retry", "no", "budget"]:
        """Whether a failed attempt is tried again: `cause` is one of RetryOn (or "5xx" for
        another 5xx); `buffered`: the proxy still holds the whole request (body included) and
        sent the client nothing yet. "budget": the policy says retry, the budget says no
        (counted in retry_budget_exhausted). Takes from the budget when it says "retry"."""
        policy = plan.retry
        if rec.retries >= policy.attempts or not buffered:
            return "no"
        on = policy.on
        if cause == "gateway-error":
            if "gateway-error" not in on and "5xx" not in on:
                return "no"
        elif cause == "unavailable":
            if "unavailable" not in on or grpc_status not in policy.grpc_codes:
                return "no"
        elif cause not in on:
            return "no"
        # Nothing reached the endpoint (no connection, or a refused HTTP/2 stream): any method.
        # A gRPC status in grpc_codes is gRPC's own retry policy (every gRPC call is a POST).
        if cause not in ("connect-failure", "refused-stream", "unavailable") \
                and rec.method not in policy.methods:
            return "no"
        return "retry" if self.budget.withdraw() else "budget"


_RNG = random.Random()


def backoff(policy: RetryPolicy, retry: int, rng: random.Random = _RNG) -> float:
    """Seconds before retry number `retry` (from 1): exponential, full jitter."""
    if policy.backoff <= 0:
        return 0.0
    return rng.uniform(0, policy.backoff * (2 ** (retry - 1)))


class HttpServices:
    """The worker's ServiceHttp per service, rebuilt when a service's policy object changes."""

    __slots__ = ("_clock", "_services")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._services: dict[str, ServiceHttp] = {}

    def get(self, name: str, policy: ServicePolicy) -> ServiceHttp:
        svc = self._services.get(name)
        if svc is None or svc.policy is not policy:
            svc = self._services[name] = ServiceHttp(name, policy, self._clock, svc)
        return svc


class Finisher:
    """Where every finished request goes, whichever handler carried it: the request counters
    and latency histogram (proxy/stats.py), the access log (a line per request), the tap
    stream and the trace exporter. `tap(rec)` and `span(rec)` are set by the worker."""

    __slots__ = ("access", "span", "stats", "tap", "worker_id")

    def __init__(self, stats: WorkerStats, access: AccessLog | None, worker_id: int) -> None:
        self.stats = stats
        self.access = access
        self.worker_id = worker_id
        self.tap: Callable[[RequestRecord], None] | None = None
        self.span: Callable[[RequestRecord], None] | None = None

    def finish(self, rec: RequestRecord) -> None:
        if not rec.t_end:
            rec.t_end = time.monotonic()
        self.stats.request(rec.src, rec.dst, rec.route, method_label(rec.method),
                           status_class(rec), rec.t_end - rec.t0)
        if rec.retries:
            self.stats.add("request_retries", rec.retries, rec.src, rec.dst, rec.route)
        if rec.outcome != "ok":
            self.stats.count("request_failures", rec.src, rec.dst, rec.route, rec.outcome)
        if rec.sampled and self.span is not None:
            self.span(rec)
        if self.tap is not None:
            self.tap(rec)
        access = self.access
        if access is not None and access.wants():
            access.write(request_line(rec, self.worker_id))


def request_record(rec: RequestRecord, worker: int) -> dict[str, Any]:
    """A request's record: the tap event's (it adds "event": "request"), and the access log
    line's (`request_line` writes the same fields, in this order)."""
    end = rec.wall + rec.duration
    return {
        "kind": "request",
        "start": iso_ms(rec.wall), "end": iso_ms(end),
        "duration_ms": round(rec.duration * 1000, 3),
        "worker": worker, "protocol": rec.protocol,
        "src": rec.src, "dst": rec.dst, "route": rec.route,
        "method": rec.method, "path": rec.path, "authority": rec.authority,
        "status": rec.status, "grpc_status": rec.grpc_status,
        "status_class": status_class(rec),
        "endpoint": str(rec.endpoint) if rec.endpoint is not None else None,
        "attempts": rec.attempts, "retries": rec.retries,
        "bytes_in": rec.bytes_in, "bytes_out": rec.bytes_out,
        "outcome": rec.outcome,
        "src_identity": rec.src_identity or None, "dst_identity": rec.dst_identity or None,
        "trace_id": rec.trace_id or None, "span_id": rec.span_id or None,
    }


@functools.lru_cache(maxsize=4096)
def _endpoint(ep: HostPort) -> str:
    return f'"{ep}"'


def request_line(rec: RequestRecord, worker: int) -> str:
    """The access log line of one request: request_record's fields as JSON, written out
    directly (it runs per request; json.dumps of the dict costs about five times more).
    Client-chosen text (path, authority) goes through json.dumps; the rest are names, fixed
    words, numbers and hex."""
    d = rec.duration
    ep = rec.endpoint
    grpc = rec.grpc_status
    return (f'{{"kind":"request","start":"{iso_ms(rec.wall)}","end":"{iso_ms(rec.wall + d)}",'
            f'"duration_ms":{d * 1000:.3f},"worker":{worker},"protocol":"{rec.protocol}",'
            f'"src":"{rec.src}","dst":"{rec.dst}","route":"{rec.route}",'
            f'"method":{json_str(rec.method)},"path":{json_str(rec.path)},'
            f'"authority":{json_str(rec.authority)},"status":{rec.status},'
            f'"grpc_status":{"null" if grpc is None else grpc},'
            f'"status_class":"{status_class(rec)}",'
            f'"endpoint":{"null" if ep is None else _endpoint(ep)},'
            f'"attempts":{rec.attempts},"retries":{rec.retries},'
            f'"bytes_in":{rec.bytes_in},"bytes_out":{rec.bytes_out},'
            f'"outcome":"{rec.outcome}",'
            f'"src_identity":{_q(rec.src_identity)},"dst_identity":{_q(rec.dst_identity)},'
            f'"trace_id":{_q(rec.trace_id)},"span_id":{_q(rec.span_id)}}}')


def _q(text: str) -> str:
    """A string of a safe alphabet (SPIFFE IDs, hex) as JSON; "" is null."""
    return f'"{text}"' if text else "null"

