"""Summing the workers' counters into one host-wide view (`Totals`), kept monotonic across
worker restarts. `meshnode status`, `stat`, `top`, the dashboard and /metrics all read it.

A worker's counters start at zero when it starts. The agent keeps each worker's last answer;
when a worker id answers with a new pid (it was restarted), the old process's last answer moves
into `retired`, so every counter the agent exports only ever grows (what Prometheus' rate()
expects). Counts between the last sample and a crash are lost (at most one sample interval).

How each figure combines is its `kind` in meshnode.counters: counters add (live and retired
processes), gauges add over the live workers only, a max takes the largest live value. Names a
worker sends that the schema does not declare (a newer worker's) are ignored.

Kernel-path connections (no proxy on the path) join as `Totals.kernel` pairs and KERNEL_FIELDS
rows, which the agent adds from BPF maps (telemetry/kernel_flows.py) after summing the workers.

Agent side: imports the shared schema and wire types, never the proxy package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshnode.counters import (
    ENDPOINT_FIELDS,
    KERNEL_FIELDS,
    KERNEL_PAIR_FIELDS,
    LABELLED_FIELDS,
    PAIR_FIELDS,
    PAIR_HISTOGRAMS,
    WORKER_FIELDS,
    Field,
)
from meshnode.wire import HistogramCounts, PairCounters, StatsReply

__all__ = ["Accumulator", "HistogramTotals", "PairTotals", "Totals"]

_LABELLED = {f.name: f for f in (*LABELLED_FIELDS, *KERNEL_FIELDS)}
# A pair's values: the proxy's, and the kernel path's sums (absent from workers' pairs).
_PAIR_VALUES = PAIR_FIELDS + KERNEL_PAIR_FIELDS


def _combine_rows(into: dict[str, dict[tuple[str, ...], int]], name: str,
                  rows: Any, gauges: bool) -> None:
    """Fold one LABELLED_FIELDS field's rows ((labels, value) pairs) in, by its kind."""
    f = _LABELLED.get(name)
    if f is None or (f.kind != "counter" and not gauges):
        return  # undeclared (a newer worker's), or a gauge of a past process
    out = into.setdefault(name, {})
    for labels, value in rows:
        if len(labels) == len(f.labels) and isinstance(value, int):
            key = tuple(labels)
            out[key] = max(out.get(key, 0), value) if f.kind == "max" else \
                out.get(key, 0) + value


def _combine(into: dict[str, Any], fields: tuple[Field, ...], values: dict[str, Any],
             gauges: bool) -> None:
    """Fold `values` (by schema name) into `into` by each field's kind; a past process
    (`gauges` False) brings only its counters."""
    for f in fields:
        v = values.get(f.name)
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue  # absent, or not a number: nothing to add
        if f.kind == "counter" or (f.kind == "gauge" and gauges):
            into[f.name] = into.get(f.name, 0) + v
        elif f.kind == "max" and gauges:
            into[f.name] = max(into.get(f.name, 0), v)


@dataclass
class HistogramTotals:
    counts: list[int]
    sum: float = 0.0

    def add(self, counts: list[int], total: float) -> None:
        if len(counts) != len(self.counts):
            return  # a worker of another version with other buckets: skip rather than misfile
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.sum += total


def _histograms() -> dict[str, HistogramTotals]:
    return {h.name: HistogramTotals([0] * (len(h.bounds) + 1)) for h in PAIR_HISTOGRAMS}


@dataclass
class PairTotals:
    """One (source service, destination service) pair, summed over workers. `values` holds
    counters.PAIR_FIELDS by name (read them with `p["connections"]`)."""

    src: str
    dst: str
    values: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, HistogramTotals] = field(default_factory=_histograms)

    def __getitem__(self, name: str) -> int:
        return self.values.get(name, 0)

    @property
    def failed(self) -> int:
        """Connections that never reached an endpoint."""
        return sum(self.failures.values())

    def add_wire(self, w: PairCounters) -> None:
        _combine(self.values, _PAIR_VALUES, w.values, gauges=True)
        self._add_failures(w.failures)
        for name, h in self.histograms.items():
            wh: HistogramCounts | None = w.histograms.get(name)
            if wh is not None:
                h.add(wh.counts, wh.sum)

    def add(self, o: PairTotals, gauges: bool = True) -> None:
        _combine(self.values, _PAIR_VALUES, o.values, gauges)
        self._add_failures(o.failures)
        for name, h in self.histograms.items():
            oh = o.histograms.get(name)
            if oh is not None:
                h.add(oh.counts, oh.sum)

    def _add_failures(self, failures: dict[str, int]) -> None:
        for reason, n in failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n


