"""Span export to a real OTLP/HTTP receiver (tests/otlp_receiver.py decodes the protobuf): a
trace's spans link across two hops with their attributes; a collector that is down or slow
never holds up a request, and what it costs is counted; close() flushes."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from meshnode.model import HostPort
from meshnode.proxy.http.exchange import RequestRecord
from meshnode.proxy.http.spans import SERVICE_NAME, SpanExport
from meshnode.proxy.http.trace import Tracer, otlp_url
from meshnode.wire import Tracing
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.timeout(60)

CLIENT = 3  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_CLIENT
UNSET, ERROR = 0, 2


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture
def tracers() -> Iterator[list[Tracer]]:
    made: list[Tracer] = []
    yield made
    for t in made:
        t.close(timeout=1.0)


def new_tracer(made: list[Tracer], endpoint: str, node: str, sampling: float = 1.0) -> Tracer:
    t = Tracer()
    made.append(t)
    t.configure(Tracing(otlp_endpoint=endpoint, sampling=sampling, node=node))
    return t


def request(src: str, dst: str, **kw: object) -> RequestRecord:
    now = time.monotonic()
    rec = RequestRecord(t0=now - 0.005, wall=time.time() - 0.005, src=src, dst=dst,
                        protocol="http/1.1", method="GET", path="/", t_end=now)
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def refused_port() -> int:
    """A 127.0.0.1 port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def export_threads() -> list[threading.Thread]:
    return [th for th in threading.enumerate() if th.name == "meshnode-spans"]


def join_export(export: SpanExport) -> None:
    """Wait for an export's thread to end (close() may return before an abandoned export)."""
    deadline = time.monotonic() + 10
    while export.alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_trace_links_across_two_hops(receiver: OtlpReceiver,
                                       tracers: list[Tracer]) -> None:
    # web -> (proxy on node-a) -> api, which calls -> (proxy on node-b) -> db, forwarding the
    # traceparent it got, as an instrumented app would with a child span of its own.
    hop1, hop2 = (new_tracer(tracers, receiver.endpoint, "node-a", 0.0),
                  new_tracer(tracers, receiver.endpoint, "node-b", 0.0))
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r1 = request("web", "api", path="/orders/7?token=secret", status=200, retries=1,
                 endpoint=HostPort(IPv4Address("198.19.0.2"), 8080), route="orders")
    to_api = hop1.start(r1, incoming, "congo=t61rcWkgMzE")
    r2 = request("api", "db", method="POST", path="/query", status=503, outcome="ok",
                 endpoint=HostPort(IPv4Address("198.19.0.3"), 5432))
    to_db = hop2.start(r2, to_api, "congo=t61rcWkgMzE")
    assert to_db.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    unsampled = request("web", "api")
    hop1.start(unsampled, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", None)
    for t, rec in ((hop1, r1), (hop2, r2), (hop1, unsampled)):
        t.finish(rec)

    spans = receiver.wait_for(lambda s: len(s) >= 2)  # the thread's own flush, no close()
    by_dst = {s.attributes["meshnode.dst"]: s for s in spans}
    a, b = by_dst["api"], by_dst["db"]
    assert a.trace_id == b.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert (a.span_id, a.parent_span_id) == (r1.span_id, "00f067aa0ba902b7")
    assert (b.span_id, b.parent_span_id) == (r2.span_id, r1.span_id)  # the link
    assert a.kind == b.kind == CLIENT
    assert a.name == "GET api" and b.name == "POST db"
    assert a.attributes == {
        "meshnode.src": "web", "meshnode.dst": "api", "meshnode.route": "orders",
        "meshnode.retries": 1, "meshnode.node": "node-a", "meshnode.outcome": "ok",
        "http.request.method": "GET", "url.path": "/orders/7",  # no query string
        "http.response.status_code": 200, "server.address": "198.19.0.2",
        "server.port": 8080, "network.protocol.name": "http",
        "network.protocol.version": "1.1",
    }
    assert (a.status_code, b.status_code, b.status_message) == (UNSET, ERROR, "status 503")
    assert a.resource["service.name"] == SERVICE_NAME and a.resource["host.name"] == "node-a"
    assert b.resource["host.name"] == "node-b"
    assert a.end_ns - a.start_ns == pytest.approx(5e6, rel=0.05)
    assert abs(a.start_ns / 1e9 - r1.wall) < 1e-3
    hop1.close()
    hop2.close()
    assert len(receiver.spans) == 2  # the unsampled request made no span
    assert hop1.counts()["exported"] == hop2.counts()["exported"] == 1


def test_grpc_and_failed_requests_are_error_spans(receiver: OtlpReceiver,
                                                  tracers: list[Tracer]) -> None:
    t = new_tracer(tracers, receiver.endpoint, "n1")
    recs = [
        request("web", "greeter", protocol="grpc", method="POST",
                path="/helloworld.Greeter/SayHello", status=200, grpc_status=14),
        request("web", "greeter", protocol="grpc", method="POST",
                path="/helloworld.Greeter/SayHello", status=200, grpc_status=0),
        request("web", "api", outcome="timeout"),  # status 0: the client got nothing
    ]
    for rec in recs:
        t.start(rec, None, None)
        t.finish(rec)
    t.close()  # flushes: everything is there when it returns
    got = {s.span_id: s for s in receiver.spans}
    unavailable, ok, timeout = (got[r.span_id] for r in recs)
    assert unavailable.name == "helloworld.Greeter/SayHello"
    assert unavailable.attributes["rpc.grpc.status_code"] == 14
    assert unavailable.attributes["rpc.system"] == "grpc"
    assert unavailable.attributes["network.protocol.version"] == "2"
    assert (unavailable.status_code, unavailable.status_message) == (ERROR, "UNAVAILABLE")
    assert ok.status_code == UNSET and ok.attributes["rpc.grpc.status_code"] == 0
    assert (timeout.status_code, timeout.status_message) == (ERROR, "timeout")
    assert "http.response.status_code" not in timeout.attributes
    assert "server.address" not in timeout.attributes
    assert all(s.parent_span_id == "" for s in receiver.spans)


def test_close_flushes_a_full_queue(receiver: OtlpReceiver) -> None:
    export = SpanExport(otlp_url(receiver.endpoint), "n1", interval=60.0)
    recs = [request("web", "api", trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}",
                    sampled=True) for i in range(1500)]
    for rec in recs:
        export.add(rec)
    export.close(timeout=10.0)
    assert not export.alive
    assert sorted(int(s.span_id, 16) for s in receiver.spans) == list(range(1, 1501))
    assert max(receiver.batches) <= 512 and sum(receiver.batches) == 1500
    c = export.counts
    assert (c.exported, c.dropped, c.unsent, c.failed) == (1500, 0, 0, 0)


