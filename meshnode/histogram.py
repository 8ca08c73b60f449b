"""Fixed-bucket histograms shared by the proxy workers (which count) and the agent (which sums
workers, exports Prometheus histograms and reads percentiles over a window).

Buckets are fixed and the same everywhere, so summing workers and subtracting two samples is
element-wise and a percentile needs nothing but the counts. Upper bounds are in seconds, like
Prometheus' `le`; observations above the last bound land in the implicit +Inf bucket.

Pure module: the data plane imports it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["CONNECT_BUCKETS", "DURATION_BUCKETS", "REQUEST_BUCKETS", "Histogram", "quantile"]

# Upstream connect latency: loopback connects take tens of microseconds, a far host a few ms,
# and the connect timeout is seconds.
CONNECT_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                      0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Connection lifetime: from one-shot calls to long-lived streams.
# Request latency, first request byte to last response byte: sub-millisecond to a minute.
REQUEST_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
                                       60.0, 300.0, 1800.0, 3600.0)


class Histogram:
    """Counts per bucket (the last one is +Inf) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The q-quantile (0..1) estimated from per-bucket counts, interpolating linearly inside
    the bucket as Prometheus' histogram_quantile does; None without observations. A quantile
    in the +Inf bucket is reported as the last finite bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if seen + n >= rank and n > 0:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * ((rank - seen) / n)
        seen += n
    return bounds[-1]
