"""Telemetry arithmetic: histograms and percentiles, summing workers monotonically across
restarts, window figures, the Prometheus exposition and the access log writer."""

from __future__ import annotations

import asyncio
import json
import random
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.counters import ENDPOINT_FIELDS, PAIR_FIELDS, PAIR_HISTOGRAMS, WORKER_FIELDS
from meshnode.histogram import CONNECT_BUCKETS, Histogram, quantile
from meshnode.model import HostPort, OrigDstAddr
from meshnode.proxy.accesslog import FLUSH_INTERVAL, AccessLog
from meshnode.proxy.stats import PairStats, WorkerStats
from meshnode.proxy.telemetry import ConnInfo
from meshnode.telemetry.aggregate import Accumulator, Totals
from meshnode.telemetry.history import History
from meshnode.telemetry.metrics import MeshCollector, Snapshot
from meshnode.wire import StatsReply, encode, worker_codec

pytestmark = pytest.mark.timeout(10)


def test_quantile_interpolates_inside_the_bucket() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.5, 1.5, 1.5, 3.0):
        h.observe(v)
    assert h.counts == [1, 2, 1, 0] and h.sum == 6.5
    assert quantile(0.25, h.bounds, h.counts) == 1.0  # rank 1: the top of the first bucket
    assert quantile(0.5, h.bounds, h.counts) == 1.5  # rank 2: halfway through (1, 2]
    assert quantile(1.0, h.bounds, h.counts) == 4.0
    assert quantile(0.5, h.bounds, [0, 0, 0, 0]) is None
    assert quantile(0.99, h.bounds, [0, 0, 0, 5]) == 4.0  # +Inf: the last finite bound


def worker_answer(worker: int, pid: int, connections: int, active: int = 0,
                  bytes_up: int = 0, latency: float = 0.001) -> StatsReply:
    """A worker's stats reply, through the wire as the agent receives it."""
    stats = WorkerStats()
    p = stats.pair("web", "api")
    p.connections, p.active, p.closed, p.bytes_up = connections, active, connections - active, \
        bytes_up
    for _ in range(connections):
        p.connect.observe(latency)
    if connections:
        p.fail("refused")
    endpoints = {"127.0.0.1:1": {"active": active, "connections": connections,
                                 "connect_errors": 1, "ewma_ms": 1.5, "ejected_for": 0.0}}
    reply = stats.to_wire(1, worker, pid, active, lambda name: endpoints)
    decoded = worker_codec().decode(encode(reply))
    assert isinstance(decoded, StatsReply)
    return decoded


def test_totals_stay_monotonic_when_a_worker_restarts() -> None:
    acc = Accumulator()
    t = acc.update([worker_answer(0, 100, 10, active=2), worker_answer(1, 101, 5)])
    assert t.pair("web", "api")["connections"] == 15 and t.pair("web", "api")["active"] == 2
    # worker 0 died: while it is down its counts stay (its gauge goes)
    t = acc.update([worker_answer(1, 101, 6)])
    assert t.pair("web", "api")["connections"] == 16 and t.pair("web", "api")["active"] == 0
    # it is back with a new pid and fresh counters: the old ones are retired, not lost
    t = acc.update([worker_answer(0, 200, 1), worker_answer(1, 101, 6)])
    p = t.pair("web", "api")
    assert (p["connections"], p.failures["refused"], sum(p.histograms["connect"].counts)) == \
        (17, 3, 17)
    # what `meshnode status` shows is the same monotonic sum: per service and per endpoint
    # (counters keep the retired process's counts, the gauge only the live workers')
    api = t.by_service()["api"]
    assert api["connections"] == 17 and api["failures"] == {"refused": 3}
    assert api["endpoints"]["127.0.0.1:1"] == {"active": 0, "connections": 17,
                                               "connect_errors": 3, "ewma_ms": 1.5,
                                               "ejected_for": 0.0}


