"""`meshnode explain PID http://HOST/PATH -H 'NAME: VALUE'`'s request step (agent/explain.py):
which Route and rule take the request and why, the split, the backend it goes to, the faults,
mirror and rate limit of its rule, and the timeouts and retries in force.

The decision is `route.traffic.steer(..., dry=True)`, the code the workers run per request
(dry takes no split turn and spends no token), and the timeouts and retries are the rule's
over the target service's own route (`HttpPolicy.route_for`, as the worker picks it): this
module only tells them. The backend's endpoints are `ServiceTable.route_backend`'s, in
explain.py.

Pure: reads the tables handed in; imports the route and policy packages only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from meshnode.errors import UsageError
from meshnode.model import ServicePolicy
from meshnode.policy.labels import labels_json
from meshnode.policy.resources import HttpTimeouts, RetryPolicy, check_method
from meshnode.policy.traffic import RouteRule, RouteSpec, subset_key
from meshnode.route.traffic import CompiledRoute, Decision, Pick, RequestView, TrafficTable
from meshnode.route.traffic import steer as route_steer

__all__ = ["HttpAsk", "Steered", "is_url", "parse_url", "pick_json", "steer", "timeouts_text"]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")  # an HTTP field name (RFC 9110)
_HINT = "write e.g. http://reviews.mesh/api or http://127.240.0.5:8080/api -H 'x-canary: 1'"


@dataclass(frozen=True)
class HttpAsk:
    """The request to explain, as the proxy would see it."""

    url: str
    scheme: str  # http | https
    host: str  # lower-case, no port
    port: int
    authority: str  # Host / :authority: the URL's host[:port], or a -H 'Host: ...'
    method: str
    path: str  # path and query, as sent
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, joined repeats

    def view(self, source: str) -> RequestView:
        return RequestView(self.method, self.path, self.authority, self.headers, source)


def is_url(dest: str) -> bool:
    return dest.lower().startswith(("http://", "https://"))


def parse_url(url: str, method: str | None, headers: Sequence[str] = ()) -> HttpAsk:
    """An http(s) URL, a method (default GET) and `-H 'Name: value'` lines, checked."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid URL {url!r}: {exc}", _HINT) from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in ("http", "https") or not host:
        raise UsageError(f"invalid URL {url!r}", _HINT)
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"invalid URL {url!r}: no user:password@ in the URL",
                         "pass credentials as a header: -H 'authorization: ...'")
    port = port or (443 if scheme == "https" else 80)
    authority = parts.netloc.rsplit("@", 1)[-1].lower()
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not path.isprintable() or " " in path:
        raise UsageError(f"URL path {path!r} is not a request path", "percent-encode spaces "
                         "and control characters (%20)")
    method = method or "GET"
    try:
        check_method(method)
    except ValueError as exc:
        raise UsageError(str(exc), "pass e.g. -X GET") from None
    fields: dict[str, str] = {}
    for line in headers:
        name, sep, value = str(line).partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _TOKEN.fullmatch(name):
            raise UsageError(f"invalid header {line!r}", "write -H 'NAME: VALUE', e.g. "
                             "-H 'x-canary: 1'")
        n = name.lower()
        if n == "host":
            authority = value.lower()
            continue
        if n in fields:
            fields[n] += ("; " if n == "cookie" else ", ") + value
        else:
            fields[n] = value
    return HttpAsk(url, scheme, host.lower(), port, authority, method, path, fields)


@dataclass
class Steered:
    """The worker's steer, for explain: where the request goes and what is done to it."""

    route: CompiledRoute | None
    decision: Decision | None
    pick: Pick | None  # balance over this backend (None: the destination as dialled)
    target: str  # the service the request goes to (metrics dst, authorization)
    refusal: dict[str, Any] | None = None  # the proxy's own answer: status, outcome, detail
    steps: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # explain's "request" object


