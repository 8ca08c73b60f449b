"""Prometheus metrics of one agent: a prometheus-client collector over a `Snapshot`.

The agent builds a Snapshot in its event loop (worker counters summed, kernel, DNS, registry,
health and enrollment figures); the admin server's thread renders it at scrape time with
prometheus-client's exposition (text and OpenMetrics, by the scraper's Accept header).

Labels stay bounded: services (`src`, `dst`, `service`), endpoints of services, failure reasons
and kernel event names; never per-connection values or ephemeral ports. A client whose service
cannot be told is `src="unknown"`.

Room for L7: request-level metrics will use the same `src`/`dst` pair plus `status_class`
("2xx".."5xx") and their own `meshnode_request_*` names, so these connection-level series keep
their meaning when HTTP arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from meshnode.histogram import CONNECT_BUCKETS, DURATION_BUCKETS
from meshnode.telemetry.aggregate import Totals

__all__ = ["MeshCollector", "Snapshot"]

_PAIR = ["src", "dst"]


@dataclass(frozen=True)
class Snapshot:
    """Everything /metrics shows, taken at one instant in the agent's loop."""

    info: dict[str, str]  # version, node, instance, capture
    ready: bool
    totals: Totals
    kernel: dict[str, int]  # capture backend counters by event name (eBPF: per-CPU sums)
    dns: dict[str, int]  # the agent's DNS server counters
    registry: dict[str, Any]  # backend, connected, ...
    services: list[dict[str, Any]]  # name, endpoints: [{addr, healthy, checks, failed}]
    enrolled: dict[str, int]  # service → enrolled processes
    workers: list[dict[str, Any]]  # id, alive, restarts


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out, cum = [], 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        cum += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(cum)))
    return out


class MeshCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield from self._agent(s)
        yield from self._traffic(s.totals)
        yield from self._kernel(s)
        yield from self._discovery(s)

    @staticmethod
    def _agent(s: Snapshot) -> Iterator[Metric]:
        info = InfoMetricFamily("meshnode_agent", "The agent's version, node and capture backend.")
        info.add_metric([], s.info)
        yield info
        yield GaugeMetricFamily("meshnode_agent_ready",
                                "1 when every live worker has the routes and capture is on.",
                                value=1.0 if s.ready else 0.0)
        alive = GaugeMetricFamily("meshnode_worker_up", "1 for a live proxy worker.",
                                  labels=["worker"])
        restarts = CounterMetricFamily("meshnode_worker_restarts",
                                       "Proxy worker restarts.", labels=["worker"])
        for w in s.workers:
            alive.add_metric([str(w["id"])], 1.0 if w["alive"] else 0.0)
            restarts.add_metric([str(w["id"])], float(w["restarts"]))
        yield alive
        yield restarts

    @staticmethod
    def _traffic(t: Totals) -> Iterator[Metric]:
        opened = CounterMetricFamily("meshnode_connections_opened",
                                     "Connections accepted for a destination service.",
                                     labels=_PAIR)
        closed = CounterMetricFamily("meshnode_connections_closed",
                                     "Connections that ended.", labels=_PAIR)
        active = GaugeMetricFamily("meshnode_connections_active", "Connections open now.",
                                   labels=_PAIR)
        sent = CounterMetricFamily("meshnode_bytes",
                                   "Bytes relayed; direction up is client to endpoint, down "
                                   "is endpoint to client.", labels=[*_PAIR, "direction"])
        failures = CounterMetricFamily("meshnode_connect_failures",
                                       "Connections that never reached an endpoint, by reason "
                                       "(no_endpoint, refused, timeout, unreachable, error).",
                                       labels=[*_PAIR, "reason"])
        attempts = CounterMetricFamily("meshnode_connect_attempt_errors",
                                       "Failed upstream connect attempts, retried ones "
                                       "included.", labels=_PAIR)
        latency = HistogramMetricFamily("meshnode_connect_latency_seconds",
                                        "Upstream connect latency.", labels=_PAIR)
        duration = HistogramMetricFamily("meshnode_connection_duration_seconds",
                                         "Connection lifetime, accept to close.", labels=_PAIR)
        for (src, dst), p in sorted(t.pairs.items()):
            lv = [src, dst]
            opened.add_metric(lv, float(p.connections))
            closed.add_metric(lv, float(p.closed))
            active.add_metric(lv, float(p.active))
            sent.add_metric([*lv, "up"], float(p.bytes_up))
            sent.add_metric([*lv, "down"], float(p.bytes_down))
            for reason, n in sorted(p.failures.items()):
                failures.add_metric([*lv, reason], float(n))
            attempts.add_metric(lv, float(p.connect_errors))
            latency.add_metric(lv, _buckets(CONNECT_BUCKETS, p.connect), p.connect_sum)
            duration.add_metric(lv, _buckets(DURATION_BUCKETS, p.duration), p.duration_sum)
        yield from (opened, closed, active, sent, failures, attempts, latency, duration)
        picks = CounterMetricFamily("meshnode_endpoint_selections",
                                    "Connect attempts the balancer sent to an endpoint.",
                                    labels=["dst", "endpoint"])
        for (dst, addr), n in sorted(t.selections.items()):
            picks.add_metric([dst, addr], float(n))
        yield picks
        yield CounterMetricFamily("meshnode_passthrough_connections",
                                  "Captured connections to no mesh destination, sent on "
                                  "unchanged.", value=float(t.unrouted))
        yield CounterMetricFamily("meshnode_origdst_errors",
                                  "Connections refused: original destination unreadable.",
                                  value=float(t.origdst_errors))

    @staticmethod
    def _kernel(s: Snapshot) -> Iterator[Metric]:
        backend = s.info.get("capture", "")
        kernel = CounterMetricFamily(
            "meshnode_capture_events",
            "Capture decisions counted in the kernel (eBPF): captured connects, fail-open "
            "passes, fail-closed refusals, original-destination lookups, DNS redirects.",
            labels=["backend", "event"])
        for event, n in sorted(s.kernel.items()):
            kernel.add_metric([backend, event], float(n))
        yield kernel
        dns = CounterMetricFamily("meshnode_dns", "The agent's DNS server, by result.",
                                  labels=["result"])
        for result, n in sorted(s.dns.items()):
            dns.add_metric([result], float(n))
        yield dns

    @staticmethod
    def _discovery(s: Snapshot) -> Iterator[Metric]:
        reg = GaugeMetricFamily("meshnode_registry_connected",
                                "1 when the registry answers (etcd reachable).",
                                labels=["backend"])
        reg.add_metric([str(s.registry.get("backend", ""))],
                       1.0 if s.registry.get("connected") else 0.0)
        yield reg
        eps = GaugeMetricFamily("meshnode_service_endpoints",
                                "Endpoints of a service by health.", labels=["service", "health"])
        healthy = GaugeMetricFamily("meshnode_endpoint_healthy",
                                    "1 when the endpoint passes its health checks.",
                                    labels=["service", "endpoint"])
        checks = CounterMetricFamily("meshnode_health_checks",
                                     "Active health checks by result.",
                                     labels=["service", "endpoint", "result"])
        for svc in s.services:
            up = sum(1 for e in svc["endpoints"] if e["healthy"])
            eps.add_metric([svc["name"], "healthy"], float(up))
            eps.add_metric([svc["name"], "unhealthy"], float(len(svc["endpoints"]) - up))
            for e in svc["endpoints"]:
                lv = [svc["name"], e["addr"]]
                healthy.add_metric(lv, 1.0 if e["healthy"] else 0.0)
                checks.add_metric([*lv, "ok"], float(e["checks"] - e["failed"]))
                checks.add_metric([*lv, "failed"], float(e["failed"]))
        yield from (eps, healthy, checks)
        enrolled = GaugeMetricFamily("meshnode_enrolled_processes",
                                     "Processes enrolled on this host, by service.",
                                     labels=["service"])
        for name, n in sorted(s.enrolled.items()):
            enrolled.add_metric([name], float(n))
        yield enrolled
