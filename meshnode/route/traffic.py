"""The routing decision of one HTTP request (and the weighted pick of one TCP connection)
under the Route resources: which rule takes it, which backend it goes to, and what is done
on the way (fault, mirror, rate limit). The worker runs `CompiledRoute.decide` per request;
`meshnode explain` runs the same code with `dry=True` (no split turn taken, no token
spent), so the rules exist once.

Splits are smooth weighted round robin (nginx's): per worker and rule, a 90/10 split is
exactly 9 of every 10 requests, and every host runs the same weights, so the mesh-wide split
is the configured one without any coordination. Rate limits are token buckets per worker,
each refilled at its share of the host's rate (`workers`).

Pure and shared (worker and agent): imports only meshnode.policy; never uvloop, bcc,
pyroute2 or a process package.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from meshnode.policy.resources import HttpTimeouts, RetryPolicy, normalize_path
from meshnode.policy.traffic import (
    Backend,
    CookieMatch,
    Fault,
    HeaderMatch,
    QueryMatch,
    RateLimit,
    RouteMatch,
    RouteRule,
    RouteSpec,
    Subset,
    compile_regex,
    subset_key,
)

__all__ = ["CompiledRoute", "Decision", "Pick", "RequestView", "Steering", "TokenBucket",
           "TrafficTable", "steer"]

MAX_SOURCES = 4096  # per-source buckets kept per rule (the oldest go first)


@dataclass(frozen=True, slots=True)
class Pick:
    """A chosen backend: `service`, its endpoints carrying `subset`, on `port` (None: the
    port dialled, or the service's `port`)."""

    service: str
    subset: Subset = ()
    port: int | None = None

    def __str__(self) -> str:
        out = self.service
        if self.subset:
            out += "{" + ",".join(f"{k}={v}" for k, v in self.subset) + "}"
        if self.port is not None:
            out += f":{self.port}"
        return out


@dataclass(slots=True)
class RequestView:
    """What the rules may look at. `headers`: lower-case names, repeats joined with ", "
    (the Cookie header's with "; ")."""

    method: str
    path: str
    authority: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    source: str = ""  # the caller's service name ("": not known)
    identity: str = ""  # the caller's SPIFFE ID, when known


@dataclass(slots=True)
class Decision:
    route: str = ""  # the Route's name ("": none applies)
    rule: str = ""  # the rule's name ("": none took the request)
    backend: Pick | None = None  # None: the destination as dialled
    delay: float = 0.0  # fault: hold the request this long first
    abort: tuple[int, int | None] | None = None  # fault: (HTTP status, gRPC status)
    mirror: Pick | None = None
    retry_after: float | None = None  # rate limited: answer 429, retry after this long
    timeouts: HttpTimeouts | None = None
    retry: RetryPolicy | None = None
    split: tuple[tuple[Pick, int], ...] = ()  # the rule's weighted backends (explain)
    why: list[str] = field(default_factory=list)


class TokenBucket:
    """`rate` tokens a second, at most `burst` held; a request takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float | None:
        """None when a token was taken; else the seconds until one will be there."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1:
            self.tokens = tokens - 1
            return None
        self.tokens = tokens
        return (1 - tokens) / self.rate


def _value_test(m: Any) -> Callable[[str | None], bool]:
    if m.present is not None:
        want = m.present
        return lambda v: (v is not None) is want
    if m.exact is not None:
        exact = m.exact
        return lambda v: v == exact
    prefix = getattr(m, "prefix", None)
    if prefix is not None:
        return lambda v: v is not None and v.startswith(prefix)
    rx = compile_regex(m.regex, m.name)
    return lambda v: v is not None and rx.fullmatch(v) is not None


def _header_test(m: HeaderMatch) -> Callable[[RequestView], bool]:
    name, test = m.name.lower(), _value_test(m)
    return lambda view: test(view.headers.get(name))


def _cookie_test(m: CookieMatch) -> Callable[[RequestView], bool]:
    name, test = m.name, _value_test(m)
    return lambda view: test(_cookies(view.headers.get("cookie")).get(name))


def _query_test(m: QueryMatch) -> Callable[[RequestView], bool]:
    name, test = m.name, _value_test(m)
    return lambda view: test(_query(view.path).get(name))


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if header:
        for part in header.replace(", ", "; ").split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k not in out:
                out[k] = v.strip('"')
    return out


def _query(path: str) -> dict[str, str]:
    _, sep, q = path.partition("?")
    out: dict[str, str] = {}
    if sep:
        for k, v in parse_qsl(q.split("#", 1)[0], keep_blank_values=True):
            out.setdefault(k, v)
    return out


def _path_test(spec: tuple[str, str] | None) -> Callable[[str], bool] | None:
    if spec is None:
        return None
    kind, value = spec
    if kind == "exact":
        return lambda p: p == value
    if kind == "prefix":
        base = value.rstrip("/")
        if not base:
            return lambda p: True
        under = base + "/"
        return lambda p: p == base or p.startswith(under)
    rx = compile_regex(value, "path")
    return lambda p: rx.fullmatch(p) is not None


class _Match:
    __slots__ = ("methods", "path", "tests", "text")

    def __init__(self, m: RouteMatch) -> None:
        self.methods = frozenset(m.methods)
        self.path = _path_test(m.path_spec())
        self.tests = ([_header_test(h) for h in m.headers] + [_cookie_test(c) for c in m.cookies]
                      + [_query_test(q) for q in m.query])
        self.text = _describe(m)

    def __call__(self, view: RequestView, path: str) -> bool:
        if self.methods and view.method not in self.methods:
            return False
        if self.path is not None and not self.path(path):
            return False
        return all(t(view) for t in self.tests)


def _describe(m: RouteMatch) -> str:
    parts: list[str] = []
    spec = m.path_spec()
    if spec is not None:
        parts.append(f"path {spec[0]} {spec[1]!r}")
    if m.methods:
        parts.append("method " + "|".join(m.methods))
    for kind, conds in (("header", m.headers), ("cookie", m.cookies), ("query", m.query)):
        for c in conds:
            if c.present is not None:
                parts.append(f"{kind} {c.name} {'present' if c.present else 'absent'}")
            elif c.exact is not None:
                parts.append(f"{kind} {c.name} = {c.exact!r}")
            elif isinstance(c, HeaderMatch) and c.prefix is not None:
                parts.append(f"{kind} {c.name} starts with {c.prefix!r}")
            else:
                parts.append(f"{kind} {c.name} ~ /{c.regex}/")
    return ", ".join(parts) or "any request"


class _Split:
    """Smooth weighted round robin over a rule's backends."""

    __slots__ = ("current", "picks", "total", "weights")

    def __init__(self, backends: tuple[Backend, ...]) -> None:
        self.picks = tuple(Pick(b.service, subset_key(b.subset), b.port) for b in backends)
        self.weights = tuple(b.weight for b in backends)
        self.total = sum(self.weights)
        self.current = [0] * len(self.picks)

    def next(self) -> Pick:
        cur, weights = self.current, self.weights
        best = 0
        for i, w in enumerate(weights):
            cur[i] += w
            if cur[i] > cur[best]:
                best = i
        cur[best] -= self.total
        return self.picks[best]

    @property
    def pairs(self) -> tuple[tuple[Pick, int], ...]:
        return tuple(zip(self.picks, self.weights, strict=True))


class _Limiter:
    __slots__ = ("buckets", "burst", "config", "per_source", "rate")

    def __init__(self, config: RateLimit, workers: int) -> None:
        self.config = config
        self.per_source = config.per_source
        # each worker refills at its share; a burst of at least one token each
        self.rate = config.requests_per_second / workers
        burst = config.burst if config.burst is not None else math.ceil(
            config.requests_per_second)
        self.burst = max(1.0, burst / workers)
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> float | None:
        buckets = self.buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= MAX_SOURCES:
                del buckets[next(iter(buckets))]
            bucket = buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)