@dataclass
class Totals:
    """The host's traffic counters at one instant."""

    pairs: dict[tuple[str, str], PairTotals] = field(default_factory=dict)  # proxied
    # kernel-path connections (counters.KERNEL_PATH) by (src, dst): PAIR_FIELDS, failures
    # and KERNEL_PAIR_FIELDS; no histograms
    kernel: dict[tuple[str, str], PairTotals] = field(default_factory=dict)
    # (service, endpoint address) -> ENDPOINT_FIELDS by name
    endpoints: dict[tuple[str, str], dict[str, int | float]] = field(default_factory=dict)
    selections: dict[tuple[str, str], int] = field(default_factory=dict)  # (dst, endpoint)
    values: dict[str, int] = field(default_factory=dict)  # WORKER_FIELDS by name
    # LABELLED_FIELDS (security, requests) by name: label values -> value
    labelled: dict[str, dict[tuple[str, ...], int]] = field(default_factory=dict)

    def pair(self, src: str, dst: str) -> PairTotals:
        p = self.pairs.get((src, dst))
        if p is None:
            p = self.pairs[(src, dst)] = PairTotals(src, dst)
        return p

    def kernel_pair(self, src: str, dst: str) -> PairTotals:
        p = self.kernel.get((src, dst))
        if p is None:
            p = self.kernel[(src, dst)] = PairTotals(src, dst)
        return p

    def add_worker(self, answer: StatsReply) -> None:
        for w in answer.pairs:
            self.pair(w.src, w.dst).add_wire(w)
        for dst, eps in answer.endpoints.items():
            for addr, figures in eps.items():
                _combine(self.endpoints.setdefault((dst, addr), {}), ENDPOINT_FIELDS, figures,
                         gauges=True)
        for dst, picks in answer.selections.items():
            for addr, n in picks.items():
                self.selections[(dst, addr)] = self.selections.get((dst, addr), 0) + n
        _combine(self.values, WORKER_FIELDS, answer.values, gauges=True)
        for name, rows in answer.labelled.items():
            _combine_rows(self.labelled, name, ((r.labels, r.value) for r in rows), True)

    def add(self, o: Totals, gauges: bool = True) -> None:
        """Add `o`'s counters (and its gauges, unless `o` is the past: retired workers)."""
        for (src, dst), p in o.pairs.items():
            self.pair(src, dst).add(p, gauges)
        for (src, dst), p in o.kernel.items():
            self.kernel_pair(src, dst).add(p, gauges)
        for key, figures in o.endpoints.items():
            _combine(self.endpoints.setdefault(key, {}), ENDPOINT_FIELDS, figures, gauges)
        for k, n in o.selections.items():
            self.selections[k] = self.selections.get(k, 0) + n
        _combine(self.values, WORKER_FIELDS, o.values, gauges)
        for name, values in o.labelled.items():
            _combine_rows(self.labelled, name, values.items(), gauges)

    def by_service(self) -> dict[str, dict[str, Any]]:
        """What `meshnode status` shows per destination service: the PAIR_FIELDS summed over
        sources and both paths, `failures` by reason, and `endpoints` (address ->
        ENDPOINT_FIELDS, the proxy's balancer records)."""
        out: dict[str, dict[str, Any]] = {}
        for p in (*self.pairs.values(), *self.kernel.values()):
            svc = out.setdefault(p.dst, {**{f.name: 0 for f in PAIR_FIELDS}, "failures": {},
                                         "endpoints": {}})
            for f in PAIR_FIELDS:
                svc[f.name] += p[f.name]
            for reason, n in p.failures.items():
                svc["failures"][reason] = svc["failures"].get(reason, 0) + n
        for (dst, addr), figures in self.endpoints.items():
            svc = out.setdefault(dst, {**{f.name: 0 for f in PAIR_FIELDS}, "failures": {},
                                       "endpoints": {}})
            svc["endpoints"][addr] = dict(figures)
        return out


class Accumulator:
    """The workers' answers → monotonic Totals."""

    def __init__(self) -> None:
        self.retired = Totals()
        self._last: dict[int, StatsReply] = {}  # worker id → its last answer

    def update(self, answers: list[StatsReply]) -> Totals:
        """`answers`: the live workers' stats replies."""
        total = Totals()
        total.add(self.retired, gauges=False)
        answered = set()
        for a in answers:
            answered.add(a.worker)
            prev = self._last.get(a.worker)
            if prev is not None and prev.pid != a.pid:
                gone = _counters_of(prev)
                self.retired.add(gone, gauges=False)
                total.add(gone, gauges=False)
            self._last[a.worker] = a
            total.add_worker(a)
        for wid, a in self._last.items():
            if wid not in answered:  # dead or slow: its counts so far still count
                total.add(_counters_of(a), gauges=False)
        return total


def _counters_of(answer: StatsReply) -> Totals:
    t = Totals()
    t.add_worker(answer)
    return t