def test_window_figures_are_deltas_over_time() -> None:
    hist = History(start=0.0)
    acc = Accumulator()
    hist.add(10.0, acc.update([worker_answer(0, 1, 10, bytes_up=1000)]))
    hist.add(20.0, acc.update([worker_answer(0, 1, 30, active=1, bytes_up=5000,
                                             latency=0.02)]))
    f = hist.by_service(window=10.0)["api"]
    assert (f.connections, f.active, f.rate, f.bytes_up_rate) == (20, 1, 2.0, 400.0)
    assert f.failed == 0 and f.error_rate == 0.0  # the one failure was before the window
    # every connection in the window took 20 ms: the (10, 25] ms bucket holds the percentiles
    assert f.p50_ms is not None and 10.0 < f.p50_ms <= 25.0
    whole = hist.by_service(window=60.0)["api"]  # longer than kept: since the start
    assert whole.connections == 30 and whole.rate == 1.5 and whole.failed == 1
    series = hist.series("api", step=5.0, span=300.0)
    assert series["t"] == [10.0, 20.0] and series["rate"] == [1.0, 2.0]
    # a read soon after a sample replaces it: the history stays about one sample a second
    hist.add(20.3, acc.update([worker_answer(0, 1, 33)]), replace_latest=True)
    assert hist.series("api")["t"] == [10.0, 20.3]
    assert hist.by_service(window=10.0)["api"].connections == 23


def snapshot(totals: Totals) -> Snapshot:
    return Snapshot(info={"version": "0", "node": "n1", "instance": "default",
                          "capture": "ebpf"},
                    ready=True, totals=totals, kernel={"captured": 7}, dns={"answers": 2},
                    registry={"backend": "embedded", "connected": True},
                    services=[{"name": "api", "endpoints": [
                        {"addr": "127.0.0.1:1", "healthy": True, "checks": 4, "failed": 1},
                        {"addr": "127.0.0.1:2", "healthy": False, "checks": 4, "failed": 4}]}],
                    enrolled={"web": 1}, workers=[{"id": 0, "alive": True, "restarts": 2}])


