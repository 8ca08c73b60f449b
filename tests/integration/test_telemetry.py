"""Telemetry end to end, on both capture backends: the numbers /metrics, `stat`, `tap` and the
access log show match the traffic the test made, byte for byte, and name the source service."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Host, free_port, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

CALLS = 12
UP, DOWN = 30_000, 50_000  # each bulk call: bytes sent up, bytes asked back
DOWN_WIRE = DOWN + 65  # the server's sha256 line comes first


def metrics(h: Host) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = h.http_get("/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def value(m: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lv), v in m.items() if n == name and want <= lv)


def api_with_two_instances(h: Host) -> tuple[str, list[int]]:
    vip = h.call("service.add", name="api",
                 patch={"port": 80, "balancer": {"algorithm": "round-robin"}})["vip"]
    ports = [free_port(), free_port()]
    while ports[0] == ports[1]:
        ports[1] = free_port()
    for p in ports:
        h.bulk_server(p, service="api")
    h.wait_endpoints("api", {f"127.0.0.1:{p}" for p in ports})
    return vip, ports


def test_metrics_count_the_traffic_exactly(make_host, backend: str) -> None:
    h = make_host(backend, workers=2)
    h.start()
    vip, ports = api_with_two_instances(h)
    client = h.probe(service="web")
    for _ in range(CALLS):
        r = client.ask(op="bulk", host=vip, port=80, up=UP, down=DOWN)
        assert r["ok"] and r["server_hash_ok"] and r["down_hash_ok"], r
    pair = {"src": "web", "dst": "api"}

    def settled() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        m = metrics(h)
        assert value(m, "meshnode_connections_closed_total", **pair) == CALLS
        return m

    m = wait_for("every connection closed in /metrics", settled)
    assert value(m, "meshnode_connections_opened_total", **pair) == CALLS
    assert value(m, "meshnode_connections_active", **pair) == 0
    assert value(m, "meshnode_bytes_total", direction="up", **pair) == CALLS * UP
    assert value(m, "meshnode_bytes_total", direction="down", **pair) == CALLS * DOWN_WIRE
    assert value(m, "meshnode_connect_latency_seconds_count", **pair) == CALLS
    assert value(m, "meshnode_connection_duration_seconds_count", **pair) == CALLS
    assert value(m, "meshnode_connect_failures_total", **pair) == 0
    # every connection was the balancer's choice, spread over both instances
    picks = {p: value(m, "meshnode_endpoint_selections_total", dst="api",
                      endpoint=f"127.0.0.1:{p}") for p in ports}
    assert sum(picks.values()) == CALLS and all(picks.values()), picks
    assert value(m, "meshnode_enrolled_processes", service="api") == 2
    assert value(m, "meshnode_enrolled_processes", service="web") == 1
    assert value(m, "meshnode_agent_ready") == 1
    assert value(m, "meshnode_service_endpoints", service="api", health="healthy") == 2
    if backend == "ebpf":  # the kernel's own count of captured connects
        assert value(m, "meshnode_capture_events_total", event="captured") == CALLS
        assert value(m, "meshnode_capture_events_total", event="origdst_hit") == CALLS


def test_failures_are_counted_by_reason(make_host, backend: str) -> None:
    h = make_host(backend, workers=1)
    h.start()
    dead = free_port()  # nothing listens there: every connect is refused
    vip = h.call("service.add", name="down", endpoints=[f"127.0.0.1:{dead}"],
                 patch={"port": 80, "health": {"kind": "none"}})["vip"]
    h.call("service.add", name="empty", patch={"port": 80})
    empty_vip = h.service("empty")["vip"]
    client = h.probe(service="web")
    for _ in range(3):  # accepted by the proxy, then reset: it has nowhere to go
        assert client.connect(vip, 80)["errno"] == errno.ECONNRESET
        assert client.connect(empty_vip, 80)["errno"] == errno.ECONNRESET
    m = wait_for("failures in /metrics", lambda: (
        mm := metrics(h),
        value(mm, "meshnode_connections_closed_total", src="web") == 6 and mm)[-1])
    assert value(m, "meshnode_connect_failures_total", src="web", dst="down",
                 reason="refused") == 3
    assert value(m, "meshnode_connect_failures_total", src="web", dst="empty",
                 reason="no_endpoint") == 3
    assert value(m, "meshnode_connect_attempt_errors_total", dst="down") == 3
    r = json.loads(h.cli("stat", "down", "-o", "json").stdout)
    (row,) = r["services"]
    assert row["connections"] == 3 and row["failed"] == 3 and row["error_rate"] == 1.0


def tap_process(h: Host, *args: str) -> subprocess.Popen[str]:
    return h.popen([sys.executable, "-m", "meshnode.cli", "tap", *args, "--instance", h.tag,
                    "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stat_tap_and_access_log_agree_with_the_traffic(make_host, backend: str) -> None:
    h = make_host(backend, workers=2)
    h.start()
    vip, ports = api_with_two_instances(h)
    client = h.probe(service="web")
    tap = tap_process(h, "api", "--max", str(2 * CALLS), "--duration", "60")
    wait_for("tap subscribed", lambda: _tapping(h))
    pid = client.pid
    for _ in range(CALLS):
        assert client.ask(op="bulk", host=vip, port=80, up=UP, down=DOWN)["ok"]
    out, err = tap.communicate(timeout=60)
    assert tap.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    opens = [e for e in events if e["event"] == "open"]
    closes = [e for e in events if e["event"] == "close"]
    assert len(opens) == len(closes) == CALLS, events
    endpoints = {f"127.0.0.1:{p}" for p in ports}
    for e in closes:
        assert (e["src"], e["dst"], e["orig_dst"]) == ("web", "api", f"{vip}:80")
        assert e["endpoint"] in endpoints and e["outcome"] == "ok"
        assert (e["bytes_up"], e["bytes_down"]) == (UP, DOWN_WIRE)
        assert e["pid"] == (pid if backend == "ebpf" else None)

    stat = json.loads(h.cli("stat", "api", "-o", "json").stdout)
    (row,) = stat["services"]
    assert (row["service"], row["connections"], row["failed"], row["active"]) == \
        ("api", CALLS, 0, 0)
    assert row["p50_ms"] is not None and row["p50_ms"] <= row["p99_ms"]
    assert row["rate"] > 0 and row["healthy"] == 2
    table = h.cli("stat")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].split()[:3] == ["SERVICE", "VIP", "HEALTHY"]
    assert any(line.split()[:3] == ["api", f"{vip}:80", "2/2"]
               for line in table.stdout.splitlines())

    log = h.tmp / "log" / h.tag / "access.log"
    lines = wait_for("access log written", lambda: [
        json.loads(x) for x in log.read_text().splitlines()
        if json.loads(x).get("dst") == "api"] if log.exists() else None)
    assert len(lines) == CALLS
    assert sorted((x["src"], x["bytes_up"], x["bytes_down"], x["outcome"]) for x in lines) \
        == [("web", UP, DOWN_WIRE, "ok")] * CALLS
    assert {x["endpoint"] for x in lines} == endpoints


def _tapping(h: Host) -> bool:
    # status counts a tap once every worker has been told of it
    return bool(h.status()["telemetry"]["taps"] == 1)


def test_access_log_sampling_and_top(make_host) -> None:
    h = make_host("ebpf", workers=1, agent_args=("--access-log-sample", "0"))
    h.start()
    vip, _ = api_with_two_instances(h)
    client = h.probe(service="web")
    for _ in range(CALLS):
        assert client.ask(op="bulk", host=vip, port=80, up=10, down=10)["ok"]
    top = h.cli("top", "--iterations", "1", "-o", "json")
    assert top.returncode == 0, top.stderr
    pairs: list[dict[str, Any]] = json.loads(top.stdout)["pairs"]
    assert [(p["src"], p["dst"], p["connections"]) for p in pairs] == [("web", "api", CALLS)]
    assert not (h.tmp / "log" / h.tag / "access.log").exists()  # sampling 0: off