class _Rule:
    __slots__ = ("fault", "fault_tests", "limiter", "matches", "rule", "split")

    def __init__(self, rule: RouteRule, workers: int) -> None:
        self.rule = rule
        self.matches = tuple(_Match(m) for m in rule.match)
        self.split = _Split(rule.backends) if rule.backends else None
        self.fault: Fault | None = rule.fault
        self.fault_tests = tuple(_header_test(h) for h in rule.fault.headers) \
            if rule.fault is not None else ()
        self.limiter = _Limiter(rule.rate_limit, workers) if rule.rate_limit else None


class CompiledRoute:
    """One Route, compiled: `decide` per request, `tcp_pick` per TCP connection."""

    __slots__ = ("_clock", "_rng", "_tcp", "name", "reads_headers", "rules", "service")

    def __init__(self, name: str, spec: RouteSpec, workers: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, old: CompiledRoute | None = None) -> None:
        self.name = name
        self.service = spec.service
        self.rules = tuple(_Rule(r, max(1, workers)) for r in spec.rules)
        self._tcp = _Split(spec.tcp.backends) if spec.tcp is not None else None
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # whether any rule reads headers, cookies or the query (else handlers may skip
        # building the header map)
        self.reads_headers = any(
            m.tests for r in self.rules for m in r.matches) or any(
            r.fault_tests for r in self.rules)
        if old is not None:  # a rule whose limit did not change keeps its buckets
            kept = {r.rule.name: r.limiter for r in old.rules if r.limiter is not None}
            for r in self.rules:
                prev = kept.get(r.rule.name)
                if r.limiter is not None and prev is not None and prev.config == r.limiter.config \
                        and prev.rate == r.limiter.rate:
                    r.limiter = prev

    def decide(self, view: RequestView, dry: bool = False) -> Decision:
        """Where the request goes and what is done to it. `dry`: for explain, no split turn
        is taken and no token spent; faults and mirrors are described, not rolled."""
        path = normalize_path(view.path)
        d = Decision(route=self.name)
        for r in self.rules:
            if not r.matches:
                hit = "any request"
            else:
                hit = next((m.text for m in r.matches if m(view, path)), "")
                if not hit:
                    continue
            return self._decide(r, view, d, hit, dry)
        d.why.append(f"Route {self.name}: no rule takes {view.method} {path}")
        return d

    def _decide(self, r: _Rule, view: RequestView, d: Decision, hit: str,
                dry: bool) -> Decision:
        rule = r.rule
        d.rule = rule.name
        d.timeouts, d.retry = rule.timeouts, rule.retry
        d.why.append(f"Route {self.name} rule {rule.name}: {hit}")
        split = r.split
        if split is not None:
            d.split = split.pairs
            if dry:
                d.backend = max(split.pairs, key=lambda p: p[1])[0]
            else:
                d.backend = split.next()
            if len(split.picks) > 1:
                d.why.append("split " + ", ".join(
                    f"{p} {w * 100 / split.total:.4g}%" for p, w in split.pairs))
        limiter = r.limiter
        if limiter is not None:
            key = (view.identity or view.source) if limiter.per_source else ""
            cfg = limiter.config
            d.why.append(f"rate limit {cfg.requests_per_second:g}/s"
                         + (f" per source ({key or 'unknown'})" if cfg.per_source else ""))
            if not dry:
                d.retry_after = limiter.take(key, self._clock())
                if d.retry_after is not None:
                    return d
        fault = r.fault
        if fault is not None and all(t(view) for t in r.fault_tests):
            rnd = self._rng.random
            if fault.abort is not None:
                a = fault.abort
                d.why.append(f"fault: abort {a.status or a.grpc_status} for {a.percent:g}%")
                if not dry and rnd() * 100 < a.percent:
                    d.abort = (a.status or 503, a.grpc_status)
                    return d
            if fault.delay is not None:
                dl = fault.delay
                d.why.append(f"fault: delay {dl.seconds:g}s for {dl.percent:g}%")
                if not dry and rnd() * 100 < dl.percent:
                    d.delay = dl.seconds
        m = rule.mirror
        if m is not None:
            d.why.append(f"mirror {m.percent:g}% to {Pick(m.service, subset_key(m.subset))}")
            if dry or self._rng.random() * 100 < m.percent:
                d.mirror = Pick(m.service, subset_key(m.subset), m.port)
        return d

    def tcp_pick(self) -> Pick | None:
        return self._tcp.next() if self._tcp is not None else None

    @property
    def tcp_split(self) -> tuple[tuple[Pick, int], ...]:
        return self._tcp.pairs if self._tcp is not None else ()


