"""Recent samples of the host's Totals, and what operators read from them: rates, error rates
and connect-latency percentiles over a window (`meshnode stat`, `top`, the dashboard).

The agent samples the workers once a second and keeps the last `keep` seconds. A window's
figures are the difference between the newest sample and the newest one at least `window`
seconds older (or the oldest kept, seeded with zeros at agent start), divided by the time
between them, the same arithmetic as Prometheus' rate() and histogram_quantile(). The figures
read the counters by their meshnode.counters names (connections, active, bytes_up, bytes_down,
the failures and the connect histogram).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshnode.histogram import CONNECT_BUCKETS, quantile
from meshnode.telemetry.aggregate import PairTotals, Totals

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

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in self.__dict__.items()}


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


def figures(new: Iterable[PairTotals], old: Iterable[PairTotals], seconds: float) -> WindowFigures:
    """Figures of the pairs in `new` (summed) against the same pairs' earlier values `old`."""
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
    return WindowFigures(
        connections=conns, failed=failed, active=cur["active"],
        rate=conns / span, error_rate=(failed / conns) if conns > 0 else 0.0,
        bytes_up_rate=(cur["bytes_up"] - base["bytes_up"]) / span,
        bytes_down_rate=(cur["bytes_down"] - base["bytes_down"]) / span,
        p50_ms=_ms(quantile(0.50, CONNECT_BUCKETS, counts)),
        p95_ms=_ms(quantile(0.95, CONNECT_BUCKETS, counts)),
        p99_ms=_ms(quantile(0.99, CONNECT_BUCKETS, counts)))


class History:
    def __init__(self, start: float, keep: float = 600.0) -> None:
        self.keep = keep
        self._samples: deque[tuple[float, Totals]] = deque([(start, Totals())])

    def add(self, t: float, totals: Totals, replace_latest: bool = False) -> None:
        """Append a sample, or let it stand in for the latest (never for the zero seed)."""
        if replace_latest and len(self._samples) > 1:
            self._samples.pop()
        self._samples.append((t, totals))
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.keep:
            self._samples.popleft()

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
        return {dst: figures(_dst(new, dst), _dst(old, dst), t1 - t0)
                for dst in sorted({d for _, d in new.pairs})}

    def by_pair(self, window: float) -> list[tuple[str, str, WindowFigures]]:
        (t1, new), (t0, old) = self.latest, self.base(window)
        out = []
        for (src, dst), p in sorted(new.pairs.items()):
            prev = old.pairs.get((src, dst))
            out.append((src, dst, figures([p], [prev] if prev else [], t1 - t0)))
        return out

    def series(self, service: str, step: float = 5.0, span: float = 300.0) -> dict[str, list[Any]]:
        """Rate and latency percentiles of `service` in `step`-second slices over `span`."""
        out: dict[str, list[Any]] = {"t": [], "rate": [], "p50_ms": [], "p99_ms": []}
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
                f = figures(_dst(totals, service), _dst(prev[1], service), t - prev[0])
                out["t"].append(round(t, 3))
                out["rate"].append(round(f.rate, 3))
                out["p50_ms"].append(None if f.p50_ms is None else round(f.p50_ms, 3))
                out["p99_ms"].append(None if f.p99_ms is None else round(f.p99_ms, 3))
            prev = (t, totals)
        return out


def _dst(totals: Totals, dst: str) -> list[PairTotals]:
    return [p for (_, d), p in totals.pairs.items() if d == dst]
