"""Request figures of HTTP, HTTP/2 and gRPC ports over a window: request rate, success rate,
retries, retries the budget refused, failures by reason and latency percentiles, for a service,
a (source, destination) pair or a route.

They come from two samples of the host's Totals: the labelled rows the workers send
(counters.REQUEST_FIELDS: `requests` by src, dst, route, method and status_class;
`request_retries`, `retry_budget_exhausted` and `request_failures` by src, dst and route) are
summed into one `RequestTally` per grouping key, and the window's figures are the newer tally
less the older one, like connection figures (history.py). Whether a request succeeded is
counters.request_succeeded, the one rule every view uses. Latency comes from the pairs'
`request` histogram, kept per (src, dst): a route has counts, not percentiles.

Agent side: reads aggregate.Totals, imports nothing of the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshnode.counters import request_succeeded
from meshnode.histogram import REQUEST_BUCKETS, quantile
from meshnode.telemetry.aggregate import Totals

__all__ = ["RequestFigures", "RequestTally", "by_dst", "by_pair", "by_route", "request_figures",
           "tallies"]

K = TypeVar("K", bound=Hashable)


@dataclass
class RequestTally:
    """Cumulative request counts of one service, pair or route (since the agent started)."""

    requests: int = 0
    succeeded: int = 0
    retries: int = 0
    budget_exhausted: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # reason -> requests


def by_dst(src: str, dst: str, route: str) -> str:
    return dst


def by_pair(src: str, dst: str, route: str) -> tuple[str, str]:
    return src, dst


def by_route(src: str, dst: str, route: str) -> tuple[str, str]:
    return dst, route


def tallies(totals: Totals, key: Callable[[str, str, str], K]) -> dict[K, RequestTally]:
    """The request rows of `totals`, summed per `key(src, dst, route)`. Rows of the wrong
    length (a worker of another schema) were dropped by the aggregation already."""
    out: dict[K, RequestTally] = {}
    rows = totals.labelled
    succeeded: dict[str, bool] = {}  # a few status classes, many rows: decide each once
    for (src, dst, route, _method, status_class), n in rows.get("requests", {}).items():
        k = key(src, dst, route)
        t = out.get(k)
        if t is None:
            t = out[k] = RequestTally()
        t.requests += n
        ok = succeeded.get(status_class)
        if ok is None:
            ok = succeeded[status_class] = request_succeeded(status_class)
        if ok:
            t.succeeded += n
    for (src, dst, route), n in rows.get("request_retries", {}).items():
        out.setdefault(key(src, dst, route), RequestTally()).retries += n
    for (src, dst, route), n in rows.get("retry_budget_exhausted", {}).items():
        out.setdefault(key(src, dst, route), RequestTally()).budget_exhausted += n
    for (src, dst, route, reason), n in rows.get("request_failures", {}).items():
        failures = out.setdefault(key(src, dst, route), RequestTally()).failures
        failures[reason] = failures.get(reason, 0) + n
    return out


@dataclass(frozen=True)
class RequestFigures:
    """Requests of one service, pair or route over a window."""

    requests: int  # finished in the window
    succeeded: int  # of those, successes (counters.request_succeeded)
    rate: float  # requests per second
    success_rate: float | None  # succeeded / requests; None without requests
    retries: int
    retry_rate: float  # retries per second
    budget_exhausted: int  # retries the retry budget refused
    failures: dict[str, int]  # requests with no answer from an endpoint, by reason
    p50_ms: float | None  # request latency (None: no request, or a route)
    p95_ms: float | None
    p99_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4 if k == "success_rate" else 3) if isinstance(v, float) else v)
                for k, v in self.__dict__.items()}


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


def request_figures(new: RequestTally, old: RequestTally | None, seconds: float,
                    latency: list[int] | None = None) -> RequestFigures:
    """The window's figures: `new` less `old` (None: zero, the key is new) over `seconds`;
    `latency`: the window's request-histogram counts (REQUEST_BUCKETS), if known."""
    base = old or RequestTally()
    span = max(seconds, 1e-9)
    requests = new.requests - base.requests
    succeeded = new.succeeded - base.succeeded
    retries = new.retries - base.retries
    failures = {reason: d for reason, n in sorted(new.failures.items())
                if (d := n - base.failures.get(reason, 0)) > 0}
    counts = latency or []
    return RequestFigures(
        requests=requests, succeeded=succeeded, rate=requests / span,
        success_rate=succeeded / requests if requests > 0 else None,
        retries=retries, retry_rate=retries / span,
        budget_exhausted=new.budget_exhausted - base.budget_exhausted, failures=failures,
        p50_ms=_ms(quantile(0.50, REQUEST_BUCKETS, counts)) if counts else None,
        p95_ms=_ms(quantile(0.95, REQUEST_BUCKETS, counts)) if counts else None,
        p99_ms=_ms(quantile(0.99, REQUEST_BUCKETS, counts)) if counts else None)
