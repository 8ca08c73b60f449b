"""A worker's traffic counters by (source service, destination service), and their wire form
for the agent's `stats` request.

Counters are cumulative since the worker started; `active` values are gauges. Plain integer
attributes on slotted objects: the relay bumps byte counters once per read, so this stays a
single attribute add (no dict lookups, no locks: a worker is one thread). The agent sums the
workers, keeps history for rates and percentiles, and exports Prometheus metrics.

Per pair (`PairStats`; the source is "unknown" when the client's service cannot be told):
  connections     accepted connections routed to the destination service (VIP or endpoint
                  address), including those that then found no endpoint or failed every connect
  active          of those, the ones still open (client side not yet closed)
  closed          of those, the ones that ended (connections - active, kept for exports)
  bytes_up        client → upstream bytes relayed
  bytes_down      upstream → client bytes relayed
  connect_errors  failed or timed-out upstream connect attempts (one connection may add several)
  failures        connections that never got an upstream, by reason: no_endpoint, refused,
                  timeout, unreachable, error (the reason of the last attempt)
  connect         histogram of the successful attempt's connect latency (seconds)
  duration        histogram of connection lifetimes, accept to close (seconds)
Per destination service and endpoint: `selections`, connect attempts the balancer sent there.
Worker-wide: `unrouted` connections passed straight to their original destination,
`origdst_errors` connections refused because their original destination was unreadable or was
the proxy itself, `active` every open client connection.

The wire form also carries the per-service sums `services` that `meshnode status` shows, each
with "endpoints": {ADDR: {"active", "connections", "connect_errors", "ewma_ms",
"ejected_for"}} from the balancers' load records (route.ServiceTable.endpoint_report).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshnode.histogram import CONNECT_BUCKETS, DURATION_BUCKETS, Histogram
from meshnode.model import HostPort

__all__ = ["UNKNOWN_SOURCE", "PairStats", "WorkerStats"]

UNKNOWN_SOURCE = "unknown"
# Counters summed into the per-service view of `meshnode status`.
_SERVICE_FIELDS = ("connections", "active", "bytes_up", "bytes_down", "connect_errors",
                   "no_endpoint")


class PairStats:
    __slots__ = ("active", "bytes_down", "bytes_up", "closed", "connect", "connect_errors",
                 "connections", "dst", "duration", "failures", "src")

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

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    @property
    def no_endpoint(self) -> int:
        return self.failures.get("no_endpoint", 0)

    def to_wire(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "connections": self.connections,
                "active": self.active, "closed": self.closed, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "connect_errors": self.connect_errors,
                "failures": dict(self.failures),
                "connect": {"counts": self.connect.counts, "sum": self.connect.sum},
                "duration": {"counts": self.duration.counts, "sum": self.duration.sum}}


class WorkerStats:
    """All counters of one worker. Pairs keep their counters after a service goes away, so the
    agent's sums never run backwards."""

    __slots__ = ("origdst_errors", "pairs", "passthrough", "selections", "unrouted")

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], PairStats] = {}
        self.selections: dict[tuple[str, HostPort], int] = {}
        self.unrouted = 0
        self.origdst_errors = 0
        # Unrouted connections' bytes land here: the relay always has a sink to count into,
        # and the wire form reports only the connection count.
        self.passthrough = PairStats(UNKNOWN_SOURCE, "")

    def pair(self, src: str, dst: str) -> PairStats:
        p = self.pairs.get((src, dst))
        if p is None:
            p = self.pairs[(src, dst)] = PairStats(src, dst)
        return p

    def selected(self, dst: str, addr: HostPort) -> None:
        key = (dst, addr)
        self.selections[key] = self.selections.get(key, 0) + 1

    def services(self) -> dict[str, dict[str, int]]:
        """Per destination service, the pairs' counters summed."""
        out: dict[str, dict[str, int]] = {}
        for p in self.pairs.values():
            acc = out.setdefault(p.dst, dict.fromkeys(_SERVICE_FIELDS, 0))
            for k in _SERVICE_FIELDS:
                acc[k] += getattr(p, k)
        return out

    def to_wire(self, seq: int, worker: int, active: int,
                endpoints: Callable[[str], dict[str, Any]] = lambda name: {}) -> dict[str, Any]:
        """`endpoints(name)` gives a service's per-endpoint report (the routing table's)."""
        services: dict[str, Any] = {}
        for name, counters in self.services().items():
            services[name] = {**counters, "endpoints": endpoints(name)}
        selections: dict[str, dict[str, int]] = {}
        for (dst, addr), n in self.selections.items():
            selections.setdefault(dst, {})[str(addr)] = n
        return {"t": "stats", "seq": seq, "worker": worker, "services": services,
                "pairs": [p.to_wire() for p in self.pairs.values()], "selections": selections,
                "unrouted": self.unrouted, "origdst_errors": self.origdst_errors,
                "active": active}
