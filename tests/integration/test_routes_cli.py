"""`meshnode explain PID http://reviews.mesh/PATH -H ...` and `meshnode get routes` through the
real CLI and a real agent with a Route applied: what explain says of a request is what the
request then gets (the canary rule's backend answers it; an empty subset's 503 with its
reason), and `get routes` shows the rules, the split and each subset's endpoints.

MESHNODE_EXPLAIN_TRANSCRIPT=PATH also saves the header-routed request's transcript there
(the issue's closing note)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Host, wait_for
from tests.integration.test_traffic import HostFactory, apply, errors, load, reviews, started

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

ROUTE = """\
kind: Route
name: reviews
spec:
  service: reviews
  rules:
  - name: canary
    match:
    - headers: [{name: x-canary, exact: "1"}]
    backends: [{service: reviews, subset: {version: v2}}]
  - name: beta
    match:
    - path: {prefix: /beta}
    backends: [{service: reviews, subset: {version: v3}}]
  - name: stable
    backends: [{service: reviews, subset: {version: v1}, weight: 90},
               {service: reviews, subset: {version: v2}, weight: 10}]
    rateLimit: {requestsPerSecond: 1000}
"""


def cli(h: Host, *args: str) -> str:
    r = h.cli(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def explain_json(h: Host, pid: int, url: str, *headers: str) -> dict[str, Any]:
    argv = ["explain", str(pid), url, "-o", "json"]
    for x in headers:
        argv += ["-H", x]
    result: dict[str, Any] = json.loads(cli(h, *argv))
    return result


def test_explain_names_the_rule_and_backend_the_request_then_reaches(
        make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    ports = reviews(h)
    apply(h, tmp_path, ROUTE)
    url = "http://reviews.mesh/p"
    client = h.probe(service="client")
    # in force when the worker has it (explain reads the agent's resources at once)
    wait_for("the Route in force", lambda: Counter(
        r.name for r in load(h, url, 10, conns=1, headers=["x-canary: 1"])) == {"v2": 10})

    e = explain_json(h, client.pid, url, "x-canary: 1")
    assert e["verdict"].startswith("captured by ebpf → Route reviews rule canary → "
                                   "reviews{version=v2}: "), e["verdict"]
    req = e["request"]
    assert (req["route"], req["rule"], req["matched"]) == ("reviews", "canary",
                                                           "header x-canary = '1'")
    assert [c["addr"] for c in e["candidates"]] == [f"127.0.0.1:{ports['v2']}"]
    assert e["candidates"][0]["labels"] == {"version": "v2"}
    assert "route: Route reviews rule canary: header x-canary = '1'" in e["steps"]
    # ...and that is where such a request lands
    rows = load(h, url, 20, conns=1, headers=["x-canary: 1"])
    assert errors(rows) == [] and Counter(r.name for r in rows) == {"v2": 20}

    argv = ["explain", str(client.pid), url, "-H", "x-canary: 1"]
    text = cli(h, *argv)
    transcript = f"$ meshnode {' '.join(argv[:3])} -H 'x-canary: 1'\n{text}"
    print("\n" + transcript)  # shown with -s
    if target := os.environ.get("MESHNODE_EXPLAIN_TRANSCRIPT"):
        Path(target).write_text(transcript)
    lines = text.splitlines()
    assert lines[0] == e["verdict"]
    assert any(f"127.0.0.1:{ports['v2']}" in x and "version=v2" in x for x in lines)

    # no header: the split rule, its two backends with their shares and endpoints
    s = explain_json(h, client.pid, url)
    assert s["request"]["rule"] == "stable"
    assert [(b["text"], b["percent"], b["endpoints"]) for b in s["request"]["split"]] == [
        ("reviews{version=v1}", 90.0, 1), ("reviews{version=v2}", 10.0, 1)]
    assert s["request"]["rate_limit"]["requests_per_second"] == 1000.0

    # a subset with no endpoint: explain gives the 503 and the reason the proxy answers with
    b = explain_json(h, client.pid, "http://reviews.mesh/beta/x")
    reason = "no endpoint of reviews carries version=v3"
    assert b["outcome"] == "no-endpoint" and b["request"]["refusal"] == {
        "status": 503, "outcome": "no_endpoint", "detail": reason}
    got = load(h, "http://reviews.mesh/beta/x", 3, conns=1)
    assert {(r.status, r.error_header) for r in got} == {(503, "no_endpoint")}


def test_get_routes_shows_the_split_and_each_subsets_endpoints(
        make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    reviews(h)
    h.call("service.add", name="ratings", patch={"port": 80})
    apply(h, tmp_path, ROUTE)
    v = json.loads(cli(h, "get", "routes", "-o", "json"))
    by = {s["service"]: s for s in v["services"]}
    assert by["ratings"]["mode"] == "direct"
    rules = by["reviews"]["rules"]
    assert [r["name"] for r in rules] == ["canary", "beta", "stable"]
    assert [(x["text"], x["weight"], x["percent"], x["endpoints"], x["registered"])
            for x in rules[2]["backends"]] == [("reviews{version=v1}", 90, 90.0, 1, 1),
                                               ("reviews{version=v2}", 10, 10.0, 1, 1)]
    assert rules[1]["backends"][0]["problem"] == \
        "no endpoint of reviews carries version=v3: its requests get 503"
    text = cli(h, "get", "routes")
    print("\n$ meshnode get routes\n" + text)
    lines = text.splitlines()
    stable = next(x for x in lines if "3. stable" in x)
    assert "reviews{version=v1} 90% (1/1 ep), reviews{version=v2} 10% (1/1 ep)" in stable
    assert "rateLimit 1000/s" in stable
    assert any(x.split()[:3] == ["ratings", "-", "direct"] for x in lines)
    assert "version: v2" in cli(h, "get", "routes", "reviews", "-o", "yaml")
