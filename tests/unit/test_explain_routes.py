"""`meshnode explain PID http://HOST/PATH -H ...` without an agent: an `ExplainInputs` snapshot
with Route resources and labelled endpoints in, what a user reads out: the rule that took the
request and why, the split, the backend subset and its endpoints, the 503 the proxy would
answer for an empty subset, and a gateway host's request. The process side is faked as in
test_explain.py; tests/integration/test_routes_cli.py runs the same against a real agent."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from typing import Any

import pytest
import yaml

from meshnode.agent.explain import ExplainInputs, explain
from meshnode.agent.routes_api import route_specs
from meshnode.discovery.registry import EndpointRecord, ServiceRecord
from meshnode.errors import UsageError
from meshnode.host import cgroup
from meshnode.model import BalancerConfig, HostPort, OutlierConfig
from meshnode.policy import compiler
from meshnode.policy.authz import compile_authz
from meshnode.policy.document import parse_all
from meshnode.policy.labels import labels_from
from meshnode.policy.resources import ServicePolicy
from tests.unit.test_explain import MOUNT, PID, ROOT, Health

pytestmark = pytest.mark.timeout(10)

V1 = ("127.0.0.1:9101", "127.0.0.1:9102")
V2 = ("127.0.0.1:9201",)


def reviews(*, v2_down: bool = False) -> ServiceRecord:
    eps = [EndpointRecord(HostPort.parse(a), "static", node="n1",
                          labels=labels_from({"version": "v1"})) for a in V1]
    eps += [EndpointRecord(HostPort.parse(a), "static", node="n1",
                           labels=labels_from({"version": "v2"})) for a in V2]
    policy = ServicePolicy(port=80, protocol="http",
                           balancer=BalancerConfig(algorithm="round-robin"),
                           outlier=OutlierConfig())
    return ServiceRecord("reviews", 5, IPv4Address("127.240.0.5"), policy,
                         endpoints=frozenset(eps))


def shadow() -> ServiceRecord:
    policy = ServicePolicy(port=80, protocol="http")
    return ServiceRecord("shadow", 6, IPv4Address("127.240.0.6"), policy,
                         endpoints=frozenset([EndpointRecord(HostPort.parse("127.0.0.1:9301"),
                                                             "static", node="n1")]))


ROUTE = """
service: reviews
hosts: [shop.example.com]
rules:
- name: canary
  match: [{headers: [{name: x-canary, exact: "1"}]}]
  backends: [{service: reviews, subset: {version: v2}}]
  timeouts: {request: 2.5}
- name: beta
  match: [{path: {prefix: /beta}}]
  backends: [{service: reviews, subset: {version: v3}}]
- name: main
  backends: [{service: reviews, subset: {version: v1}, weight: 90},
             {service: reviews, subset: {version: v2}, weight: 10}]
  fault: {delay: {seconds: 0.5, percent: 10}, headers: [{name: x-fault, exact: "1"}]}
  mirror: {service: shadow, percent: 20}
  rateLimit: {requestsPerSecond: 100, burst: 50, perSource: true}
