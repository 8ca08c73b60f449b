"""Prometheus metrics of one agent: a prometheus-client collector over a `Snapshot`.

The agent builds a Snapshot in its event loop (worker counters summed, kernel, DNS, registry,
health and enrollment figures); the admin server's thread renders it at scrape time with
prometheus-client's exposition (text and OpenMetrics, by the scraper's Accept header).

The traffic families (names, help, kinds, labels) come from the declared counter schema,
meshnode.counters; the agent, kernel, DNS and registry families are written out here.

Labels stay bounded: services (`src`, `dst`, `service`), endpoints of services, failure reasons
and kernel event names; never per-connection values or ephemeral ports. A client whose service
cannot be told is `src="unknown"`.

Requests (HTTP, HTTP/2 and gRPC ports) have their own families on the same `src`/`dst` pair:
`meshnode_requests_total` adds `route`, `method` and `status_class` ("1xx".."5xx", "none", or
the gRPC status name), and `meshnode_request_duration_seconds` is a pair histogram; the
connection-level series keep their meaning on those ports (they count the client connections).

Connections on the kernel path (no proxy: the connect hook balanced them) are in the same pair
families, told apart by `path` ("proxy" or "kernel"); their lifetime and RTT are summaries
(`meshnode_kernel_connection_{duration,rtt}_seconds`: the kernel sums, it keeps no buckets),
and their per-endpoint counts `meshnode_kernel_endpoint_*` (src, dst, endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from meshnode.counters import (
    ENDPOINT_FIELDS,
    FAILURES,
    KERNEL_FIELDS,
    KERNEL_PAIR_FIELDS,
    KERNEL_PATH,
    LABELLED_FIELDS,
    PAIR_FIELDS,
    PAIR_HISTOGRAMS,
    PROXY_PATH,
    SELECTIONS,
    WORKER_FIELDS,
    Field,
    LabelledField,
)
from meshnode.telemetry.aggregate import Totals

__all__ = ["MeshCollector", "Snapshot", "cert_expiry"]

_PAIR = ["src", "dst"]
_PATHS = ["src", "dst", "path"]


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
    # service -> {"accepted": n, "refused": n}: plaintext connections from other hosts to its
    # endpoints here (CaptureBackend.inbound_counts)
    inbound: dict[str, dict[str, int]] = field(default_factory=dict)
    # (identity, kind, seconds left) of every certificate this agent holds: kind is root,
    # issuer, node or workload (IdentityClient.expiries()); negative once expired
    certs: list[tuple[str, str, float]] = field(default_factory=list)


def _family(families: dict[str, Metric], f: Field | LabelledField,
            labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    """The family a schema field belongs to, made on first use (fields may share one)."""
    fam = families.get(f.family)
    if isinstance(fam, CounterMetricFamily | GaugeMetricFamily):
        return fam
    kind = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
    made = families[f.family] = kind(f.family, f.help, labels=labels)
    return made


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out, cum = [], 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        cum += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(cum)))
    return out


def cert_expiry(held: Iterable[tuple[str, str, float]]) -> GaugeMetricFamily:
    """`meshnode_cert_expiry_seconds{identity,kind}`: seconds until each certificate the agent
    holds expires (negative: expired). The classic mesh outage is an expired root or issuer:
    alert well before 0 (doctor warns at 30 days for roots and issuers)."""
    fam = GaugeMetricFamily("meshnode_cert_expiry_seconds",
                            "Seconds until a certificate this agent holds expires (negative: "
                            "expired), by identity and kind (root, issuer, node, workload).",
                            labels=["identity", "kind"])
    for identity, kind, left in sorted(held):
        fam.add_metric([identity, kind], float(left))
    return fam


class MeshCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield from self._agent(s)
        yield from self._traffic(s.totals)
        yield from self._kernel(s)
        yield from self._discovery(s)
        yield cert_expiry(s.certs)

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
        """Every family of the counter schema (meshnode.counters), in its declared order."""
        pairs = sorted(t.pairs.items())
        kernel = sorted(t.kernel.items())
        both = [(path, key, p) for path, rows in ((PROXY_PATH, pairs), (KERNEL_PATH, kernel))
                for key, p in rows]
        families: dict[str, Metric] = {}
        for f in PAIR_FIELDS:
            fam = _family(families, f, [*_PATHS, *(k for k, _ in f.labels)])
            for path, (src, dst), p in both:
                fam.add_metric([src, dst, path, *(v for _, v in f.labels)], p[f.name] * f.scale)
        failures = _family(families, FAILURES, [*_PATHS, "reason"])
        for path, (src, dst), p in both:
            for reason, n in sorted(p.failures.items()):
                failures.add_metric([src, dst, path, reason], float(n))
        for f in KERNEL_PAIR_FIELDS:
            if not f.family:
                continue
            summary = SummaryMetricFamily(f.family, f.help, labels=_PAIR)
            for (src, dst), p in kernel:
                summary.add_metric([src, dst], p["kernel_closed"], p[f.name] * f.scale)
            families[f.family] = summary
        for h in PAIR_HISTOGRAMS:
            hist = HistogramMetricFamily(h.family, h.help, labels=_PAIR)
            for (src, dst), p in pairs:
                totals = p.histograms[h.name]
                if not any(totals.counts):
                    # nothing observed yet (a tcp port's pair has no request latency); the
                    # counts only grow, so a pair's series never goes away once shown
                    continue
                hist.add_metric([src, dst], _buckets(h.bounds, totals.counts), totals.sum)
            families[h.family] = hist
        endpoints = sorted(t.endpoints.items())
        for f in ENDPOINT_FIELDS:
            fam = _family(families, f, ["dst", "endpoint"])
            for (dst, addr), figures in endpoints:
                if f.name in figures:
                    fam.add_metric([dst, addr], figures[f.name] * f.scale)
        picks = _family(families, SELECTIONS, ["dst", "endpoint"])
        for (dst, addr), n in sorted(t.selections.items()):
            picks.add_metric([dst, addr], float(n))
        for f in WORKER_FIELDS:
            if f.family:
                _family(families, f, []).add_metric([], t.values.get(f.name, 0) * f.scale)
        for lf in (*LABELLED_FIELDS, *KERNEL_FIELDS):
            fam = _family(families, lf, [*lf.labels, *(k for k, _ in lf.const)])
            for labels, n in sorted(t.labelled.get(lf.name, {}).items()):
                fam.add_metric([*labels, *(v for _, v in lf.const)], float(n))
        yield from families.values()

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
        inbound = CounterMetricFamily(
            "meshnode_inbound_plaintext",
            "Plaintext TCP connections from other hosts to this host's endpoints, by the "
            "service's mTLS mode: accepted (PERMISSIVE) or refused with a reset (STRICT).",
            labels=["service", "verdict"])
        for service, counts in sorted(s.inbound.items()):
            for verdict in ("accepted", "refused"):
                inbound.add_metric([service, verdict], float(counts.get(verdict, 0)))
        yield inbound
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
        rev = GaugeMetricFamily(
            "meshnode_registry_revision",
            "The registry's revision: as this agent holds it (held), and as its workers and "
            "kernel run it (applied). A rollout has reached this host when applied catches up.",
            labels=["state"])
        rev.add_metric(["held"], float(s.registry.get("revision") or 0))
        rev.add_metric(["applied"], float(s.registry.get("applied_revision") or 0))
        yield rev
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
