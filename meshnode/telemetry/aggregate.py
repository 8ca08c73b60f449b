"""Summing the workers' counters into one host-wide view (`Totals`), kept monotonic across
worker restarts.

A worker's counters start at zero when it starts. The agent keeps each worker's last answer;
when a worker id answers with a new pid (it was restarted), the old process's last answer moves
into `retired`, so every counter the agent exports only ever grows (what Prometheus' rate()
expects). Counts between the last sample and a crash are lost (at most one sample interval).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshnode.histogram import CONNECT_BUCKETS, DURATION_BUCKETS

__all__ = ["Accumulator", "PairTotals", "Totals"]

_COUNTERS = ("connections", "closed", "bytes_up", "bytes_down", "connect_errors")


@dataclass
class PairTotals:
    """One (source service, destination service) pair, summed over workers."""

    src: str
    dst: str
    connections: int = 0
    active: int = 0
    closed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connect_errors: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    connect: list[int] = field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_sum: float = 0.0
    duration: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0

    @property
    def failed(self) -> int:
        """Connections that never reached an endpoint."""
        return sum(self.failures.values())

    def add_wire(self, w: dict[str, Any]) -> None:
        for k in _COUNTERS:
            setattr(self, k, getattr(self, k) + int(w.get(k, 0)))
        self.active += int(w.get("active", 0))
        for reason, n in (w.get("failures") or {}).items():
            self.failures[reason] = self.failures.get(reason, 0) + int(n)
        _add_hist(self.connect, w.get("connect"))
        self.connect_sum += float((w.get("connect") or {}).get("sum", 0.0))
        _add_hist(self.duration, w.get("duration"))
        self.duration_sum += float((w.get("duration") or {}).get("sum", 0.0))

    def add(self, o: PairTotals, gauges: bool = True) -> None:
        for k in _COUNTERS:
            setattr(self, k, getattr(self, k) + getattr(o, k))
        if gauges:
            self.active += o.active
        for reason, n in o.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        self.connect = [a + b for a, b in zip(self.connect, o.connect, strict=True)]
        self.connect_sum += o.connect_sum
        self.duration = [a + b for a, b in zip(self.duration, o.duration, strict=True)]
        self.duration_sum += o.duration_sum


def _add_hist(into: list[int], wire: Any) -> None:
    counts = (wire or {}).get("counts") or ()
    if len(counts) != len(into):
        return  # a worker of another version with other buckets: skip rather than misfile
    for i, n in enumerate(counts):
        into[i] += int(n)


@dataclass
class Totals:
    """The host's proxy counters at one instant."""

    pairs: dict[tuple[str, str], PairTotals] = field(default_factory=dict)
    selections: dict[tuple[str, str], int] = field(default_factory=dict)  # (dst, endpoint)
    unrouted: int = 0
    origdst_errors: int = 0
    active: int = 0

    def pair(self, src: str, dst: str) -> PairTotals:
        p = self.pairs.get((src, dst))
        if p is None:
            p = self.pairs[(src, dst)] = PairTotals(src, dst)
        return p

    def add_worker(self, answer: dict[str, Any]) -> None:
        for w in answer.get("pairs") or ():
            self.pair(str(w.get("src", "")), str(w.get("dst", ""))).add_wire(w)
        for dst, eps in (answer.get("selections") or {}).items():
            for addr, n in eps.items():
                self.selections[(dst, addr)] = self.selections.get((dst, addr), 0) + int(n)
        self.unrouted += int(answer.get("unrouted", 0))
        self.origdst_errors += int(answer.get("origdst_errors", 0))
        self.active += int(answer.get("active", 0))

    def add(self, o: Totals, gauges: bool = True) -> None:
        """Add `o`'s counters (and its gauges, unless `o` is the past: retired workers)."""
        for (src, dst), p in o.pairs.items():
            self.pair(src, dst).add(p, gauges)
        for k, n in o.selections.items():
            self.selections[k] = self.selections.get(k, 0) + n
        self.unrouted += o.unrouted
        self.origdst_errors += o.origdst_errors
        if gauges:
            self.active += o.active


class Accumulator:
    """The workers' answers → monotonic Totals."""

    def __init__(self) -> None:
        self.retired = Totals()
        self._last: dict[int, tuple[int | None, dict[str, Any]]] = {}  # worker id → pid, answer

    def update(self, answers: list[dict[str, Any]]) -> Totals:
        """`answers`: the live workers' stats replies, each with the agent-added "pid"."""
        total = Totals()
        total.add(self.retired, gauges=False)
        answered = set()
        for a in answers:
            wid, pid = int(a.get("worker", -1)), a.get("pid")
            answered.add(wid)
            prev = self._last.get(wid)
            if prev is not None and prev[0] != pid:
                gone = _counters_of(prev[1])
                self.retired.add(gone, gauges=False)
                total.add(gone, gauges=False)
            self._last[wid] = (pid, a)
            total.add_worker(a)
        for wid, (_, a) in self._last.items():
            if wid not in answered:  # dead or slow: its counts so far still count
                total.add(_counters_of(a), gauges=False)
        return total


def _counters_of(answer: dict[str, Any]) -> Totals:
    t = Totals()
    t.add_worker(answer)
    return t
