"""What is measured on one variant, one repetition at a time: each function drives the variant's
load generator and reads the middle's processes, returning {metric: value} (None: not
applicable). Sizes and durations come from the `Plan`, so every run is bounded."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tests.bench.procs import cpu_seconds, pinned, rss_bytes
from tests.bench.variants import Variant

Metrics = dict[str, float | None]
MB = 1e6


@dataclass(frozen=True)
class Plan:
    mode: str
    reps: int
    bulk_bytes: int  # each way
    pingpong_count: int  # round trips per sample
    connrate_seconds: float
    many_clients: int
    wrk_seconds: float
    wrk_connections: int
    idle_conns: int


def plan(quick: bool, cpus: int) -> Plan:
    many = max(4, 2 * cpus)  # enough to keep a one-worker proxy busy, few enough to share
    if quick:
        return Plan("quick", 3, 256 << 20, 2000, 0.5, many, 1.0, 32, 2000)
    return Plan("full", 5, 1 << 30, 20000, 3.0, many, 5.0, 32, 2000)


def _addr(v: Variant) -> tuple[str, int]:
    assert v.tcp is not None, f"{v.name} is not a TCP middle"
    return v.tcp


def bulk(v: Variant, plan: Plan) -> Metrics:
    host, port = _addr(v)
    n = plan.bulk_bytes
    cpu0 = cpu_seconds(v.proxy_pids)
    up = v.client.ask("bulk", host=host, port=port, nbytes=n, direction="up")["seconds"]
    down = v.client.ask("bulk", host=host, port=port, nbytes=n, direction="down")["seconds"]
    cpu = cpu_seconds(v.proxy_pids) - cpu0
    return {"bulk_up": n / up / MB, "bulk_down": n / down / MB,
            "bulk": 2 * n / (up + down) / MB,
            "cpu_per_gb": cpu / (2 * n / 1e9) if v.proxy_pids else None}


@contextlib.contextmanager
def _pinned_all(v: Variant, pin: bool) -> Iterator[None]:
    """Everything on CPU 0 (backend, middle, load generator): the round trip then costs the
    CPU time of every hop, with no cross-CPU wake-ups to hide it."""
    if not pin:
        yield
        return
    with pinned(v.pin_pids, [0]):
        v.client.ask("pin", cpus=[0])
        try:
            yield
        finally:
            v.client.ask("pin", cpus=None)


def pingpong(size: int, pin: bool) -> Callable[[Variant, Plan], Metrics]:
    key = ("pp1" if size == 1 else f"pp{size // 1024}k") + ("_pin" if pin else "")

    def run(v: Variant, plan: Plan) -> Metrics:
        host, port = _addr(v)
        with _pinned_all(v, pin):
            r = v.client.ask("pingpong", host=host, port=port, size=size,
                             count=plan.pingpong_count)
        return {f"{key}_p50": r["p50_us"], f"{key}_p99": r["p99_us"]}

    return run


def connrate(many: bool, key: str = "") -> Callable[[Variant, Plan], Metrics]:
    """Connections per second, and the middle's CPU time per connection (µs): on a small
    machine the load generator shares the CPUs, so the rate alone undersells a cheap proxy."""
    key = key or ("conn_rate_many" if many else "conn_rate_1")

    def run(v: Variant, plan: Plan) -> Metrics:
        host, port = _addr(v)
        cpu0 = cpu_seconds(v.proxy_pids)
        r = v.client.ask("connrate", host=host, port=port, seconds=plan.connrate_seconds,
                         clients=plan.many_clients if many else 1)
        cpu = cpu_seconds(v.proxy_pids) - cpu0
        if r["errors"] > r["connections"] // 100:
            print(f"  warning: {v.name} {key}: {r['errors']} failed of "
                  f"{r['connections'] + r['errors']}", file=sys.stderr)
        per_conn = cpu / r["connections"] * 1e6 if v.proxy_pids and r["connections"] else None
        return {key: r["rate"], f"{key}_cpu": per_conn}

    return run


def http(v: Variant, plan: Plan) -> Metrics:
    r = v.client.ask("wrk", url=v.url, seconds=plan.wrk_seconds,
                     connections=plan.wrk_connections)
    if r["errors"]:
        print(f"  warning: {v.name} wrk: {r['errors']} errors", file=sys.stderr)
    return {"http_rps": r["rps"], "http_p50": r["p50_ms"], "http_p99": r["p99_ms"]}


def memory(v: Variant, plan: Plan) -> Metrics:
    """RSS at idle, then the proxy's growth per idle (established, end-to-end) connection.
    Run once per variant on fresh processes, before any load: afterwards the allocators keep
    what they grew to, and a second round would measure reuse, not cost."""
    out: Metrics = {"rss_idle": rss_bytes(v.rss_pids) / MB if v.rss_pids else None,
                    "rss_idle_proxy": rss_bytes(v.proxy_pids) / MB if v.proxy_pids else None,
                    "mem_per_conn": None}
    if v.tcp is None or not v.proxy_pids:
        return out
    host, port = v.tcp
    before = rss_bytes(v.proxy_pids)
    v.client.ask("idle_open", host=host, port=port, n=plan.idle_conns, timeout=60)
    try:
        out["mem_per_conn"] = (rss_bytes(v.proxy_pids) - before) / plan.idle_conns / 1024
    finally:
        v.client.ask("idle_close")
    return out