class TrafficTable:
    """Every Route, compiled, by service and by host."""

    __slots__ = ("_by_host", "_by_service", "_wild", "routes")

    def __init__(self, routes: Mapping[str, RouteSpec] | None = None, workers: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, old: TrafficTable | None = None) -> None:
        prev: dict[str, CompiledRoute] = old.routes if old is not None else {}
        self.routes: dict[str, CompiledRoute] = {
            name: CompiledRoute(name, spec, workers, clock, rng, prev.get(name))
            for name, spec in sorted((routes or {}).items())}
        self._by_service: dict[str, CompiledRoute] = {}
        self._by_host: dict[str, CompiledRoute] = {}
        self._wild: list[tuple[str, CompiledRoute]] = []
        for name, spec in sorted((routes or {}).items()):
            compiled = self.routes[name]
            if spec.service is not None:
                self._by_service[spec.service] = compiled
            for h in spec.hosts:
                if h.startswith("*."):
                    self._wild.append((h[1:], compiled))
                else:
                    self._by_host[h] = compiled
        self._wild.sort(key=lambda p: -len(p[0]))  # the longest suffix wins

    def service(self, name: str) -> CompiledRoute | None:
        return self._by_service.get(name)

    def host(self, authority: str) -> CompiledRoute | None:
        """The Route serving a gateway request's host (port and a final dot dropped)."""
        host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
        host = host.rstrip(".").lower()
        found = self._by_host.get(host)
        if found is not None:
            return found
        for suffix, compiled in self._wild:
            if host.endswith(suffix) and len(host) > len(suffix):
                return compiled
        return None

    def tcp(self, service: str) -> Pick | None:
        compiled = self._by_service.get(service)
        return compiled.tcp_pick() if compiled is not None else None

    def __bool__(self) -> bool:
        return bool(self.routes)


