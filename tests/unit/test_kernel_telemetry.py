"""Kernel-path telemetry on the agent side (meshnode/telemetry/kernel_flows.py): synthetic
mn_kflow rows and mn_klog records become the same figures as proxied connections, with a
`path`: exact numbers in /metrics, `stat` and `top` rows, the access log and tap events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from meshnode.cli.observe import stat_text, top_text
from prometheus_client import CollectorRegistry, generate_latest

from meshnode.agent.observe import Telemetry
from meshnode.bpf.kflow import FlowKey, FlowStats, KlogRecord, LogBatch
from meshnode.config import AgentConfig
from meshnode.model import HostPort
from meshnode.policy.records import EndpointRecord, ServicePolicy, ServiceRecord
from meshnode.telemetry import kernel_flows
from meshnode.telemetry.aggregate import Accumulator, Totals
from meshnode.telemetry.kernel_flows import FlowNames, KernelTally, KernelTelemetry
from meshnode.telemetry.metrics import MeshCollector, Snapshot

pytestmark = pytest.mark.timeout(10)

WEB_CGROUP, OTHER_CGROUP = 0x1_0000_03E9, 999  # web's id is above 32 bits: the map keeps 1001
EP = (IPv4Address("127.0.0.1"), 8002)
GONE = (IPv4Address("127.0.0.1"), 9999)  # an address db does not register
DB = ServiceRecord("db", 2, IPv4Address("127.240.0.2"), ServicePolicy(port=5432),
                   endpoints=frozenset({EndpointRecord(HostPort.parse("127.0.0.1:8002"),
                                                       "static", node="n1")}))
SERVICES = {"db": DB}
SOURCES = {str(WEB_CGROUP): "web"}  # Telemetry.refresh_sources: cgroup inode -> service
NAMES = FlowNames(SOURCES, SERVICES)

KEY = FlowKey(1001, 2, EP)
# 5 connects: 1 never established, 3 closed after moving 300 bytes up and 7000 down in 9 ms
# of lifetime and 450 us of summed RTT, 1 still open
ROW = FlowStats(connects=5, failed=1, closed=3, bytes_sent=300, bytes_received=7000,
                duration_us=9000, srtt_us=450)


def kernel_pairs(tally: KernelTally) -> Totals:
    totals = Accumulator().update([])
    tally.add_to(totals)
    return totals


def test_rows_become_pair_and_endpoint_figures_with_bounded_names() -> None:
    tally = KernelTally()
    tally.update({KEY: ROW, FlowKey(OTHER_CGROUP, 2, GONE): FlowStats(connects=2),
                  FlowKey(1001, 77, EP): FlowStats(connects=1, closed=1)}, NAMES)
    t = kernel_pairs(tally)
    assert not t.pairs  # proxied pairs stay the workers'
    p = t.kernel[("web", "db")]
    assert (p["connections"], p["active"], p["closed"], p["bytes_up"], p["bytes_down"],
            p["connect_errors"], p.failures) == (5, 1, 3, 300, 7000, 1, {"not_established": 1})
    assert (p["kernel_closed"], p["duration_us"], p["rtt_us"]) == (3, 9000, 450)
    assert t.kernel[("unknown", "db")]["active"] == 2  # a cgroup no service owns
    assert t.kernel[("web", "unknown")]["connections"] == 1  # a service id no longer known
    assert t.labelled["kernel_endpoint_connections"] == {
        ("web", "db", "127.0.0.1:8002"): 5, ("unknown", "db", "other"): 2,
        ("web", "unknown", "other"): 1}
    assert t.labelled["kernel_endpoint_failures"] == {("web", "db", "127.0.0.1:8002"): 1}
    assert t.by_service()["db"]["connections"] == 7  # `meshnode status` counts them too


def test_figures_never_fall_back_when_rows_go_or_sources_change() -> None:
    tally = KernelTally()
    tally.update({KEY: ROW}, NAMES)
    tally.update({}, NAMES)  # evicted (LRU): what it counted stays, nothing is open
    t = kernel_pairs(tally)
    assert (t.kernel[("web", "db")]["connections"], t.kernel[("web", "db")]["active"]) == (5, 0)
    tally.update({KEY: FlowStats(connects=2, closed=2)}, NAMES)  # made again: from zero
    assert kernel_pairs(tally).kernel[("web", "db")]["connections"] == 7
    # the row goes back below its last read (evicted and made again in between): all new
    tally.update({KEY: FlowStats(connects=1)}, NAMES)
    assert kernel_pairs(tally).kernel[("web", "db")]["connections"] == 8
    # the source's cgroup is gone: growth from now on is "unknown"'s; web keeps its 8
    tally.update({KEY: FlowStats(connects=4)}, FlowNames({}, SERVICES))
    t = kernel_pairs(tally)
    assert t.kernel[("web", "db")]["connections"] == 8
    assert t.kernel[("unknown", "db")]["connections"] == 3


def test_metrics_show_kernel_connections_in_the_pair_families_with_path() -> None:
    tally = KernelTally()
    tally.update({KEY: ROW}, NAMES)
    totals = kernel_pairs(tally)
    snap = Snapshot(info={"capture": "ebpf"}, ready=True, totals=totals,
                    kernel={"kernel": 5, "kernel_no_endpoint": 1}, dns={}, registry={},
                    services=[], enrolled={}, workers=[])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(lambda: snap))
    lines = generate_latest(registry).decode().splitlines()
    pair = 'dst="db",path="kernel",src="web"'
    for want in [
        f'meshnode_connections_opened_total{{{pair}}} 5.0',
        f'meshnode_connections_active{{{pair}}} 1.0',
        f'meshnode_connections_closed_total{{{pair}}} 3.0',
        f'meshnode_bytes_total{{direction="up",{pair}}} 300.0',
        f'meshnode_bytes_total{{direction="down",{pair}}} 7000.0',
        f'meshnode_connect_attempt_errors_total{{{pair}}} 1.0',
        'meshnode_connect_failures_total{dst="db",path="kernel",reason="not_established",'
        'src="web"} 1.0',
        '# TYPE meshnode_kernel_connection_duration_seconds summary',
        'meshnode_kernel_connection_duration_seconds_count{dst="db",src="web"} 3.0',
        'meshnode_kernel_connection_duration_seconds_sum{dst="db",src="web"} 0.009',
        'meshnode_kernel_connection_rtt_seconds_count{dst="db",src="web"} 3.0',
        'meshnode_kernel_connection_rtt_seconds_sum{dst="db",src="web"} 0.00045',
        'meshnode_kernel_endpoint_connections_total{dst="db",endpoint="127.0.0.1:8002",'
        'src="web"} 5.0',
        'meshnode_kernel_endpoint_failures_total{dst="db",endpoint="127.0.0.1:8002",'
        'src="web"} 1.0',
        'meshnode_kernel_endpoint_connections_active{dst="db",endpoint="127.0.0.1:8002",'
        'src="web"} 1.0',
        'meshnode_capture_events_total{backend="ebpf",event="kernel"} 5.0',
    ]:
        assert want in lines, want
    # no connect-latency or duration histogram series for the kernel path
    assert not [x for x in lines if x.startswith(("meshnode_connect_latency_seconds",
                                                  "meshnode_connection_duration_seconds"))
                and 'dst="db"' in x]


class FakeReader:
    """KernelFlows as the tests fill it."""

    def __init__(self) -> None:
        self.rows_now: dict[FlowKey, FlowStats] = {}
        self.records: list[KlogRecord] = []
        self.missed = 0
        self.closed = False

    def rows(self) -> dict[FlowKey, FlowStats]:
        return dict(self.rows_now)

    def new_records(self) -> LogBatch:
        out, self.records = LogBatch(self.records, self.missed), []
        self.missed = 0
        return out

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def agent_telemetry(reader: FakeReader, log_path: str = "",
                    services: dict[str, ServiceRecord] | None = None
                    ) -> tuple[Telemetry, Clock]:
    clock = Clock()
    kernel = KernelTelemetry(Path("/nonexistent"), log_path, 1.0, opener=lambda _: reader,  # type: ignore[arg-type, return-value]
                             monotonic=clock, wall=lambda: 1_000_000.0,
                             monotonic_ns=lambda: 50 * 10**9)
    tel = Telemetry(AgentConfig(), clock=clock, monotonic=clock, kernel=kernel)
    tel._sources = dict(SOURCES)

    async def stats() -> list[Any]:
        return []

    known = services or SERVICES
    parts = SimpleNamespace(
        workers=SimpleNamespace(stats=stats),
        registry=SimpleNamespace(services=lambda: known, resources=lambda: {}),
        health=SimpleNamespace(healthy=lambda name, addr: True),
        node="n1", cfg=AgentConfig(), capture=SimpleNamespace(name="ebpf"),
        ready=lambda: True, enrollments=SimpleNamespace(describe=lambda: []))
    tel.attach(parts)  # type: ignore[arg-type]
    return tel, clock


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def test_stat_and_top_show_kernel_path_services_like_proxied_ones() -> None:
    reader = FakeReader()
    tel, clock = agent_telemetry(reader)
    clock.now = 10.0  # the zero seed is at 0: a 10 s span
    reader.rows_now = {KEY: ROW}
    r = run(lambda: tel.stat(60.0, None))
    (row,) = r["services"]
    assert (row["service"], row["path"], row["connections"], row["failed"], row["active"],
            row["rate"], row["error_rate"], row["bytes_up_rate"], row["bytes_down_rate"],
            row["rtt_ms"], row["p50_ms"]) == ("db", "kernel", 5, 1, 1, 0.5, 0.2, 30.0, 700.0,
                                              0.15, None)
    assert stat_text(r).splitlines()[1:] == [
        "SERVICE  VIP               HEALTHY  CONN/S  ACTIVE  THROUGHPUT  ERRORS  P50  P95  P99"
        "  PATH    RTT",
        "db       127.240.0.2:5432  1/1      0.5     1       730B/s      20.0%   -    -    -"
        "    kernel  0.15ms",
    ]
    top = run(lambda: tel.top(60.0, 10))
    (pair,) = top["pairs"]
    assert (pair["src"], pair["dst"], pair["path"], pair["connections"]) == \
        ("web", "db", "kernel", 5)
    assert top_text(top).splitlines()[2].split() == [
        "web", "db", "0.5", "1", "730B/s", "20.0%", "-", "-", "kernel", "0.15ms"]
    overview = run(lambda: tel.overview(60.0))
    assert overview["services"][0]["path"] == "kernel"
    assert overview["edges"][0]["path"] == "kernel"
    # a later window: only what grew in it
    clock.now = 20.0
    reader.rows_now = {KEY: FlowStats(connects=6, failed=1, closed=5, bytes_sent=500,
                                      bytes_received=7000, duration_us=9500, srtt_us=650)}
    row = run(lambda: tel.stat(5.0, None))["services"][0]
    assert (row["connections"], row["active"], row["rtt_ms"]) == (1, 0, 0.1)


def test_a_service_without_traffic_shows_the_path_it_asks_for() -> None:
    kernel_db = ServiceRecord("db", 2, DB.vip, ServicePolicy(port=5432, datapath="kernel"),
                              endpoints=DB.endpoints)
    tel, _ = agent_telemetry(FakeReader(), services={"db": kernel_db})
    assert run(lambda: tel.stat(60.0, None))["services"][0]["path"] == "kernel"
    tel, _ = agent_telemetry(FakeReader())
    assert run(lambda: tel.stat(60.0, None))["services"][0]["path"] == "proxy"


def closed(seq: int, established: bool = True) -> KlogRecord:
    # connected at monotonic 40 s, closed 2.5 ms later; the wall clock reads 1e6 s at 50 s
    return KlogRecord(seq, 40 * 10**9, 40 * 10**9 + 2_500_000, KEY,
                      (IPv4Address("127.240.0.2"), 5432), 120 if established else 0,
                      4000 if established else 0, 180 if established else 0, 4321, established)


def test_access_log_lines_and_tap_events_of_kernel_connections(tmp_path: Path) -> None:
    reader = FakeReader()
    log = tmp_path / "access.log"
    tel, _ = agent_telemetry(reader, str(log))
    tap = tel.open_tap("db", None, None, False)
    # the tap registers itself on its first step; the workers are not there: skip that part
    tel._p().workers.send_all = lambda msg: None  # type: ignore[attr-defined]

    async def barrier() -> None:
        return None

    tel._p().workers.barrier = barrier  # type: ignore[attr-defined]

    async def scenario() -> list[dict[str, Any]]:
        first = asyncio.ensure_future(anext(tap))
        await asyncio.sleep(0)
        reader.records = [closed(7), closed(8, established=False)]
        await tel._kernel_log()
        return [await first, await anext(tap)]

    events = asyncio.run(scenario())
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0] == {
        "start": "1970-01-12T13:46:30.000Z", "end": "1970-01-12T13:46:30.002Z",
        "duration_ms": 2.5, "worker": None, "src": "web", "pid": 4321, "client": None,
        "orig_dst": "127.240.0.2:5432", "dst": "db", "src_identity": None,
        "dst_identity": None, "endpoint": "127.0.0.1:8002", "connect_ms": None, "attempts": 1,
        "bytes_up": 120, "bytes_down": 4000, "outcome": "ok", "path": "kernel", "rtt_ms": 0.18}
    assert (lines[1]["outcome"], lines[1]["rtt_ms"]) == ("not_established", None)
    assert list(lines[0])[:17] == [  # the proxied line's fields, in its order
        "start", "end", "duration_ms", "worker", "src", "pid", "client", "orig_dst", "dst",
        "src_identity", "dst_identity", "endpoint", "connect_ms", "attempts", "bytes_up",
        "bytes_down", "outcome"]
    assert [(e["event"], e["outcome"]) for e in events] == [("close", "ok"),
                                                             ("close", "not_established")]


def test_access_log_keeps_to_its_share_and_line_budget(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_flows, "LOG_LINES_PER_SECOND", 3)
    reader = FakeReader()
    log = tmp_path / "access.log"
    clock = Clock()
    kernel = KernelTelemetry(Path("/x"), str(log), 1.0, opener=lambda _: reader,  # type: ignore[arg-type, return-value]
                             monotonic=clock)
    reader.records = [closed(i) for i in range(1, 11)]
    reader.missed = 4
    events, lines = kernel.records(kernel.read_log(), NAMES)
    assert len(events) == 10  # every one for the taps
    kernel.write_log(lines)
    assert len(log.read_text().splitlines()) == 3
    assert kernel.describe() == {"open": True, "log_missed": 4, "log_limited": 7,
                                 "log_dropped": 0}
    clock.now = 1.0  # a second later: 3 more
    reader.records = [closed(i) for i in range(11, 21)]
    kernel.write_log(kernel.records(kernel.read_log(), NAMES)[1])
    assert len(log.read_text().splitlines()) == 6
    # a share of 0 logs nothing; no path, no log
    none = KernelTelemetry(Path("/x"), str(tmp_path / "n.log"), 0.0, opener=lambda _: reader)  # type: ignore[arg-type, return-value]
    reader.records = [closed(30)]
    assert none.records(none.read_log(), NAMES)[1] == []


def test_missing_pins_are_retried_later_and_reads_survive_errors() -> None:
    from meshnode.errors import BpfError

    clock = Clock()
    calls: list[Path] = []

    def opener(path: Path) -> FakeReader:
        calls.append(path)
        raise BpfError("bpf open: No such file or directory", "", errno=2)

    kernel = KernelTelemetry(Path("/p"), opener=opener, monotonic=clock)  # type: ignore[arg-type]
    assert kernel.read_rows() is None and kernel.read_log() is None
    assert len(calls) == 1  # not again before REOPEN_INTERVAL
    clock.now = kernel_flows.REOPEN_INTERVAL
    kernel.update(kernel.read_rows(), NAMES)
    assert len(calls) == 2
    totals = Accumulator().update([])
    kernel.add_to(totals)
    assert not totals.kernel


def test_a_failed_read_keeps_the_figures_and_reopens_the_maps() -> None:
    from meshnode.errors import BpfError

    clock = Clock()
    readers = [FakeReader(), FakeReader()]
    opened: list[FakeReader] = []

    def opener(_: Path) -> FakeReader:
        opened.append(readers[len(opened)])
        return opened[-1]

    kernel = KernelTelemetry(Path("/p"), opener=opener, monotonic=clock)  # type: ignore[arg-type]
    readers[0].rows_now = {KEY: ROW}
    kernel.update(kernel.read_rows(), NAMES)

    def broken() -> dict[FlowKey, FlowStats]:
        raise BpfError("bpf map lookup: Bad file descriptor", "")

    readers[0].rows = broken  # type: ignore[method-assign]
    kernel.update(kernel.read_rows(), NAMES)
    assert readers[0].closed and kernel.describe()["open"] is False
    totals = Accumulator().update([])
    kernel.add_to(totals)
    assert totals.kernel[("web", "db")]["connections"] == 5  # kept, not zeroed
    readers[1].rows_now = {KEY: FlowStats(connects=1)}  # the new maps start over
    kernel.update(kernel.read_rows(), NAMES)
    assert len(opened) == 2
    totals = Accumulator().update([])
    kernel.add_to(totals)
    assert totals.kernel[("web", "db")]["connections"] == 6


def test_iptables_capture_has_no_kernel_path_to_read() -> None:
    reader = FakeReader()
    tel, clock = agent_telemetry(reader)
    tel._p().capture.name = "iptables"  # type: ignore[misc]
    reader.rows_now = {KEY: ROW}
    clock.now = 10.0
    assert run(lambda: tel.stat(60.0, None))["services"][0]["connections"] == 0
    assert tel.kernel.describe()["open"] is False
