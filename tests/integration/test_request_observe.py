"""What an operator sees of an HTTP service through a real agent: `meshnode stat`, `top` and
`tap` (all, and --failed) agree with the requests curl made, counted by the one success rule
(a 404 succeeds, a 500 fails), and /metrics has their latency histogram."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.harness import Host, wait_for
from tests.integration.test_http import HostFactory, curl, http_service, started, value, vip
from tests.integration.test_http import scrape as metrics

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

PATHS = ["/status/200"] * 6 + ["/status/404"] * 2 + ["/status/500"] * 2


def tap(h: Host, *args: str) -> subprocess.Popen[str]:
    return h.popen([sys.executable, "-m", "meshnode.cli", "tap", "web", *args, "--instance",
                    h.tag, "--duration", "60"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stat_row(h: Host) -> dict[str, Any]:
    (row,) = json.loads(h.cli("stat", "web", "-o", "json").stdout)["services"]
    return dict(row)


def test_stat_top_and_tap_show_the_requests(make_host: HostFactory) -> None:
    h = started(make_host)
    # two 500s, never in a row: short of outlier ejection's consecutive 5xx
    backends = http_service(h, "web", 2)
    every = tap(h, "--max", str(len(PATHS)), "-o", "json")
    failures = tap(h, "--failed", "--max", "2")  # the table form: one line per request
    wait_for("both taps subscribed", lambda: h.status()["telemetry"]["taps"] == 2)
    paths = PATHS[::2] + PATHS[1::2]  # interleaved
    replies, _ = curl(h, [f"http://{vip(h, 'web')}{p}" for p in paths])
    assert [r.status for r in replies] == [int(p.rsplit("/", 1)[1]) for p in paths]

    out, err = every.communicate(timeout=60)
    assert every.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    endpoints = {f"127.0.0.1:{port}" for port, _ in backends.values()}
    assert [(e["event"], e["src"], e["dst"], e["method"]) for e in events] == \
        [("request", "client", "web", "GET")] * len(paths)
    assert [(e["path"], e["status"]) for e in events] == \
        [(p, int(p.rsplit("/", 1)[1])) for p in paths]
    assert {e["endpoint"] for e in events} <= endpoints
    out, err = failures.communicate(timeout=60)
    assert failures.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    for line in lines:  # 12:00:00.123 req   client -> web GET /status/500 500 1.23ms via ...
        words = line.split()
        assert words[1:8] == ["req", "client", "->", "web", "GET", "/status/500", "500"], line
        assert words[8].endswith("ms") and words[9] == "via" and words[10] in endpoints, line

    row = wait_for("stat counts every request",
                   lambda: r if (r := stat_row(h))["requests"]["requests"] == len(paths)
                   else None)
    q = row["requests"]
    assert row["l7"] and (q["succeeded"], q["success_rate"]) == (8, 0.8)
    assert (q["retries"], q["budget_exhausted"], q["failures"]) == (0, 0, {})
    assert q["rate"] > 0 and q["p50_ms"] is not None and q["p50_ms"] <= q["p99_ms"]
    assert [(x["route"], x["requests"], x["succeeded"]) for x in row["routes"]] == \
        [("default", len(paths), 8)]
    table = h.cli("stat", "web")
    assert table.returncode == 0, table.stderr
    head, web = table.stdout.splitlines()[1:3]
    assert head.split()[:5] == ["SERVICE", "VIP", "HEALTHY", "RPS", "SUCCESS"], head
    assert web.split()[0] == "web" and web.split()[4] == "80.00%", web

    top = json.loads(h.cli("top", "--iterations", "1", "-o", "json").stdout)
    (pair,) = [p for p in top["pairs"] if p["dst"] == "web"]
    assert pair["src"] == "client" and pair["l7"]
    assert (pair["requests"]["requests"], pair["requests"]["success_rate"]) == (len(paths), 0.8)
    m = metrics(h)
    assert value(m, "meshnode_request_duration_seconds_count", src="client", dst="web") == \
        len(paths)
    print(f"\n$ meshnode stat web\n{table.stdout}\n$ meshnode tap web --failed\n{out}")
