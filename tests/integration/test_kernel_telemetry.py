"""Telemetry of kernel-path connections end to end (eBPF only: the connect hook balances a
`datapath: kernel` service with no proxy on the path): /metrics, `stat`, `top` and the access
log count them like proxied ones, under path="kernel", byte for byte, naming the source."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from tests.harness import Host, free_port, wait_for
from tests.integration.test_telemetry import metrics, value

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

CALLS = 12
UP, DOWN = 30_000, 50_000  # each bulk call: bytes sent up, bytes asked back
DOWN_WIRE = DOWN + 65  # the server's sha256 line comes first
KERNEL = {"path": "kernel"}

Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def kernel_service(h: Host, name: str, endpoints: tuple[str, ...] = (), **patch: Any) -> str:
    vip: str = h.call("service.add", name=name, endpoints=list(endpoints), patch={
        "port": 80, "datapath": "kernel", "balancer": {"algorithm": "round-robin"},
        **patch})["vip"]
    return vip


def settled(h: Host, check: Any, what: str) -> Metrics:
    """/metrics once `check(m)` holds (the agent samples the maps once a second)."""
    return wait_for(what, lambda: (m := metrics(h), check(m) and m)[-1])


def test_kernel_path_connections_are_counted_exactly(make_host) -> None:
    h = make_host("ebpf", workers=1)
    h.start()
    vip = kernel_service(h, "api")
    ports = [free_port(), free_port()]
    while ports[0] == ports[1]:
        ports[1] = free_port()
    for p in ports:
        h.bulk_server(p, service="api")
    endpoints = {f"127.0.0.1:{p}" for p in ports}
    h.wait_endpoints("api", endpoints)
    client = h.probe(service="web")
    pair = {"src": "web", "dst": "api"}

    # the tables follow the endpoints within a reconcile: one call shows the kernel path is on
    def kernel_path_on() -> bool:
        assert client.ask(op="bulk", host=vip, port=80, up=UP, down=DOWN)["ok"]
        return value(metrics(h), "meshnode_capture_events_total", event="kernel") > 0

    wait_for("the kernel path balancing api", kernel_path_on)
    base = settled(h, lambda m: value(m, "meshnode_connections_active", **pair) == 0,
                   "warm-up connections closed")

    def grew(m: Metrics, name: str, **labels: str) -> float:
        return value(m, name, **labels) - value(base, name, **labels)

    for _ in range(CALLS):
        r = client.ask(op="bulk", host=vip, port=80, up=UP, down=DOWN)
        assert r["ok"] and r["server_hash_ok"] and r["down_hash_ok"], r
    m = settled(h, lambda m: grew(m, "meshnode_connections_closed_total", **pair, **KERNEL)
                == CALLS, "every kernel-path connection closed in /metrics")
    assert grew(m, "meshnode_connections_opened_total", **pair, **KERNEL) == CALLS
    assert value(m, "meshnode_connections_opened_total", **pair, path="proxy") == 0
    assert value(m, "meshnode_connections_active", **pair, **KERNEL) == 0
    assert value(m, "meshnode_connect_failures_total", **pair) == 0
    assert grew(m, "meshnode_capture_events_total", event="kernel") == CALLS
    assert grew(m, "meshnode_kernel_connection_duration_seconds_count", **pair) == CALLS
    assert grew(m, "meshnode_kernel_connection_rtt_seconds_count", **pair) == CALLS
    assert value(m, "meshnode_kernel_connection_rtt_seconds_sum", **pair) > 0
    picks = {ep: grew(m, "meshnode_kernel_endpoint_connections_total", endpoint=ep, **pair)
             for ep in endpoints}
    assert sum(picks.values()) == CALLS and all(picks.values()), picks  # round robin: both

    stat = json.loads(h.cli("stat", "api", "-o", "json").stdout)
    (row,) = stat["services"]
    total = value(m, "meshnode_connections_opened_total", **pair, **KERNEL)
    assert (row["path"], row["connections"], row["failed"], row["active"]) == \
        ("kernel", total, 0, 0)
    assert row["p50_ms"] is None and row["rtt_ms"] is not None and row["rtt_ms"] > 0
    table = h.cli("stat").stdout.splitlines()
    assert table[1].split()[-2:] == ["PATH", "RTT"]
    assert any(line.split()[:3] == ["api", f"{vip}:80", "2/2"] and "kernel" in line.split()
               for line in table)
    top = json.loads(h.cli("top", "--iterations", "1", "-o", "json").stdout)
    assert [(p["src"], p["dst"], p["path"]) for p in top["pairs"]] == [("web", "api", "kernel")]

    log = h.tmp / "log" / h.tag / "access.log"

    def kernel_lines() -> list[dict[str, Any]] | None:
        if not log.exists():
            return None
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        mine = [x for x in lines if x.get("path") == "kernel" and x["dst"] == "api"]
        return mine if len(mine) >= total else None

    lines = wait_for("kernel-path access log lines", kernel_lines)
    assert len(lines) == total
    assert {(x["src"], x["orig_dst"], x["outcome"]) for x in lines} == \
        {("web", f"{vip}:80", "ok")}
    assert {x["endpoint"] for x in lines} == endpoints
    assert {x["pid"] for x in lines} == {client.pid}
    # bytes as the app moved them, both ways: the same figures as a proxied connection's
    assert {(x["bytes_up"], x["bytes_down"]) for x in lines} == {(UP, DOWN_WIRE)}
    assert (grew(m, "meshnode_bytes_total", direction="up", **pair, **KERNEL),
            grew(m, "meshnode_bytes_total", direction="down", **pair, **KERNEL)) == \
        (CALLS * UP, CALLS * DOWN_WIRE)


def test_kernel_path_failures_are_counted(make_host) -> None:
    h = make_host("ebpf", workers=1)
    h.start()
    dead = free_port()  # nothing listens there: the endpoint refuses
    vip = kernel_service(h, "down", (f"127.0.0.1:{dead}",),
                         health={"kind": "none"})
    client = h.probe(service="web")
    pair = {"src": "web", "dst": "down", **KERNEL}

    def refused() -> bool:
        assert client.connect(vip, 80)["errno"] == errno.ECONNREFUSED
        return value(metrics(h), "meshnode_capture_events_total", event="kernel") > 0

    wait_for("the kernel path balancing down", refused)
    for _ in range(3):
        assert client.connect(vip, 80)["errno"] == errno.ECONNREFUSED
    m = settled(h, lambda m: value(m, "meshnode_connect_failures_total", **pair) >= 4,
                "kernel-path failures in /metrics")
    kernel = value(m, "meshnode_capture_events_total", event="kernel")
    assert value(m, "meshnode_connect_failures_total", reason="not_established", **pair) == \
        kernel
    assert value(m, "meshnode_connections_opened_total", **pair) == kernel
    assert value(m, "meshnode_connections_closed_total", **pair) == 0
    assert value(m, "meshnode_kernel_endpoint_failures_total", endpoint=f"127.0.0.1:{dead}",
                 src="web", dst="down") == kernel
    (row,) = json.loads(h.cli("stat", "down", "-o", "json").stdout)["services"]
    assert (row["path"], row["failed"], row["error_rate"]) == ("kernel", kernel, 1.0)
