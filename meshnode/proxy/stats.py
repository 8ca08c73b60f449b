"""A worker's traffic counters by (source service, destination service), and their wire form
for the agent's `stats` request.

Counters are cumulative since the worker started; `active` values are gauges. Plain integer
attributes on slotted objects: the relay bumps byte counters once per read, so this stays a
single attribute add (no dict lookups, no locks: a worker is one thread). The agent sums the
workers, keeps history for rates and percentiles, and exports Prometheus metrics.

What each figure means, its kind and its Prometheus name are declared once, in
meshnode.counters: a pair's counters are the PAIR_FIELDS (attributes of PairStats, the names the
relay and the connector bump), `failures` counts connections that never got an upstream by
reason, `connect` and `duration` are the PAIR_HISTOGRAMS. Per destination service and endpoint,
`selections` counts the connect attempts the balancer sent there. Worker-wide (WORKER_FIELDS):
`unrouted` connections passed straight to their original destination, `origdst_errors`
connections refused because their original destination was unreadable or was the proxy itself.

The stats reply (wire.StatsReply) sends every figure by its schema name; the per-service sums
`meshnode status` shows are the agent's (telemetry/aggregate.py), from the same pairs.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

from collections.abc import Callable

from meshnode.counters import LABELLED_FIELDS, PAIR_FIELDS, PAIR_HISTOGRAMS
from meshnode.histogram import CONNECT_BUCKETS, DURATION_BUCKETS, REQUEST_BUCKETS, Histogram
from meshnode.model import HostPort
from meshnode.wire import HistogramCounts, LabelledValue, PairCounters, StatsReply

__all__ = ["UNKNOWN_SOURCE", "PairStats", "WorkerStats"]

UNKNOWN_SOURCE = "unknown"
_PAIR_NAMES = tuple(f.name for f in PAIR_FIELDS)
_HISTOGRAM_NAMES = tuple(h.name for h in PAIR_HISTOGRAMS)


class PairStats:
    """One pair's figures. The integer attributes are exactly counters.PAIR_FIELDS (a unit
    test holds them together): the hot path bumps attributes, the wire form names them."""

    __slots__ = ("active", "bytes_down", "bytes_up", "closed", "connect", "connect_errors",
                 "connections", "dst", "duration", "failures", "request", "src")

    def __init__(self, src: str, dst: str) -> None:
        self.src = src
        self.dst = dst
        self.connections = 0
        self.active = 0
        self.closed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connect_errors = 0
        self.failures: dict[str, int] = {}
        self.connect = Histogram(CONNECT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.request = Histogram(REQUEST_BUCKETS)

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def to_wire(self) -> PairCounters:
        hists: dict[str, HistogramCounts] = {}
        for name in _HISTOGRAM_NAMES:
            h: Histogram = getattr(self, name)
            hists[name] = HistogramCounts(list(h.counts), h.sum)
        return PairCounters(self.src, self.dst,
                            {name: getattr(self, name) for name in _PAIR_NAMES},
                            dict(self.failures), hists)


class WorkerStats:
    """All counters of one worker. Pairs keep their counters after a service goes away, so the
    agent's sums never run backwards."""

    __slots__ = ("inbound", "labelled", "origdst_errors", "pairs", "passthrough", "selections",
                 "unrouted")

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], PairStats] = {}
        self.selections: dict[tuple[str, HostPort], int] = {}
        self.unrouted = 0
        self.origdst_errors = 0
        # Unrouted connections' bytes land here: the relay always has a sink to count into,
        # and the wire form reports only the connection count.
        self.passthrough = PairStats(UNKNOWN_SOURCE, "")
        # counters.SECURITY_FIELDS: name -> label values -> count. Inbound tunnels' relays
        # count into their own pairs, keyed by (source identity, destination identity), sent
        # as the inbound_* fields (the pairs above stay per service, as `status` shows them).
        self.labelled: dict[str, dict[tuple[str, ...], int]] = {
            f.name: {} for f in LABELLED_FIELDS}
        self.inbound: dict[tuple[str, str], PairStats] = {}

    def count(self, name: str, *labels: str) -> None:
        """One more of LABELLED_FIELDS `name` for these label values."""
        rows = self.labelled[name]
        rows[labels] = rows.get(labels, 0) + 1

    def add(self, name: str, n: int, *labels: str) -> None:
        """`n` more of LABELLED_FIELDS `name` for these label values."""
        rows = self.labelled[name]
        rows[labels] = rows.get(labels, 0) + n

    def request(self, src: str, dst: str, route: str, method: str, status_class: str,
                seconds: float) -> None:
        """One finished request: its counter row and its pair's latency histogram."""
        rows = self.labelled["requests"]
        key = (src, dst, route, method, status_class)
        rows[key] = rows.get(key, 0) + 1
        self.pair(src, dst).request.observe(seconds)

    def inbound_pair(self, src_identity: str, dst_identity: str) -> PairStats:
        key = (src_identity, dst_identity)
        p = self.inbound.get(key)
        if p is None:
            p = self.inbound[key] = PairStats(src_identity, dst_identity)
        return p

    def _labelled_wire(self) -> dict[str, tuple[LabelledValue, ...]]:
        rows = {name: tuple(LabelledValue(k, v) for k, v in values.items())
                for name, values in self.labelled.items() if values}
        if self.inbound:
            for name, attr in (("inbound_connections", "connections"),
                               ("inbound_active", "active"), ("inbound_bytes_up", "bytes_up"),
                               ("inbound_bytes_down", "bytes_down")):
                rows[name] = tuple(LabelledValue(k, getattr(p, attr))
                                   for k, p in self.inbound.items())
        return rows

    def pair(self, src: str, dst: str) -> PairStats:
        p = self.pairs.get((src, dst))
        if p is None:
            p = self.pairs[(src, dst)] = PairStats(src, dst)
        return p

    def selected(self, dst: str, addr: HostPort) -> None:
        key = (dst, addr)
        self.selections[key] = self.selections.get(key, 0) + 1

    def to_wire(self, seq: int, worker: int, pid: int, active: int,
                endpoints: Callable[[str], dict[str, dict[str, float | int]]] = lambda name: {},
                unknown_messages: int = 0) -> StatsReply:
        """`endpoints(name)` gives a service's per-endpoint report (the routing table's);
        `active`: open client connections; `unknown_messages`: ignored control messages."""
        selections: dict[str, dict[str, int]] = {}
        for (dst, addr), n in self.selections.items():
            selections.setdefault(dst, {})[str(addr)] = n
        reports = {dst: report for dst in {p.dst for p in self.pairs.values()}
                   if (report := endpoints(dst))}
        return StatsReply(
            seq, worker, pid, tuple(p.to_wire() for p in self.pairs.values()), reports,
            selections, {"unrouted": self.unrouted, "origdst_errors": self.origdst_errors,
                         "active": active, "unknown_messages": unknown_messages},
            self._labelled_wire())
