"""Recent samples of the host's Totals, and what operators read from them: rates, error rates
and connect-latency percentiles over a window (`meshnode stat`, `top`, the dashboard), and on
HTTP, HTTP/2 and gRPC ports request rate, success rate, retries and request-latency
percentiles (request_figures.py), per service, pair and route.

The agent samples the workers once a second and keeps the last `keep` seconds. A window's
figures are the difference between the newest sample and the newest one at least `window`
seconds older (or the oldest kept, seeded with zeros at agent start), divided by the time
between them, the same arithmetic as Prometheus' rate() and histogram_quantile(). The figures
read the counters by their meshnode.counters names (connections, active, bytes_up, bytes_down,
the failures and the connect histogram). Kernel-path pairs (`Totals.kernel`) count with the
proxied ones per service and pair; `by_path_pair` keeps the two apart. They have no connect
latency (the kernel connects straight to the endpoint), but an RTT: the mean smoothed RTT of
the connections that closed in the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshnode.counters import KERNEL_PATH, PROXY_PATH
from meshnode.histogram import CONNECT_BUCKETS, quantile
from meshnode.telemetry.aggregate import PairTotals, Totals
from meshnode.telemetry.request_figures import (
    RequestFigures,
    RequestTally,
    by_dst,
    by_pair,
    by_route,
    request_figures,
    tallies,
)

__all__ = ["History", "WindowFigures", "figures"]


@dataclass(frozen=True)
class WindowFigures:
    """Traffic of one pair or service over a window."""

    connections: int  # opened in the window
    failed: int  # of those, never reached an endpoint
    active: int  # open now
    rate: float  # connections opened per second
    error_rate: float  # failed / connections (0 when there were none)
    bytes_up_rate: float
    bytes_down_rate: float
    p50_ms: float | None  # connect latency
    p95_ms: float | None
    p99_ms: float | None
    # requests, when the pair or service ever had one (HTTP, HTTP/2 and gRPC ports)
    requests: RequestFigures | None = None
    # kernel path: mean smoothed TCP RTT of the connections that closed in the window
    rtt_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in self.__dict__.items() if k != "requests"}
        out["requests"] = None if self.requests is None else self.requests.to_json()
        return out


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


def figures(new: Iterable[PairTotals], old: Iterable[PairTotals], seconds: float,
            req_new: RequestTally | None = None,
            req_old: RequestTally | None = None) -> WindowFigures:
    """Figures of the pairs in `new` (summed) against the same pairs' earlier values `old`;
    with their request tallies (`req_new`, `req_old`), the request figures too."""
    cur, base = PairTotals("", ""), PairTotals("", "")
    for p in new:
        cur.add(p)
    for p in old:
        base.add(p)
    conns = cur["connections"] - base["connections"]
    failed = cur.failed - base.failed
    counts = [a - b for a, b in zip(cur.histograms["connect"].counts,
                                    base.histograms["connect"].counts, strict=True)]
    span = max(seconds, 1e-9)
    requests = None
    if req_new is not None:
        latency = [a - b for a, b in zip(cur.histograms["request"].counts,
                                         base.histograms["request"].counts, strict=True)]
        requests = request_figures(req_new, req_old, seconds, latency)
    timed = cur["kernel_closed"] - base["kernel_closed"]
    return WindowFigures(
        connections=conns, failed=failed, active=cur["active"],
        rate=conns / span, error_rate=(failed / conns) if conns > 0 else 0.0,
        bytes_up_rate=(cur["bytes_up"] - base["bytes_up"]) / span,
        bytes_down_rate=(cur["bytes_down"] - base["bytes_down"]) / span,
        p50_ms=_ms(quantile(0.50, CONNECT_BUCKETS, counts)),
        p95_ms=_ms(quantile(0.95, CONNECT_BUCKETS, counts)),
        p99_ms=_ms(quantile(0.99, CONNECT_BUCKETS, counts)), requests=requests,
        rtt_ms=(cur["rtt_us"] - base["rtt_us"]) / timed / 1000.0 if timed > 0 else None)


class History:
    def __init__(self, start: float, keep: float = 600.0) -> None:
        self.keep = keep
        self._samples: deque[tuple[float, Totals]] = deque([(start, Totals())])
        # per kept sample (by id, the object kept to check it): its pairs and request tallies
        # summed per service, once; a sample never changes, and the dashboard reads every
        # one each poll
        self._per_dst: dict[int, tuple[Totals, _PerService]] = {}

    def add(self, t: float, totals: Totals, replace_latest: bool = False) -> None:
        """Append a sample, or let it stand in for the latest (never for the zero seed)."""
        if replace_latest and len(self._samples) > 1:
            self._forget(self._samples.pop())
        self._samples.append((t, totals))
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.keep:
            self._forget(self._samples.popleft())

    def _forget(self, sample: tuple[float, Totals]) -> None:
        self._per_dst.pop(id(sample[1]), None)

    def _services(self, totals: Totals) -> _PerService:
        """A kept sample's pairs and request tallies summed per destination service."""
        cached = self._per_dst.get(id(totals))
        if cached is not None and cached[0] is totals:
            return cached[1]
        pairs: dict[str, PairTotals] = {}
        for (_, dst), p in (*totals.pairs.items(), *totals.kernel.items()):
            summed = pairs.get(dst)
            if summed is None:
                summed = pairs[dst] = PairTotals("", dst)
            summed.add(p)
        found = _PerService(pairs, tallies(totals, by_dst))
        self._per_dst[id(totals)] = (totals, found)
        return found

    def _figures(self, new: Totals, old: Totals, seconds: float, dst: str) -> WindowFigures:
        n, o = self._services(new), self._services(old)
        return figures(_one(n.pairs.get(dst)), _one(o.pairs.get(dst)), seconds,
                       n.requests.get(dst), o.requests.get(dst))

    @property
    def latest(self) -> tuple[float, Totals]:
        return self._samples[-1]

    def base(self, window: float, at: int = -1) -> tuple[float, Totals]:
        """The newest sample at least `window` seconds before sample `at` (or the oldest)."""
        t_new = self._samples[at][0]
        chosen = self._samples[0]
        for s in self._samples:
            if s[0] <= t_new - window:
                chosen = s
            else:
                break
        return chosen

    def by_service(self, window: float) -> dict[str, WindowFigures]:
        """Per destination service (every source summed)."""
        (t1, new), (t0, old) = self.latest, self.base(window)
        return {dst: self._figures(new, old, t1 - t0, dst)
                for dst in sorted(self._services(new).pairs)}

    def by_pair(self, window: float) -> list[tuple[str, str, WindowFigures]]:
        """Per (source, destination service) pair, both paths summed: who called whom."""
        (t1, new), (t0, old) = self.latest, self.base(window)
        req_new, req_old = tallies(new, by_pair), tallies(old, by_pair)
        out = []
        for key in sorted(new.pairs.keys() | new.kernel.keys()):
            out.append((*key, figures(_both(new, key), _both(old, key), t1 - t0,
                                      req_new.get(key), req_old.get(key))))
        return out

    def by_path_pair(self, window: float) -> list[tuple[str, str, str, WindowFigures]]:
        """Per (source, destination service, path) (counters.PROXY_PATH or KERNEL_PATH)."""
        (t1, new), (t0, old) = self.latest, self.base(window)
        req_new, req_old = tallies(new, by_pair), tallies(old, by_pair)
        out = []
        for path, now, then in ((PROXY_PATH, new.pairs, old.pairs),
                                (KERNEL_PATH, new.kernel, old.kernel)):
            for key, p in now.items():
                prev = then.get(key)
                requests = (req_new.get(key), req_old.get(key)) if path == PROXY_PATH else \
                    (None, None)
                out.append((*key, path, figures([p], [prev] if prev else [], t1 - t0,
                                                *requests)))
        return sorted(out, key=lambda row: row[:3])

    def paths(self) -> dict[str, list[str]]:
        """Per destination service, the paths that ever carried its connections (newest
        sample): PROXY_PATH, KERNEL_PATH or both, in that order."""
        totals = self.latest[1]
        out: dict[str, list[str]] = {}
        for path, pairs in ((PROXY_PATH, totals.pairs), (KERNEL_PATH, totals.kernel)):
            for _, dst in pairs:
                seen = out.setdefault(dst, [])
                if path not in seen:
                    seen.append(path)
        return out

    def by_route(self, window: float) -> dict[str, list[tuple[str, RequestFigures]]]:
        """Per destination service, its routes' request figures (every source summed; no
        percentiles: latency is kept per pair), in route name order."""
        (t1, new), (t0, old) = self.latest, self.base(window)
        req_old = tallies(old, by_route)
        out: dict[str, list[tuple[str, RequestFigures]]] = {}
        for (dst, route), tally in sorted(tallies(new, by_route).items()):
            out.setdefault(dst, []).append(
                (route, request_figures(tally, req_old.get((dst, route)), t1 - t0)))
        return out

    def series(self, service: str, step: float = 5.0, span: float = 300.0) -> dict[str, list[Any]]:
        """Rate and latency percentiles of `service` in `step`-second slices over `span`."""
        return self.series_all([service], step, span)[service]

    def series_all(self, services: Iterable[str], step: float = 5.0,
                   span: float = 300.0) -> dict[str, dict[str, list[Any]]]:
        """Per service, in `step`-second slices over `span`: connection rate and connect
        latency p50/p99; request rate, success rate and request latency p50/p99 (None in a
        slice where the service had never had a request). One pass over the samples, each
        sample's request tallies summed once for every service (and kept with it)."""
        names = list(services)
        out: dict[str, dict[str, list[Any]]] = {name: {k: [] for k in _SERIES} for name in names}
        samples = list(self._samples)
        t_end = samples[-1][0]
        prev: tuple[float, Totals] | None = None
        for t, totals in samples:
            if t < t_end - span:
                prev = (t, totals)
                continue
            if prev is not None and t - prev[0] < step and t != t_end:
                continue
            if prev is not None:
                for name in names:
                    f = self._figures(totals, prev[1], t - prev[0], name)
                    r = f.requests
                    row = out[name]
                    row["t"].append(round(t, 3))
                    row["rate"].append(round(f.rate, 3))
                    row["p50_ms"].append(_round(f.p50_ms))
                    row["p99_ms"].append(_round(f.p99_ms))
                    row["requests"].append(None if r is None else round(r.rate, 3))
                    row["success_rate"].append(None if r is None else _round(r.success_rate, 4))
                    row["request_p50_ms"].append(None if r is None else _round(r.p50_ms))
                    row["request_p99_ms"].append(None if r is None else _round(r.p99_ms))
            prev = (t, totals)
        return out


_SERIES = ("t", "rate", "p50_ms", "p99_ms", "requests", "success_rate", "request_p50_ms",
           "request_p99_ms")


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


@dataclass(frozen=True)
class _PerService:
    """One sample summed per destination service: its pairs (every source) and requests."""

    pairs: dict[str, PairTotals]
    requests: dict[str, RequestTally]


def _one(p: PairTotals | None) -> list[PairTotals]:
    return [] if p is None else [p]


def _both(totals: Totals, key: tuple[str, str]) -> list[PairTotals]:
    """A pair's proxied and kernel-path totals (either may be absent)."""
    return [p for p in (totals.pairs.get(key), totals.kernel.get(key)) if p is not None]
