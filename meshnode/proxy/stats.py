"""Per-service and per-worker counters, and their wire form for the agent's `stats` request.

Counters are cumulative since the worker started; `active` values are gauges. Plain integer
attributes on slotted objects: the relay bumps byte counters once per read, so this stays a
single attribute add (no dict lookups, no locks: a worker is one thread).

Semantics (what the agent and `meshnode stats` show):
  connections     accepted connections routed to the service (VIP or endpoint address),
                  including those that then found no endpoint or failed every connect
  active          of those, the ones still open (client side not yet closed)
  bytes_up        client → upstream bytes relayed
  bytes_down      upstream → client bytes relayed
  connect_errors  failed or timed-out upstream connect attempts (one connection may add several)
  no_endpoint     connections refused because the service had no endpoint for the port
  endpoints       per current endpoint of the service, from its balancer's load records:
                  {ADDR: {"active": open connections and connect attempts to it through this
                  worker, "connections": successful connects, "connect_errors": failed connect
                  attempts, "ewma_ms": peak-EWMA connect latency in ms (balance/ewma.py),
                  "ejected_for": seconds left of its outlier ejection, 0 if not ejected}};
                  these go away with the endpoint (unlike the service counters)
Worker-wide: `unrouted` connections passed straight to their original destination,
`origdst_errors` connections refused because their original destination was unreadable or was
the proxy itself, `active` every open client connection.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ServiceStats", "WorkerStats"]


class ServiceStats:
    __slots__ = ("active", "bytes_down", "bytes_up", "connect_errors", "connections",
                 "no_endpoint")

    def __init__(self) -> None:
        self.connections = 0
        self.active = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.connect_errors = 0
        self.no_endpoint = 0

    def to_wire(self) -> dict[str, int]:
        return {"connections": self.connections, "active": self.active,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "connect_errors": self.connect_errors, "no_endpoint": self.no_endpoint}


class WorkerStats:
    """All counters of one worker. Services keep their counters after they go away, so the
    agent's sums never run backwards."""

    __slots__ = ("origdst_errors", "passthrough", "services", "unrouted")

    def __init__(self) -> None:
        self.services: dict[str, ServiceStats] = {}
        self.unrouted = 0
        self.origdst_errors = 0
        # Unrouted connections' bytes land here: the relay always has a sink to count into,
        # and the wire form reports only the connection count.
        self.passthrough = ServiceStats()

    def service(self, name: str) -> ServiceStats:
        s = self.services.get(name)
        if s is None:
            s = self.services[name] = ServiceStats()
        return s

    def to_wire(self, seq: int, worker: int, active: int,
                endpoints: Callable[[str], dict[str, Any]] = lambda name: {}) -> dict[str, Any]:
        """`endpoints(name)` gives a service's per-endpoint report (the routing table's)."""
        services: dict[str, Any] = {}
        for name, s in self.services.items():
            wire: dict[str, Any] = s.to_wire()
            wire["endpoints"] = endpoints(name)
            services[name] = wire
        return {"t": "stats", "seq": seq, "worker": worker, "services": services,
                "unrouted": self.unrouted, "origdst_errors": self.origdst_errors,
                "active": active}