def test_exposition_has_bounded_labels_and_the_right_values() -> None:
    totals = Accumulator().update([worker_answer(0, 1, 4, active=1, bytes_up=40)])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(lambda: snapshot(totals)))
    text = generate_latest(registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    pair = (("dst", "api"), ("src", "web"))
    proxied = (*pair[:1], ("path", "proxy"), pair[1])  # connection series carry the path
    assert samples[("meshnode_connections_opened_total", proxied)] == 4
    assert samples[("meshnode_connections_active", proxied)] == 1
    assert samples[("meshnode_bytes_total", (("direction", "up"), *proxied))] == 40
    assert samples[("meshnode_connect_failures_total", (*proxied[:2], ("reason", "refused"),
                                                         pair[1]))] == 1
    assert samples[("meshnode_connect_latency_seconds_count", pair)] == 4
    assert samples[("meshnode_connect_latency_seconds_bucket", (*pair[:1], ("le", "+Inf"),
                                                                pair[1]))] == 4
    assert samples[("meshnode_capture_events_total", (("backend", "ebpf"),
                                                      ("event", "captured")))] == 7
    assert samples[("meshnode_service_endpoints", (("health", "unhealthy"),
                                                   ("service", "api")))] == 1
    assert samples[("meshnode_health_checks_total", (("endpoint", "127.0.0.1:1"),
                                                     ("result", "ok"), ("service", "api")))] == 3
    assert samples[("meshnode_worker_restarts_total", (("worker", "0"),))] == 2
    ep = (("dst", "api"), ("endpoint", "127.0.0.1:1"))
    assert samples[("meshnode_endpoint_connections_total", ep)] == 4
    assert samples[("meshnode_endpoint_connect_ewma_seconds", ep)] == 0.0015
    labels = {k for (_, lv) in samples for k, _ in lv}
    assert labels <= {"src", "dst", "direction", "reason", "le", "endpoint", "service",
                      "health", "result", "backend", "event", "worker", "version", "node",
                      "instance", "capture", "state", "path"}
    buckets = [k for k in samples if k[0] == "meshnode_connect_latency_seconds_bucket"]
    assert len(buckets) == len(CONNECT_BUCKETS) + 1  # and +Inf


def test_pair_counters_feed_the_status_view() -> None:
    stats = WorkerStats()
    a, b = stats.pair("web", "api"), stats.pair("unknown", "api")
    a.connections, b.connections, b.bytes_down = 2, 3, 9
    b.fail("no_endpoint")
    totals = Accumulator().update([stats.to_wire(1, 0, 10, 0)])
    assert totals.by_service()["api"] == {"connections": 5, "active": 0, "closed": 0,
                                          "bytes_up": 0, "bytes_down": 9, "connect_errors": 0,
                                          "failures": {"no_endpoint": 1}, "endpoints": {}}
    assert isinstance(stats.passthrough, PairStats)


def test_the_schema_names_every_worker_counter() -> None:
    """counters.PAIR_FIELDS are exactly PairStats' integer counters, so a counter the worker
    keeps cannot miss the agent's sums, status and /metrics (nor can the schema name one the
    worker never counts)."""
    p = PairStats("a", "b")
    ints = {name for name in PairStats.__slots__ if type(getattr(p, name)) is int}
    assert ints == {f.name for f in PAIR_FIELDS}
    assert {h.name for h in PAIR_HISTOGRAMS} == {
        name for name in PairStats.__slots__ if isinstance(getattr(p, name), Histogram)}
    # fields sharing a Prometheus family agree on its kind and help
    families: dict[str, tuple[str, str]] = {}
    for f in (*PAIR_FIELDS, *ENDPOINT_FIELDS, *WORKER_FIELDS):
        if f.family:
            assert families.setdefault(f.family, (f.kind, f.help)) == (f.kind, f.help), f


def test_status_counters_never_fall_back_after_a_worker_restart() -> None:
    """The sum behind `meshnode status` is the Accumulator's: a restarted worker's fresh
    zeroes do not pull the service's counters back."""
    acc = Accumulator()
    before = acc.update([worker_answer(0, 100, 10), worker_answer(1, 101, 5)])
    after = acc.update([worker_answer(0, 300, 0), worker_answer(1, 101, 5)])
    assert before.by_service()["api"]["connections"] == 15
    assert after.by_service()["api"]["connections"] == 15
    assert after.by_service()["api"]["endpoints"]["127.0.0.1:1"]["connections"] == 15


def test_access_log_batches_samples_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def run() -> None:
        log = AccessLog(str(path), sample=0.5, rng=random.Random(1))
        wanted = sum(log.wants() for _ in range(1000))
        assert 400 < wanted < 600
        full = AccessLog(str(path))
        full.write('{"n":1}')
        assert not path.exists() or path.read_text() == ""  # batched, not written yet
        for _ in range(100):  # written by the flush timer, within FLUSH_INTERVAL
            if path.exists() and path.read_text():
                break
            await asyncio.sleep(FLUSH_INTERVAL / 10)
        assert json.loads(path.read_text()) == {"n": 1}
        path.rename(tmp_path / "access.log.1")  # logrotate moved it away
        full.write('{"n":2}')
        full.close()
        assert json.loads(path.read_text()) == {"n": 2}

    asyncio.run(run())


class _Ended:
    bytes_up, bytes_down, outcome = 120, 3400, "ok"


@pytest.mark.parametrize("served", [True, False])
def test_access_log_line_is_the_close_event_as_json(served: bool) -> None:
    info = ConnInfo(100.0, ("127.0.0.1", 40000))
    info.wall0 = 1_764_000_000.9996  # the milliseconds must not round up into the next second
    info.orig_dst = OrigDstAddr(IPv4Address("127.240.0.1"), 80)
    info.src, info.pid = "web", 4242
    if served:
        info.service, info.endpoint, info.connect_s = "api", HostPort.parse("127.0.0.1:8001"), \
            0.00123
        info.attempts = 1
    event = info.event("close", _Ended(), 3, 100.25)  # type: ignore[arg-type]
    line = info.log_line(_Ended(), 3, 100.25)  # type: ignore[arg-type]
    assert json.loads(line) == {k: v for k, v in event.items() if k not in ("t", "event")}
    assert list(json.loads(line)) == [k for k in event if k not in ("t", "event")]
    assert event["start"] == "2025-11-24T16:00:00.999Z" and event["duration_ms"] == 250.0
    assert event["end"] == "2025-11-24T16:00:01.249Z"
    assert (event["dst"], event["endpoint"]) == (("api", "127.0.0.1:8001") if served
                                                 else (None, None))