@dataclass(slots=True)
class Steering:
    """Where one request goes: `target` (the service: metrics dst, authorization, its HTTP
    settings), `pick` (balance over this backend; None: the destination as dialled),
    `decision` (None: no Route rule took it), or `refusal` (outcome, detail: no Route for a
    gateway's host)."""

    target: str
    route: CompiledRoute | None = None
    decision: Decision | None = None
    pick: Pick | None = None
    refusal: tuple[str, str] | None = None


def steer(traffic: TrafficTable, gateway: str, service: str, view: RequestView,
          dry: bool = False) -> Steering:
    """A request on a connection to `service`, or to a gateway (`gateway` names it: the host
    decides). The worker runs it per request (proxy/http/steer.py), explain with `dry`."""
    route = None
    if gateway:
        route = traffic.host(view.authority)
        if route is None:
            return Steering(service, refusal=(
                "no_route", f"gateway {gateway}: no Route serves host "
                f"{view.authority[:200] or '(none)'}"))
    elif traffic:
        route = traffic.service(service)
    if route is None:
        return Steering(service)
    d = route.decide(view, dry)
    if not d.rule:
        if not gateway:
            return Steering(service, route, d)
        if route.service is None:
            return Steering(service, route, d, refusal=(
                "no_route", f"gateway {gateway}: no rule of Route {route.name} takes "
                f"{view.method} {view.path[:200]}"))
        # what no rule takes goes to the Route's service, as in the mesh
        return Steering(route.service, route, d, Pick(route.service))
    pick = d.backend
    if pick is None and gateway:
        assert route.service is not None  # a Route without a service names backends
        pick = Pick(route.service)
    if pick is not None and not gateway and pick.service == service and not pick.subset \
            and pick.port is None:
        pick = None  # the destination as dialled: its fast path
    return Steering(pick.service if pick is not None else service, route, d, pick)