"""


def inputs(*docs: dict[str, Any], down: tuple[str, ...] = ()) -> ExplainInputs:
    recs = [reviews(), shadow()]
    services = {r.name: r for r in recs}
    health = Health(*down)
    resources = {r.key: r for r in parse_all(
        (f"doc{i}", d) for i, d in enumerate(
            [{"kind": "Route", "name": "reviews", "spec": yaml.safe_load(ROUTE)}, *docs]))}
    return ExplainInputs(
        services=services, pushed=compiler.snapshot(services, health.healthy), ready=True,
        capture=compiler.capture_state(services, True), backend="ebpf", capture_reason="test",
        outbound_port=15001, dns_port=None, dns_suffix="mesh", node="n1", zone="",
        cgroup_mount=MOUNT, root_cgroup=ROOT, enrollments=[{"pid": PID, "service": "web"}],
        health=health, authz=compile_authz(resources), routes=route_specs(resources),
        gateways={"edge": "edge"})


@pytest.fixture(autouse=True)
def enrolled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "process_cgroup", lambda pid, mount: ROOT / "apps" / "web")


def rule_steps(e: dict[str, Any]) -> list[str]:
    return [s for s in e["steps"] if s.startswith(("route:", "split:", "backend ", "fault:",
                                                   "mirror:", "rate limit:", "timeouts"))]


def test_a_header_routed_request_names_the_rule_the_condition_and_the_subset() -> None:
    e = explain(inputs(), PID, "http://reviews.mesh/p?q=1", None, None, ["X-Canary: 1"])
    assert e["verdict"] == ("captured by ebpf → Route reviews rule canary → "
                            "reviews{version=v2}: round-robin over 1 healthy endpoint")
    req = e["request"]
    assert (req["route"], req["rule"], req["matched"]) == ("reviews", "canary",
                                                           "header x-canary = '1'")
    assert (req["method"], req["path"], req["headers"]) == ("GET", "/p?q=1", {"x-canary": "1"})
    assert req["backend"]["text"] == "reviews{version=v2}"
    assert rule_steps(e) == [
        "route: Route reviews rule canary: header x-canary = '1'",
        "timeouts (rule canary): request 2.5s, per try up to the request's, idle 300s; "
        "retries (service reviews): up to 2 more on connect-failure, reset, gateway-error, "
        "unavailable, refused-stream",
        "backend reviews{version=v2}: 1 of 1 endpoint in rotation (subset version=v2)"]
    assert [c["addr"] for c in e["candidates"]] == list(V2)
    assert e["candidates"][0]["labels"] == {"version": "v2"}
    # authorization is decided at the backend's endpoints, for the caller's identity
    assert e["authorization"]["identity"] == "spiffe://local/svc/web"
    assert [d["port"] for d in e["authorization"]["request"]["decisions"]] == [9201]
    # the same request without the header falls to the split rule; the VIP form says the same
    plain = explain(inputs(), PID, "http://127.240.0.5/p", "GET")
    assert plain["request"]["rule"] == "main"
    assert explain(inputs(), PID, "http://127.240.0.5:80/p", None, None,
                   ["x-canary: 1"])["verdict"] == e["verdict"]


def test_a_split_shows_every_backend_its_share_and_its_endpoints() -> None:
    e = explain(inputs(down=(V2[0],)), PID, "http://reviews.mesh/", None, None, [])
    req = e["request"]
    assert [(b["text"], b["weight"], b["percent"], b["endpoints"]) for b in req["split"]] == [
        ("reviews{version=v1}", 90, 90.0, 2), ("reviews{version=v2}", 10, 10.0, 0)]
    assert req["split"][1]["reason"] == "no endpoint of reviews carries version=v2"
    assert req["backend"]["text"] == "reviews{version=v1}"  # the largest share, explained
    assert rule_steps(e)[:5] == [
        "route: Route reviews rule main: any request (no rule before it takes the request)",
        "split: reviews{version=v1} weight 90 (90%), reviews{version=v2} weight 10 (10%); "
        "each request goes to one by weight (smooth round robin per worker); explained "
        "below: the largest share, reviews{version=v1}",
        "rate limit: 100 requests/s, burst 50 per source (web), per host; past it the proxy "
        "answers 429 with Retry-After (gRPC: RESOURCE_EXHAUSTED)",
        "fault: delay 0.5s for 10%; only requests with header x-fault: not this request (it "
        "lacks the header)",
        "mirror: a copy of 20% to shadow, fire-and-forget (its answer discarded; only bodies "
        "the proxy holds whole are copied)"]
    assert req["mirror"]["service"] == "shadow" and req["mirror"]["percent"] == 20.0
    assert req["rate_limit"] == {"requests_per_second": 100.0, "burst": 50, "per_source": True}
    assert req["fault"]["applies"] is False
    faulted = explain(inputs(), PID, "http://reviews.mesh/", None, None, ["x-fault: 1"])
    assert faulted["request"]["fault"]["applies"] is True
    assert "fault: delay 0.5s for 10%; only requests with header x-fault" in faulted["steps"]


def test_the_cli_table_shows_the_split_and_the_subsets_endpoints() -> None:
    from meshnode.cli.explain import explain_text

    text = explain_text(explain(inputs(), PID, "http://reviews.mesh/", None, None, []))
    lines = text.splitlines()
    assert lines[0].startswith("captured by ebpf → Route reviews rule main")
    split = lines.index(next(x for x in lines if x.startswith("BACKEND")))
    assert lines[split + 1].split() == ["reviews{version=v1}", "90", "90%", "2"]
    assert lines[split + 2].split() == ["reviews{version=v2}", "10", "10%", "1"]
    assert any(x.startswith("127.0.0.1:9101") and "version=v1" in x for x in lines)


def test_a_subset_with_no_endpoint_is_the_503_the_proxy_answers() -> None:
    e = explain(inputs(), PID, "http://reviews.mesh/beta/x", "POST", None, [])
    assert e["outcome"] == "no-endpoint" and e["candidates"] == []
    assert e["verdict"] == (
        "captured by ebpf → Route reviews rule beta → reviews{version=v3}, which has no "
        "endpoint: the proxy answers 503 (x-meshnode-error: no_endpoint: no endpoint of "
        "reviews carries version=v3)")
    assert e["request"]["refusal"] == {"status": 503, "outcome": "no_endpoint",
                                       "detail": "no endpoint of reviews carries version=v3"}
    assert "POST is retried only on connect-failure" in rule_steps(e)[1]
    # every endpoint of a subset down: the same 503 (the workers route to healthy ones only)
    down = explain(inputs(down=V2), PID, "http://reviews.mesh/", None, None, ["x-canary: 1"])
    assert down["outcome"] == "no-endpoint"
    assert [(c["addr"], c["healthy"], c["in_rotation"]) for c in down["candidates"]] == [
        (V2[0], False, False)]
    assert "(1 registered, none healthy)" in rule_steps(down)[-1]


def test_a_gateway_host_is_explained_without_a_process() -> None:
    e = explain(inputs(), PID, "https://shop.example.com/x", None, None, ["x-canary: 1"])
    assert e["destination"]["kind"] == "gateway-host" and e["process"] is None
    assert e["gateway"] == "edge"
    assert e["verdict"] == ("gateway → Route reviews rule canary → reviews{version=v2}: "
                            "round-robin over 1 healthy endpoint")
    assert e["steps"][:2] == [
        "host: shop.example.com is served by Route reviews (hosts shop.example.com): a "
        "request from outside the mesh through a gateway listener; the PID is not used",
        "gateway: Gateway edge calls into the mesh as service edge (spiffe://local/svc/edge)"]
    assert e["authorization"]["identity"] == "spiffe://local/svc/edge"
    # a host header picks the Route as the gateway does; a host nobody serves is bad input
    via = explain(inputs(), PID, "http://127.0.0.1:8443/", None, None,
                  ["Host: shop.example.com"])
    assert via["request"]["authority"] == "shop.example.com"
    with pytest.raises(UsageError, match="nor a host any Route serves"):
        explain(inputs(), PID, "http://other.example.com/", None, None, [])


def test_a_gateway_rule_nobody_takes_is_a_404() -> None:
    only_api = {"kind": "Route", "name": "api", "spec": {
        "hosts": ["api.example.com"],
        "rules": [{"name": "v1", "match": [{"path": {"prefix": "/v1"}}],
                   "backends": [{"service": "shadow"}]}]}}
    e = explain(inputs(only_api), PID, "http://api.example.com/v2", None, None, [])
    assert e["outcome"] == "refused"
    assert e["verdict"] == ("gateway: the proxy answers 404 itself (x-meshnode-error: "
                            "no_route): gateway edge: no rule of Route api takes GET /v2")
    ok = explain(inputs(only_api), PID, "http://api.example.com/v1/x", None, None, [])
    assert ok["verdict"].startswith("gateway → Route api rule v1 → shadow: ")


def test_no_route_leaves_the_request_to_the_connections_routing() -> None:
    e = explain(inputs(), PID, "http://shadow.mesh/x", None, None, [])
    assert e["request"]["route"] is None
    assert "route: no Route governs service shadow: the request goes to shadow as dialled" \
        in e["steps"]
    assert e["verdict"].startswith("captured by ebpf → service shadow (VIP 127.240.0.6:80)")
    assert e["candidates"][0]["addr"] == "127.0.0.1:9301"
    # a Route none of whose rules takes it: as dialled, too
    beta = {"kind": "Route", "name": "shadow", "spec": {
        "service": "shadow", "rules": [{"name": "beta", "match": [{"path": {"exact": "/b"}}],
                                        "backends": [{"service": "reviews"}]}]}}
    n = explain(inputs(beta), PID, "http://shadow.mesh/x", "GET", None, [])
    assert (n["request"]["route"], n["request"]["rule"]) == ("shadow", None)
    assert "→ no rule of Route shadow takes it: it goes to shadow as dialled, on its own " \
        "routes" in n["steps"]
    assert n["verdict"] == e["verdict"]
    b = explain(inputs(beta), PID, "http://shadow.mesh/b", "GET", None, [])
    assert b["verdict"].startswith("captured by ebpf → Route shadow rule beta → reviews: ")


def test_bad_urls_and_headers_are_usage_errors() -> None:
    for url, headers in (("http:///x", []), ("ftp://reviews.mesh/", []),
                         ("http://reviews.mesh:99999/", []),
                         ("http://reviews.mesh/", ["no-colon"]),
                         ("http://reviews.mesh/", ["bad name: 1"])):
        with pytest.raises(UsageError):
            explain(inputs(), PID, url, None, None, headers)
    with pytest.raises(UsageError, match="-H goes with a URL"):
        explain(inputs(), PID, "reviews.mesh:80", None, None, ["x-canary: 1"])
    with pytest.raises(UsageError, match="--path does not go with a URL"):
        explain(inputs(), PID, "http://reviews.mesh/", None, "/x", [])


def test_the_cli_passes_url_method_and_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from meshnode.cli import explain as cli
    from meshnode.cli.app import app
    from typer.testing import CliRunner

    calls: list[dict[str, Any]] = []
    answer = {"verdict": "captured", "steps": [], "candidates": [], "request": None}
    monkeypatch.setattr(cli, "client", lambda instance: SimpleNamespace(
        call=lambda op, **args: calls.append({"op": op, **args}) or answer))
    result = CliRunner().invoke(app, ["explain", "42", "http://reviews.mesh/p", "-X", "PUT",
                                      "-H", "x-canary: 1", "-H", "cookie: a=b"])
    assert result.exit_code == 0, result.output
    assert calls == [{"op": "explain", "pid": 42, "dest": "http://reviews.mesh/p",
                      "method": "PUT", "headers": ["x-canary: 1", "cookie: a=b"]}]


# -- meshnode get routes, the dashboard's marks -----------------------------------------------
def routes_view(*docs: dict[str, Any], down: tuple[str, ...] = ()) -> dict[str, Any]:
    import random

    from meshnode.agent.routes_api import effective_routes
    from meshnode.route import ServiceTable

    inp = inputs(*docs, down=down)
    live = ServiceTable("n1", "", rng=random.Random(0))
    for update in compiler.resets(inp.pushed):
        live.apply(update)
    return effective_routes(inp.routes, inp.services, live)


def test_get_routes_lists_rules_in_order_with_each_subsets_endpoints() -> None:
    v = routes_view(down=(V1[0],))
    by = {s["service"]: s for s in v["services"]}
    assert by["shadow"]["mode"] == "direct" and by["shadow"]["rules"] == []
    r = by["reviews"]
    assert (r["mode"], r["route"]) == ("routed", "reviews")
    assert [(x["name"], x["match"]) for x in r["rules"]] == [
        ("canary", ["header x-canary = '1'"]), ("beta", ["path prefix '/beta'"]),
        ("main", ["any request"])]
    main = r["rules"][2]
    assert [(b["text"], b["weight"], b["percent"], b["endpoints"], b["registered"])
            for b in main["backends"]] == [("reviews{version=v1}", 90, 90.0, 1, 2),
                                           ("reviews{version=v2}", 10, 10.0, 1, 1)]
    assert (main["fault"], main["mirror"], main["rate_limit"]) == (
        "delay 0.5s 10% if x-fault", "20% to shadow", "100/s burst 50 per source")
    assert r["rules"][1]["backends"][0]["problem"] == \
        "no endpoint of reviews carries version=v3: its requests get 503"
    assert r["rules"][0]["timeouts"] and not r["rules"][0]["retry"]
    assert [(h["host"], h["route"]) for h in v["hosts"]] == [("shop.example.com", "reviews")]


def test_get_routes_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from meshnode.cli import routes as cli
    from meshnode.cli.app import app
    from typer.testing import CliRunner

    view = routes_view()
    monkeypatch.setattr(cli, "client", lambda instance: SimpleNamespace(
        call=lambda op, **args: view))
    result = CliRunner().invoke(app, ["get", "routes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["SERVICE", "ROUTE", "RULE"]
    assert lines[1].startswith("reviews  reviews  1. canary  header x-canary = '1'")
    assert "reviews{version=v3} (0/0 ep NONE: 503)" in lines[2]
    assert "reviews{version=v1} 90% (2/2 ep), reviews{version=v2} 10% (1/1 ep)" in lines[3]
    assert "rateLimit 100/s burst 50 per source" in lines[3]
    assert lines[4].split() == ["shadow", "-", "direct", "every", "request", "shadow", "-"]
    assert any(x.startswith("shop.example.com  reviews  1. canary") for x in lines)
    j = CliRunner().invoke(app, ["get", "routes", "reviews", "-o", "json"])
    assert [s["service"] for s in json.loads(j.output)["services"]] == ["reviews"]
    y = CliRunner().invoke(app, ["get", "routes", "nope"])
    assert "no service named 'nope'" in str(y.exception)  # main() prints it


def test_the_dashboard_marks_splits_faults_mirrors_and_rate_limits() -> None:
    from meshnode.agent.routes_api import service_marks

    docs = [{"kind": "Route", "name": "reviews", "spec": yaml.safe_load(ROUTE)}]
    marks = service_marks({r.key: r for r in parse_all(
        (f"d{i}", d) for i, d in enumerate(docs))})
    assert marks == {"reviews": {
        "route": "reviews", "rules": 3,
        "splits": [{"rule": "main", "weights": [90, 10],
                    "backends": ["reviews{version=v1}", "reviews{version=v2}"]}],
        "fault": ["main"], "mirror": ["main"], "rate_limit": ["main"],
        "hosts": ["shop.example.com"]}}


def test_get_routes_shows_a_tcp_only_route_under_its_service() -> None:
    from meshnode.cli.routes import routes_text

    tcp = {"kind": "Route", "name": "shadow", "spec": {"service": "shadow", "tcp": {
        "backends": [{"service": "shadow", "weight": 3}, {"service": "reviews", "weight": 1}]}}}
    lines = routes_text(routes_view(tcp)).splitlines()
    row = next(x for x in lines if x.startswith("shadow"))
    assert row.split()[:4] == ["shadow", "shadow", "tcp", "every"]
    assert "shadow 75% (1/1 ep), reviews 25% (3/3 ep)" in row
