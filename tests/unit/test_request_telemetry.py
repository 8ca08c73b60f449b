"""Request telemetry on the agent side: the request rows workers send (counters.REQUEST_FIELDS,
the `request` pair histogram) as /metrics, `stat`, `top` and the dashboard's overview show them,
the one success rule, request tap events, and the Tracing message workers get."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from ipaddress import IPv4Address
from types import SimpleNamespace
from typing import Any

import pytest
from meshnode.cli.observe import stat_text, tap_line, top_text
from prometheus_client import CollectorRegistry, generate_latest

from meshnode.agent.mesh_security import MeshSecurity
from meshnode.agent.observe import Tap, Telemetry, failed
from meshnode.config import AgentConfig
from meshnode.counters import request_succeeded
from meshnode.model import HostPort
from meshnode.policy.records import EndpointRecord, ServiceRecord
from meshnode.policy.resources import (
    MESH_NAME,
    MeshSpec,
    MeshTracing,
    PortSpec,
    Resource,
    ServicePolicy,
)
from meshnode.proxy.http.exchange import RequestRecord, request_record
from meshnode.proxy.stats import WorkerStats
from meshnode.telemetry.aggregate import Accumulator, Totals
from meshnode.telemetry.metrics import MeshCollector, Snapshot
from meshnode.wire import Identities, StatsReply, Tracing, encode, worker_codec

pytestmark = pytest.mark.timeout(10)


def through_wire(stats: WorkerStats, worker: int = 0, pid: int = 100) -> StatsReply:
    reply = worker_codec().decode(encode(stats.to_wire(1, worker, pid, 0)))
    assert isinstance(reply, StatsReply)
    return reply


def traffic(stats: WorkerStats, scale: int = 1) -> None:
    """web -> api (http): 10 requests, 8 successes (a 5xx and a timeout fail, 4xx does not),
    3 retries, 1 refused by the budget, every request 4 ms; web -> greet (grpc): 3 OK and one
    UNAVAILABLE at 20 ms; web -> db (tcp): 5 connections."""
    for _ in range(scale):
        for _ in range(6):
            stats.request("web", "api", "default", "GET", "2xx", 0.004)
        stats.request("web", "api", "default", "GET", "5xx", 0.004)
        for _ in range(2):
            stats.request("web", "api", "login", "POST", "4xx", 0.004)
        stats.request("web", "api", "login", "POST", "none", 0.004)
        stats.count("request_failures", "web", "api", "login", "timeout")
        stats.add("request_retries", 3, "web", "api", "default")
        stats.count("retry_budget_exhausted", "web", "api", "default")
        stats.add("protocol_detections", 4, "api", "http1")
        for _ in range(3):
            stats.request("web", "greet", "default", "POST", "OK", 0.02)
        stats.request("web", "greet", "default", "POST", "UNAVAILABLE", 0.02)
    api = stats.pair("web", "api")
    api.connections = api.active = 2  # keep-alive: two connections carry every request
    greet = stats.pair("web", "greet")
    greet.connections = greet.active = 1
    db = stats.pair("web", "db")
    db.connections = db.closed = 5 * scale
    for _ in range(5 * scale):
        db.connect.observe(0.001)


# -- the success rule ----------------------------------------------------------------------
@pytest.mark.parametrize(("status_class", "ok"), [
    ("1xx", True), ("2xx", True), ("3xx", True), ("4xx", True), ("5xx", False),
    ("none", False), ("OK", True), ("UNAVAILABLE", False), ("NOT_FOUND", False),
    ("DEADLINE_EXCEEDED", False), ("UNKNOWN", False)])
def test_success_is_any_answer_but_5xx_and_grpc_ok_only(status_class: str, ok: bool) -> None:
    assert request_succeeded(status_class) is ok


# -- /metrics --------------------------------------------------------------------------------
def exposition(totals: Totals) -> list[str]:
    snap = Snapshot(info={"version": "0", "node": "n1", "instance": "default",
                          "capture": "ebpf"}, ready=True, totals=totals, kernel={}, dns={},
                    registry={"backend": "embedded", "connected": True}, services=[],
                    enrolled={}, workers=[])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(lambda: snap))
    return generate_latest(registry).decode().splitlines()


def test_metrics_show_every_request_family_with_exact_values() -> None:
    stats = WorkerStats()
    traffic(stats)
    lines = exposition(Accumulator().update([through_wire(stats)]))
    for want in [  # prometheus-client writes the labels in name order
        'meshnode_requests_total{dst="api",method="GET",route="default",src="web",'
        'status_class="2xx"} 6.0',
        'meshnode_requests_total{dst="api",method="GET",route="default",src="web",'
        'status_class="5xx"} 1.0',
        'meshnode_requests_total{dst="api",method="POST",route="login",src="web",'
        'status_class="4xx"} 2.0',
        'meshnode_requests_total{dst="api",method="POST",route="login",src="web",'
        'status_class="none"} 1.0',
        'meshnode_requests_total{dst="greet",method="POST",route="default",src="web",'
        'status_class="OK"} 3.0',
        'meshnode_requests_total{dst="greet",method="POST",route="default",src="web",'
        'status_class="UNAVAILABLE"} 1.0',
        'meshnode_request_retries_total{dst="api",route="default",src="web"} 3.0',
        'meshnode_retry_budget_exhausted_total{dst="api",route="default",src="web"} 1.0',
        'meshnode_request_failures_total{dst="api",reason="timeout",route="login",src="web"} '
        '1.0',
        'meshnode_protocol_detections_total{dst="api",result="http1"} 4.0',
        'meshnode_request_duration_seconds_bucket{dst="api",le="0.0025",src="web"} 0.0',
        'meshnode_request_duration_seconds_bucket{dst="api",le="0.005",src="web"} 10.0',
        'meshnode_request_duration_seconds_bucket{dst="api",le="+Inf",src="web"} 10.0',
        'meshnode_request_duration_seconds_count{dst="api",src="web"} 10.0',
        'meshnode_request_duration_seconds_count{dst="greet",src="web"} 4.0',
        '# TYPE meshnode_request_duration_seconds histogram',
    ]:
        assert want in lines, want
    # a tcp pair has connection series and no request latency series
    assert 'meshnode_connections_opened_total{dst="db",path="proxy",src="web"} 5.0' in lines
    assert not [x for x in lines if x.startswith("meshnode_request_duration_seconds")
                and 'dst="db"' in x]


def test_request_counters_never_fall_back_when_a_worker_restarts() -> None:
    acc = Accumulator()
    first = WorkerStats()
    traffic(first)
    acc.update([through_wire(first, pid=100)])
    again = WorkerStats()  # the same worker id, restarted: its counters start from zero
    again.request("web", "api", "default", "GET", "2xx", 0.004)
    totals = acc.update([through_wire(again, pid=200)])
    assert totals.labelled["requests"][("web", "api", "default", "GET", "2xx")] == 7
    assert totals.labelled["request_retries"][("web", "api", "default")] == 3
    assert sum(totals.pair("web", "api").histograms["request"].counts) == 11


# -- stat, top and the overview, through the agent's telemetry -------------------------------
def record(name: str, sid: int, policy: ServicePolicy) -> ServiceRecord:
    return ServiceRecord(name, sid, IPv4Address(f"127.240.0.{sid}"), policy,
                         endpoints=frozenset({EndpointRecord(HostPort.parse(
                             f"127.0.0.1:{8000 + sid}"), "static", node="n1")}))


SERVICES = {
    "api": record("api", 1, ServicePolicy(port=80, protocol="http")),
    "db": record("db", 2, ServicePolicy(port=5432)),
    "greet": record("greet", 3, ServicePolicy(port=50051, protocol="grpc")),
    # an auto port is handled per request when it speaks HTTP: shown with (zero) requests
    "idle": record("idle", 4, ServicePolicy(port=81, ports=(PortSpec(81, "auto"),))),
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def agent_telemetry(answers: Callable[[], list[StatsReply]],
                    resources: dict[tuple[str, str], Any] | None = None
                    ) -> tuple[Telemetry, Clock]:
    """`resources`: the registry's (Route resources mark the dashboard's services)."""
    clock = Clock()
    tel = Telemetry(AgentConfig(), clock=clock, monotonic=clock)

    async def stats() -> list[StatsReply]:
        return answers()

    parts = SimpleNamespace(
        workers=SimpleNamespace(stats=stats),
        registry=SimpleNamespace(services=lambda: SERVICES, resources=lambda: resources or {}),
        health=SimpleNamespace(healthy=lambda name, addr: True),
        node="n1", cfg=AgentConfig(), capture=SimpleNamespace(name="ebpf"),
        ready=lambda: True, enrollments=SimpleNamespace(describe=lambda: []))
    tel.attach(parts)  # type: ignore[arg-type]
    return tel, clock


def figures_after_10s() -> Telemetry:
    stats = WorkerStats()
    traffic(stats)
    tel, clock = agent_telemetry(lambda: [through_wire(stats)])
    clock.now = 10.0  # the history's zero seed is at 0: a 10 s span
    return tel


def test_stat_rows_have_request_figures_for_http_services_only() -> None:
    r = asyncio.run(figures_after_10s().stat(60.0, None))
    assert r["span"] == 10.0
    rows = {row["service"]: row for row in r["services"]}
    assert rows["api"]["l7"] and rows["greet"]["l7"] and rows["idle"]["l7"]
    assert not rows["db"]["l7"] and rows["db"]["requests"] is None
    assert rows["api"]["requests"] == {
        "requests": 10, "succeeded": 8, "rate": 1.0, "success_rate": 0.8, "retries": 3,
        "retry_rate": 0.3, "budget_exhausted": 1, "failures": {"timeout": 1},
        # every request took 4 ms: (2.5, 5] ms, interpolated
        "p50_ms": 3.75, "p95_ms": 4.875, "p99_ms": 4.975}
    assert rows["greet"]["requests"]["success_rate"] == 0.75
    assert rows["greet"]["requests"]["rate"] == 0.4
    assert rows["idle"]["requests"] == {
        "requests": 0, "succeeded": 0, "rate": 0.0, "success_rate": None, "retries": 0,
        "retry_rate": 0.0, "budget_exhausted": 0, "failures": {}, "p50_ms": None,
        "p95_ms": None, "p99_ms": None}
    # connection figures stay, for every service
    assert (rows["api"]["active"], rows["db"]["connections"], rows["db"]["rate"]) == (2, 5, 0.5)
    assert [(x["route"], x["requests"], x["success_rate"], x["retries"], x["p50_ms"])
            for x in rows["api"]["routes"]] == [("default", 7, 0.8571, 3, None),
                                                ("login", 3, 0.6667, 0, None)]
    assert rows["db"]["routes"] == []


def test_stat_table_shows_requests_for_http_and_connections_for_tcp() -> None:
    text = stat_text(asyncio.run(figures_after_10s().stat(60.0, None)))
    assert text.splitlines() == [
        "window 60s (only 10s of data so far); latency: per request (RPS rows), to connect "
        "(CONN/S rows)",
        "SERVICE  VIP                HEALTHY  RPS  SUCCESS  P50      P95      P99      RETRY/S  "
        "ACTIVE",
        "api      127.240.0.1:80     1/1      1.0  80.00%   3.75ms   4.88ms   4.97ms   0.3      2",
        "greet    127.240.0.3:50051  1/1      0.4  75.00%   17.50ms  24.25ms  24.85ms  0.0      1",
        "idle     127.240.0.4:81     1/1      0.0  -        -        -        -        0.0      0",
        "",
        "SERVICE  VIP               HEALTHY  CONN/S  ACTIVE  THROUGHPUT  ERRORS  P50     P95     "
        "P99",
        "db       127.240.0.2:5432  1/1      0.5     0       0B/s        0.0%    0.75ms  0.97ms  "
        "0.99ms",
    ]


def test_stat_of_one_http_service_breaks_it_down_by_route() -> None:
    text = stat_text(asyncio.run(figures_after_10s().stat(60.0, "api")))
    assert text.splitlines()[-3:] == [
        "ROUTE    RPS  SUCCESS  RETRY/S  BUDGET_OUT  FAILURES",
        "default  0.7  85.71%   0.3      1           -",
        "login    0.3  66.67%   0.0      0           timeout 1",
    ]


def test_top_ranks_http_pairs_by_request_rate() -> None:
    r = asyncio.run(figures_after_10s().top(60.0, 10))
    assert [(p["src"], p["dst"], p["l7"]) for p in r["pairs"]] == [
        ("web", "api", True), ("web", "db", False), ("web", "greet", True)]
    assert r["pairs"][0]["requests"]["success_rate"] == 0.8
    lines = top_text(r).splitlines()[1:]
    assert lines[0].split() == ["SOURCE", "DESTINATION", "RPS", "SUCCESS", "P50", "P95", "P99",
                                "RETRY/S", "ACTIVE"]
    assert lines[1].split() == ["web", "api", "1.0", "80.00%", "3.75ms", "4.88ms", "4.97ms",
                                "0.3", "2"]
    assert lines[2].split() == ["web", "greet", "0.4", "75.00%", "17.50ms", "24.25ms",
                                "24.85ms", "0.0", "1"]
    assert lines[4].split()[:4] == ["SOURCE", "DESTINATION", "CONN/S", "ACTIVE"]
    assert lines[5].split()[:3] == ["web", "db", "0.5"]


def test_overview_gives_the_dashboard_requests_per_service_edge_and_slice() -> None:
    stats = WorkerStats()
    tel, clock = agent_telemetry(lambda: [through_wire(stats)])
    traffic(stats)
    clock.now = 5.0
    asyncio.run(tel.sample())
    traffic(stats)  # the same again in the next 5 s; the overview samples at 10 s
    clock.now = 10.0
    view = asyncio.run(tel.overview(10.0))
    services = {s["name"]: s for s in view["services"]}
    assert services["api"]["l7"] and services["api"]["requests"]["rate"] == 2.0
    assert services["db"]["requests"] is None and not services["db"]["l7"]
    edges = {(e["src"], e["dst"]): e for e in view["edges"]}
    assert edges[("web", "api")]["requests"]["success_rate"] == 0.8
    assert edges[("web", "db")]["requests"] is None
    api = view["series"]["api"]
    assert api["t"] == [5.0, 10.0] and api["requests"] == [2.0, 2.0]
    assert api["success_rate"] == [0.8, 0.8] and api["request_p50_ms"] == [3.75, 3.75]
    assert view["series"]["db"]["requests"] == [None, None]


# -- tap -----------------------------------------------------------------------------------
def request_event(**fields: Any) -> dict[str, Any]:
    rec = RequestRecord(t0=100.0, wall=1_764_000_000.25, src="web", dst="api",
                        protocol="http/1.1", method="GET", path="/users/7", status=200,
                        endpoint=HostPort.parse("127.0.0.1:8001"), attempts=2, retries=1,
                        t_end=100.0123)
    for k, v in fields.items():
        setattr(rec, k, v)
    return {"t": "event", "event": "request", **request_record(rec, 0)}


def test_tap_prints_a_request_as_it_finishes() -> None:
    assert tap_line(request_event()) == (
        "16:00:00.250 req   web -> api GET /users/7 200 12.30ms via 127.0.0.1:8001 retries 1")
    grpc = request_event(protocol="grpc", method="POST", path="/greet.Greeter/Hello",
                         grpc_status=14, retries=0)
    assert tap_line(grpc) == ("16:00:00.250 req   web -> api POST /greet.Greeter/Hello "
                              "UNAVAILABLE 12.30ms via 127.0.0.1:8001")
    lost = request_event(status=0, endpoint=None, outcome="timeout", retries=0)
    assert tap_line(lost) == "16:00:00.250 req   web -> api GET /users/7 - 12.30ms via - timeout"


def test_tap_failed_takes_failed_requests_by_the_success_rule() -> None:
    tap = Tap(frozenset({"api"}), None, None, failed_only=True)
    assert not tap.matches(request_event())
    assert not tap.matches(request_event(status=404))
    assert tap.matches(request_event(status=503))
    assert tap.matches(request_event(status=0, outcome="timeout"))
    assert tap.matches(request_event(protocol="grpc", grpc_status=14))
    assert not tap.matches(request_event(protocol="grpc", grpc_status=0))
    assert failed({"event": "close", "outcome": "reset"})
    assert not failed({"event": "close", "outcome": "idle_timeout"})


# -- Tracing to the workers ------------------------------------------------------------------
class Registry:
    def __init__(self) -> None:
        self.stored: dict[tuple[str, str], Resource] = {}

    def resources(self) -> dict[tuple[str, str], Resource]:
        return self.stored

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {}


def test_workers_get_the_mesh_tracing_on_start_and_when_it_changes() -> None:
    reg = Registry()
    sec = MeshSecurity(reg, lambda: Identities(), "n1")  # type: ignore[arg-type]
    assert Tracing("", 0.01, "n1") in sec.all()  # a new or adopted worker: the defaults
    assert Tracing("", 0.01, "n1") in sec.changes()
    assert sec.changes() == []  # nothing moved: nothing sent
    spec = MeshSpec(tracing=MeshTracing(otlp_endpoint="127.0.0.1:4318", sampling=0.5))
    reg.stored[("Mesh", MESH_NAME)] = Resource("Mesh", MESH_NAME, spec, 2)
    assert sec.changes() == [Tracing("127.0.0.1:4318", 0.5, "n1")]
    assert Tracing("127.0.0.1:4318", 0.5, "n1") in sec.all()