def steer(traffic: TrafficTable, routes: Mapping[str, RouteSpec], ask: HttpAsk, service: str,
          gateway: str, view: RequestView,
          policy_of: Mapping[str, ServicePolicy]) -> Steered:
    """What the worker decides (route.traffic.steer, dry: no split turn, no token), told:
    `service`, the destination dialled (a gateway's own service when `gateway` names the
    Gateway); `policy_of`, every service's policy (a target's timeouts and retries)."""
    s = route_steer(traffic, gateway, service, view, dry=True)
    route, d = s.route, s.decision
    info: dict[str, Any] = {"method": ask.method, "url": ask.url, "path": ask.path,
                            "authority": ask.authority, "headers": dict(ask.headers),
                            "source": view.source or None, "route": None, "rule": None,
                            "matched": None, "why": [], "split": [], "backend": None,
                            "fault": None, "mirror": None, "rate_limit": None,
                            "refusal": None}
    out = Steered(route, d, s.pick, s.target, info=info)
    if d is not None:
        info.update(route=d.route, rule=d.rule or None, why=list(d.why))
    if s.refusal is not None:
        if d is not None and d.why:
            out.steps.append(f"route: {d.why[0]}")
        return _refuse(out, 404, *s.refusal)
    if route is None or d is None:
        out.steps.append(f"route: no Route governs service {service}: the request goes to "
                         f"{service} as dialled")
        return _plan(out, None, ask, policy_of)
    if not d.rule:
        out.steps.append(f"route: {d.why[0] if d.why else 'no rule takes it'}")
        out.steps.append(f"→ no rule of Route {route.name} takes it: it goes to {s.target}"
                         + (" as dialled" if not gateway else "") + ", on its own routes")
        return _plan(out, None, ask, policy_of)
    spec = routes.get(route.name)
    rule = next((r for r in spec.rules if r.name == d.rule), None) if spec else None
    info["matched"] = d.why[0].split(": ", 1)[1] if ": " in d.why[0] else d.why[0]
    out.steps.append(f"route: {d.why[0]}" + (" (no rule before it takes the request)"
                                              if spec and spec.rules[0].name != d.rule
                                              else ""))
    info["split"] = [{**pick_json(p), "weight": w,
                      "percent": round(w * 100 / (sum(x for _, x in d.split) or 1), 2)}
                     for p, w in d.split]
    if len(d.split) > 1:
        out.steps.append("split: " + ", ".join(f"{p} weight {w} ({_pct(w, d.split)})"
                                               for p, w in d.split)
                         + "; each request goes to one by weight (smooth round robin per "
                         f"worker); explained below: the largest share, {d.backend}")
    info["backend"] = pick_json(s.pick if s.pick is not None else Pick(service))
    if rule is not None:
        _extras(out, rule, d)
    return _plan(out, d, ask, policy_of)


def _pct(w: int, split: tuple[tuple[Pick, int], ...]) -> str:
    total = sum(x for _, x in split) or 1
    return f"{w * 100 / total:.4g}%"