def test_a_down_collector_never_holds_up_finish(tracers: list[Tracer],
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshnode.proxy.http.spans")
    t = new_tracer(tracers, f"127.0.0.1:{refused_port()}", "n1")
    recs = []
    for _ in range(10_000):
        rec = request("web", "api")
        t.start(rec, None, None)
        recs.append(rec)
    assert all(r.sampled for r in recs)
    t0 = time.perf_counter()
    for rec in recs:
        t.finish(rec)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.25, f"10,000 finish() took {elapsed:.3f} s"
    # the export thread tries, fails and counts; the queue stays bounded
    deadline = time.monotonic() + 20
    while t.counts()["errors"] < 1:
        assert time.monotonic() < deadline, t.counts()
        time.sleep(0.02)
    threads = export_threads()
    t0 = time.perf_counter()
    t.close(timeout=1.0)
    assert time.perf_counter() - t0 < 1.5  # bounded, whatever the collector does
    for th in threads:  # an export abandoned by close() ends soon after; then count
        th.join(5)
        assert not th.is_alive()
    c = t.counts()
    assert c["exported"] == 0 and c["failed"] >= 1 and c["dropped"] >= 10_000 - 2048 - 512
    assert c["exported"] + c["failed"] + c["dropped"] == 10_000  # every span accounted for
    warnings = [r for r in caplog.records if r.name == "meshnode.proxy.http.spans"]
    assert len(warnings) == 1 and "failed" in warnings[0].getMessage()


def test_failures_are_logged_once_and_recovery_is_noticed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with OtlpReceiver(status=503) as rx:
        export = SpanExport(otlp_url(rx.endpoint), "n1", interval=0.02, timeout=0.3)
        try:
            for i in range(3):
                export.add(request("web", "api", trace_id=f"{i + 1:032x}",
                                   span_id=f"{i + 1:016x}", sampled=True))
                deadline = time.monotonic() + 10
                while export.counts.errors < i + 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            failing = [r for r in caplog.records if r.name == "meshnode.proxy.http.spans"]
            otel = [r for r in caplog.records if r.name.startswith("opentelemetry")]
            assert len(failing) == 1  # three failed exports, one line
            assert otel and all(r.created <= failing[0].created for r in otel)
            rx.status = 200
            export.add(request("web", "api", trace_id="f" * 32, span_id="f" * 16,
                               sampled=True))
            spans = rx.wait_for(lambda s: len(s) == 1)
            assert spans[0].span_id == "f" * 16
        finally:
            export.close()
    assert (export.counts.exported, export.counts.failed, export.counts.errors) == (1, 3, 3)
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_a_slow_collector_is_abandoned_within_the_close_bound() -> None:
    with OtlpReceiver(delay=30.0) as rx:
        export = SpanExport(otlp_url(rx.endpoint), "n1", interval=0.02, timeout=5.0)
        t0 = time.perf_counter()
        for i in range(1000):
            export.add(request("web", "api", trace_id=f"{i + 1:032x}",
                               span_id=f"{i + 1:016x}", sampled=True))
        assert time.perf_counter() - t0 < 0.1  # the stuck export costs add() nothing
        rx.wait_until(lambda: rx.arrived >= 1)  # an export now waits on the collector
        t0 = time.perf_counter()
        export.close(timeout=0.5)
        assert time.perf_counter() - t0 < 1.0
    join_export(export)
    c = export.counts
    assert c.exported + c.failed + c.unsent + c.dropped == 1000
    assert c.unsent >= 1000 - 2 * 512  # what was still queued was dropped, not sent late


def test_reconfiguring_replaces_the_exporter(tracers: list[Tracer]) -> None:
    with OtlpReceiver() as first, OtlpReceiver() as second:
        t = new_tracer(tracers, first.endpoint, "n1")
        r1 = request("web", "api")
        t.start(r1, None, None)
        t.finish(r1)
        t.configure(Tracing(otlp_endpoint=second.endpoint, sampling=1.0, node="n1"))
        r2 = request("web", "api")
        t.start(r2, None, None)
        t.finish(r2)
        assert [s.span_id for s in first.wait_for(lambda s: len(s) == 1)] == [r1.span_id]
        assert [s.span_id for s in second.wait_for(lambda s: len(s) == 1)] == [r2.span_id]
        # the old export's thread flushed and ended on its own
        deadline = time.monotonic() + 5
        while len(export_threads()) > 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t.configure(Tracing(otlp_endpoint="", sampling=1.0, node="n1"))  # stop exporting
        r3 = request("web", "api")
        t.start(r3, None, None)
        t.finish(r3)
        deadline = time.monotonic() + 5
        while export_threads():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(first.spans) == len(second.spans) == 1
        assert t.counts()["exported"] == 2


def test_export_rate_is_capped_at_a_queue_per_interval(receiver: OtlpReceiver) -> None:
    """The export thread's CPU is bounded: after a full queue's worth it rests for the rest of
    the interval, and spans beyond the queue are dropped meanwhile (close() ends the rest)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    gate = threading.Event()  # holds the export thread until the queue is full

    def exporter(url: str, timeout: float) -> OTLPSpanExporter:
        gate.wait(10)
        return OTLPSpanExporter(endpoint=url, timeout=timeout)

    export = SpanExport(otlp_url(receiver.endpoint), "n1", queue=100, batch=50,
                        interval=60.0, exporter=exporter)
    ids = iter(range(1, 1000))

    def add(n: int) -> None:
        for _ in range(n):
            i = next(ids)
            export.add(request("web", "api", trace_id=f"{i:032x}", span_id=f"{i:016x}",
                               sampled=True))

    try:
        add(101)
        assert export.counts.dropped == 1
        gate.set()
        receiver.wait_for(lambda s: len(s) == 100)
        add(101)  # the thread rests: 100 wait, 1 more is dropped
        assert export.counts.dropped == 2
    finally:
        export.close(timeout=10.0)
    assert len(receiver.spans) == 200 and export.counts.exported == 200
