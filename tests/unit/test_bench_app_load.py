"""The kernel-path bench's real-client driver reads redis-benchmark's and pgbench's output
(tests/bench/app_load.py), and its report takes ratios per repetition (tests/bench/kernel.py):
no servers, the tools' output as they print it (redis-benchmark 7.0, pgbench 15)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench import app_load, kernel

REDIS_CSV = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"PING_INLINE","40000.00","0.659","0.144","0.639","0.951","1.311","3.511"
"PING_MBULK","44052.86","0.601","0.136","0.583","0.863","1.183","2.359"
"SET","43572.98","0.609","0.160","0.591","0.879","1.207","2.727"
"GET","44742.73","0.594","0.152","0.575","0.855","1.175","2.095"
"""

PGBENCH = """\
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 8
number of threads: 1
maximum number of tries: 1
duration: 1 s
number of transactions actually processed: 16528
number of failed transactions: 0 (0.000%)
latency average = 0.484 ms
initial connection time = 10.123 ms
tps = 16528.412300 (without initial connection time)
"""


def _fake_run(out: str, seen: list[list[str]]) -> Any:
    def run(argv: list[str], timeout: float) -> str:
        seen.append(argv)
        return out

    return run


def test_redis_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(app_load, "_run", _fake_run(REDIS_CSV, seen))
    r = app_load.op_redis("redis.mesh", 6379, "ping,set,get", 1000, 50)
    assert r["rps"] == {"PING_INLINE": 40000.0, "PING_MBULK": 44052.86, "SET": 43572.98,
                        "GET": 44742.73}
    assert r["p50_ms"]["GET"] == 0.575
    assert seen[0][:3] == ["redis-benchmark", "-h", "redis.mesh"]
    assert set(kernel.REDIS_ROWS) == set(r["rps"])  # the rows the report and targets expect


def test_redis_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_load, "_run", _fake_run("Could not connect\n", []))
    with pytest.raises(ValueError, match="unreadable"):
        app_load.op_redis("x", 1, "ping", 1, 1)


def test_pgbench(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(app_load, "_run", _fake_run(PGBENCH, seen))
    r = app_load.op_pgbench("pg.mesh", 5432, 1.0, 8)
    assert r == {"tps": 16528.4123, "latency_ms": 0.484, "transactions": 16528, "failed": 0}
    assert "-S" in seen[0] and "-c8" in seen[0]


def test_paired_ratios_cancel_a_drift() -> None:
    """A machine twice as slow in the second repetition: each repetition's own ratio is 0.5."""
    reps: kernel.Reps = {"a": {"x": {0: 50.0, 1: 25.0, 2: 50.0}},
                         "b": {"x": {0: 100.0, 1: 50.0, 2: 100.0}}}
    assert kernel.paired(reps, "a", "b", "x") == 0.5
    reps["a"]["x"].pop(1)  # a failed repetition leaves a gap, not a misaligned pair
    assert kernel.paired(reps, "a", "b", "x") == 0.5
    assert kernel.paired(reps, "a", "c", "x") is None


def test_proxy_vs_before_inverts_latency() -> None:
    reps: kernel.Reps = {
        kernel.PROXY: {"bulk": {0: 90.0}, "pp1_pin_p50": {0: 50.0}},
        kernel.BEFORE: {"bulk": {0: 100.0}, "pp1_pin_p50": {0: 60.0}}}
    got = kernel.proxy_vs_before(reps)
    assert got == {"bulk": 0.9, "pp1_pin_p50": 1.2}  # slower bulk, faster round trip
    goal = kernel.goals(reps)[-1]
    assert goal.target.value == 0.9 and goal.target.met is False