def _extras(out: Steered, rule: RouteRule, d: Decision) -> None:
    """The rule's rate limit, fault and mirror: what `decide` rolls per request."""
    info = out.info
    rl = rule.rate_limit
    if rl is not None:
        burst = rl.burst if rl.burst is not None else "1 s worth"
        info["rate_limit"] = {"requests_per_second": rl.requests_per_second,
                              "burst": rl.burst, "per_source": rl.per_source}
        per = (f" per source ({out.info['source'] or 'unknown'})" if rl.per_source else
               " for every caller together")
        out.steps.append(f"rate limit: {rl.requests_per_second:g} requests/s, burst {burst}"
                         f"{per}, per host; past it the proxy answers 429 with Retry-After "
                         "(gRPC: RESOURCE_EXHAUSTED)")
    f = rule.fault
    if f is not None:
        applies = any(w.startswith("fault:") for w in d.why)
        info["fault"] = {
            "delay": None if f.delay is None else {"seconds": f.delay.seconds,
                                                   "percent": f.delay.percent},
            "abort": None if f.abort is None else {"status": f.abort.status,
                                                   "grpc_status": f.abort.grpc_status,
                                                   "percent": f.abort.percent},
            "headers": [h.name for h in f.headers], "applies": applies}
        parts = []
        if f.abort is not None:
            what = f.abort.status or f"gRPC {f.abort.grpc_status}"
            parts.append(f"abort {what} for {f.abort.percent:g}%")
        if f.delay is not None:
            parts.append(f"delay {f.delay.seconds:g}s for {f.delay.percent:g}%")
        only = ("; only requests with header " + ", ".join(h.name for h in f.headers)
                if f.headers else "")
        out.steps.append(f"fault: {' and '.join(parts)}{only}"
                         + ("" if applies else ": not this request (it lacks the header)"))
    m = rule.mirror
    if m is not None:
        pick = Pick(m.service, subset_key(m.subset), m.port)
        info["mirror"] = {**pick_json(pick), "percent": m.percent}
        out.steps.append(f"mirror: a copy of {m.percent:g}% to {pick}, fire-and-forget (its "
                         "answer discarded; only bodies the proxy holds whole are copied)")


def _plan(out: Steered, d: Decision | None, ask: HttpAsk,
          policy_of: Mapping[str, ServicePolicy]) -> Steered:
    """The timeouts and retries in force: the rule's, else the target service's HTTP route
    (as exchange.ServiceHttp.route picks it), else its defaults."""
    policy = policy_of.get(out.target) or ServicePolicy()
    name, timeouts, retry = http_route(policy, ask.method, ask.path)
    t_from = r_from = f"service {out.target}" + (f" route {name}" if name != "default" else "")
    if d is not None and d.timeouts is not None:
        timeouts, t_from = d.timeouts, f"rule {d.rule}"
    if d is not None and d.retry is not None:
        retry, r_from = d.retry, f"rule {d.rule}"
    out.info["timeouts"] = {"request": timeouts.request, "per_try": timeouts.per_try,
                            "idle": timeouts.idle, "from": t_from}
    out.info["retry"] = {"attempts": retry.attempts, "on": list(retry.on),
                         "methods": list(retry.methods), "from": r_from}
    out.info["metrics_route"] = d.rule if d is not None and d.rule else name
    out.steps.append(f"timeouts ({t_from}): {timeouts_text(timeouts)}; retries ({r_from}): "
                     + retry_text(retry, ask.method))
    return out


def http_route(policy: ServicePolicy, method: str, path: str
               ) -> tuple[str, HttpTimeouts, RetryPolicy]:
    """A service's own HTTP route for (method, path), as the worker picks it."""
    http = policy.http
    r = http.route_for(method, path)
    if r is None:
        return "default", http.timeouts, http.retry
    return r.name, r.timeouts or http.timeouts, r.retry or http.retry


def timeouts_text(t: HttpTimeouts) -> str:
    request = f"{t.request:g}s" if t.request is not None else "none"
    per_try = f"{t.per_try:g}s" if t.per_try is not None else "up to the request's"
    return f"request {request}, per try {per_try}, idle {t.idle:g}s"


def retry_text(r: RetryPolicy, method: str) -> str:
    if not r.attempts:
        return "none (attempts 0)"
    text = f"up to {r.attempts} more on {', '.join(r.on)}"
    if method not in r.methods:
        text += f" ({method} is retried only on connect-failure)"
    return text


def _refuse(out: Steered, status: int, outcome: str, detail: str) -> Steered:
    out.refusal = out.info["refusal"] = {"status": status, "outcome": outcome,
                                         "detail": detail}
    out.steps.append(f"→ the proxy answers {status} itself (x-meshnode-error: {outcome}): "
                     f"{detail}")
    return out


def pick_json(p: Pick) -> dict[str, Any]:
    return {"service": p.service, "subset": labels_json(p.subset), "port": p.port,
            "text": str(p)}

