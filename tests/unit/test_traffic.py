"""The Route kind (validation at apply time) and the per-request decision it compiles to."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import yaml

from meshnode.errors import UsageError
from meshnode.policy.document import parse
from meshnode.policy.resources import Resource
from meshnode.policy.store import plan
from meshnode.policy.traffic import RouteSpec, check_routes
from meshnode.route.traffic import Pick, RequestView, TokenBucket, TrafficTable


def route(spec: str, name: str = "r") -> Resource:
    return parse({"kind": "Route", "name": name, "spec": yaml.safe_load(spec)})


def table(*specs: tuple[str, str], workers: int = 1, clock: Any = time.monotonic,
          seed: int = 1) -> TrafficTable:
    return TrafficTable({name: route(s, name).spec for name, s in specs}, workers, clock,
                        random.Random(seed))


def view(path: str = "/", method: str = "GET", **headers: str) -> RequestView:
    return RequestView(method, path, "svc.mesh",
                       {k.replace("_", "-"): v for k, v in headers.items()}, "web")


CANARY = """
service: reviews
rules:
- name: canary
  match: [{headers: [{name: x-canary, exact: "1"}]},
          {cookies: [{name: user, regex: "^tester-.*"}]}]
  backends: [{service: reviews, subset: {version: v2}}]
- name: api
  match: [{path: {prefix: /api}, methods: [GET]}, {query: [{name: debug, present: true}]}]
  backends: [{service: reviews, subset: {version: v1}, weight: 90},
             {service: reviews, subset: {version: v2}, weight: 10}]
"""


def test_header_cookie_query_and_path_matching_pick_the_rule() -> None:
    r = table(("reviews", CANARY)).service("reviews")
    assert r is not None and r.reads_headers
    d = r.decide(view(x_canary="1"))
    assert (d.rule, d.backend) == ("canary", Pick("reviews", (("version", "v2"),)))
    assert "header x-canary = '1'" in d.why[0]
    assert r.decide(view(x_canary="2")).rule == ""  # no rule: the service as dialled
    assert r.decide(view(cookie="a=b; user=tester-7")).rule == "canary"
    assert r.decide(view(cookie="user=alice")).rule == ""
    assert r.decide(view("/api/x")).rule == "api"
    assert r.decide(view("/apix")).rule == ""  # whole segments
    assert r.decide(view("/api/x", "POST")).rule == ""
    assert r.decide(view("/other?a=1&debug")).rule == "api"
    # matched normalized: a dot segment cannot walk around a rule
    assert r.decide(view("/x/../api/y")).rule == "api"


def test_split_is_exact_per_worker_and_explain_takes_no_turn() -> None:
    r = table(("reviews", CANARY)).service("reviews")
    assert r is not None
    picks = [r.decide(view("/api")).backend for _ in range(1000)]
    v2 = sum(1 for p in picks if p is not None and p.subset == (("version", "v2"),))
    assert v2 == 100  # smooth weighted round robin: 10 of every 100, exactly
    d = r.decide(view("/api"), dry=True)
    assert d.split[0][1] == 90 and "split" in d.why[1]
    assert [r.decide(view("/api")).backend for _ in range(10)].count(
        Pick("reviews", (("version", "v2"),))) == 1


def test_fault_abort_and_delay_at_their_percentages_only_with_the_header() -> None:
    spec = """
service: pay
rules:
- name: chaos
  fault:
    abort: {status: 503, percent: 20}
    delay: {seconds: 0.5, percent: 50}
    headers: [{name: x-chaos, present: true}]
"""
    r = table(("pay", spec)).service("pay")
    assert r is not None
    n = 5000
    decided = [r.decide(view(x_chaos="1")) for _ in range(n)]
    aborts = sum(1 for d in decided if d.abort == (503, None))
    delays = sum(1 for d in decided if d.delay == 0.5)
    assert abs(aborts / n - 0.20) < 0.03
    # a delay applies to the requests not aborted: 50 % of 80 %
    assert abs(delays / n - 0.40) < 0.03
    assert all(d.abort is None and not d.delay for d in (r.decide(view()) for _ in range(200)))


def test_rate_limit_token_bucket_is_shared_by_workers_and_per_source() -> None:
    now = [100.0]
    spec = """
service: api
rules:
- {name: all, rateLimit: {requestsPerSecond: 10, burst: 4, perSource: true}}
"""
    r = table(("api", spec), workers=2, clock=lambda: now[0]).service("api")
    assert r is not None
    # per worker: 5/s, burst 2
    got = [r.decide(view()).retry_after for _ in range(3)]
    assert got[:2] == [None, None] and got[2] == pytest.approx(0.2)
    other = RequestView("GET", "/", "", {}, "other")
    assert r.decide(other).retry_after is None  # another source, its own bucket
    now[0] += 0.2
    assert r.decide(view()).retry_after is None


def test_token_bucket_refills_at_its_rate() -> None:
    b = TokenBucket(100.0, 1.0, 0.0)
    taken = sum(1 for i in range(1000) if b.take(i * 0.001) is None)
    assert 99 <= taken <= 102  # 1 s at 100/s (+ the burst)


def test_weights_and_buckets_survive_an_unrelated_change() -> None:
    spec = "service: api\nrules:\n- {name: all, rateLimit: {requestsPerSecond: 1, burst: 1}}"
    t1 = table(("api", spec))
    r1 = t1.service("api")
    assert r1 is not None and r1.decide(view()).retry_after is None
    t2 = TrafficTable({"api": route(spec).spec}, old=t1)
    r2 = t2.service("api")
    assert r2 is not None and r2.decide(view()).retry_after is not None  # same bucket, empty


def test_gateway_hosts_exact_then_longest_wildcard() -> None:
    def gw(host: str, to: str) -> str:
        return f"hosts: ['{host}']\nrules:\n- {{name: r, backends: [{{service: {to}}}]}}"

    t = table(("shop", gw("shop.example.com", "a")), ("wild", gw("*.example.com", "b")),
              ("deep", gw("*.eu.example.com", "c")))
    assert t.host("shop.example.com:8443").name == "shop"  # type: ignore[union-attr]
    assert t.host("SHOP.example.com.").name == "shop"  # type: ignore[union-attr]
    assert t.host("x.example.com").name == "wild"  # type: ignore[union-attr]
    assert t.host("x.eu.example.com").name == "deep"  # type: ignore[union-attr]
    assert t.host("example.com") is None


def test_tcp_split_per_connection() -> None:
    t = table(("db", """
service: db
tcp: {backends: [{service: db, subset: {version: v2}, weight: 1},
                 {service: db, weight: 3}]}
"""))
    picks = [t.tcp("db") for _ in range(400)]
    assert picks.count(Pick("db")) == 300
    assert t.tcp("other") is None


def test_grpc_match_is_a_path() -> None:
    r = table(("g", """
service: g
rules:
- {name: get, match: [{grpc: {service: pkg.Svc, method: Get}}], backends: [{service: g2}]}
- {name: svc, match: [{grpc: {service: pkg.Svc}}], backends: [{service: g3}]}
""")).service("g")
    assert r is not None
    assert r.decide(view("/pkg.Svc/Get", "POST")).rule == "get"
    assert r.decide(view("/pkg.Svc/List", "POST")).rule == "svc"
    assert r.decide(view("/pkg.Other/Get", "POST")).rule == ""


@pytest.mark.parametrize(("spec", "error"), [
    ("service: a\nrules:\n- {name: all}\n- {name: x, match: [{path: {prefix: /a}}]}",
     "rule x can never match: rule all before it takes every request"),
    ("service: a\nrules:\n- {name: p, match: [{path: {prefix: /a}}]}\n"
     "- {name: q, match: [{path: {exact: /a/b}, headers: [{name: h, exact: v}]}]}",
     "rule q can never match"),
    ("service: a\nrules:\n- {name: r, match: [{path: {regex: '(a+)+\\1'}}]}",
     "not valid RE2 syntax"),
    ("service: a\nrules:\n- {name: r, match: [{headers: [{name: x, regex: '(?=a)'}]}]}",
     "not valid RE2 syntax"),
    ("service: a\nrules:\n- {name: r, backends: [{service: b, weight: 0}]}",
     "weights sum to zero"),
    ("service: a\ntcp: {backends: [{service: b, weight: 0}, {service: c, weight: 0}]}",
     "weights sum to zero"),
    ("service: a\nrules:\n- {name: r, mirror: {service: a}}", "the mirror is a backend"),
    ("hosts: [shop.example.com]\nrules:\n- {name: r}", "must name backends"),
    ("rules: []", "give service"),
    ("service: a\nhosts: ['Shop.example.com']", "is not a lowercase DNS name"),
    ("service: a\nrules:\n- {name: r, match: [{headers: [{name: x, exact: a, regex: b}]}]}",
     "give exactly one of"),
    ("service: a\nrules:\n- {name: default}", "'default' is taken"),
    ("service: a\nrules:\n- {name: r, fault: {abort: {status: 700}}}",
     "not between 200 and 599"),
    ("service: a\nrules:\n- {name: r, backends: [{service: b, subset: {'bad key!': x}}]}",
     "label key"),
    ("service: a\nrules:\n- {name: r, rateLimit: {requestsPerSecond: 0}}",
     "requestsPerSecond"),
])
def test_bad_routes_are_refused_with_a_reason(spec: str, error: str) -> None:
    with pytest.raises(UsageError, match=error.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+").replace("?", r"\?")):
        route(spec)


def test_oversized_table_is_refused() -> None:
    rules = "\n".join(f"- {{name: r{i}, match: [{{path: {{exact: /p{i}}}}}]}}"
                      for i in range(129))
    with pytest.raises(UsageError, match="at most 128"):
        route("service: a\nrules:\n" + rules)


def _svc(name: str, protocol: str = "http") -> Resource:
    return parse({"kind": "Service", "name": name, "spec": {"protocol": protocol}})


def test_conflicts_across_routes_are_refused_at_apply() -> None:
    stored = {r.key: r for r in (_svc("a"), _svc("b"), _svc("c"))}
    one = route("service: a\nrules:\n- {name: x, backends: [{service: b}]}", "one")
    stored[one.key] = one
    with pytest.raises(UsageError, match="Routes one and two both govern service a"):
        plan(stored, [route("service: a\nrules:\n- {name: y, backends: [{service: c}]}",
                            "two")], [])
    host1 = route("hosts: [x.example.com]\nrules:\n- {name: r, backends: [{service: b}]}", "h1")
    host2 = route("hosts: [x.example.com]\nrules:\n- {name: r, backends: [{service: c}]}", "h2")
    with pytest.raises(UsageError, match=r"both claim host x\.example\.com"):
        check_routes([host1, host2])
    with pytest.raises(UsageError, match="refers to Service nope"):
        plan(stored, [route("service: a\nrules:\n- {name: y, backends: [{service: nope}]}",
                            "one")], [])


def test_mirror_loop_is_refused_and_a_subset_mirror_is_not() -> None:
    a = route("service: a\nrules:\n- {name: r, mirror: {service: b}}", "ra")
    b = route("service: b\nrules:\n- {name: r, mirror: {service: a}}", "rb")
    with pytest.raises(UsageError, match="mirror loop: a -> b -> a"):
        check_routes([a, b])
    same = route("service: a\nrules:\n- {name: r, backends: [{service: a, subset: {v: '1'}}],"
                 " mirror: {service: a, subset: {v: '2'}}}")
    check_routes([same])


def test_a_route_round_trips_through_its_document() -> None:
    r = route(CANARY, "reviews")
    again = parse(r.to_doc())
    assert again.spec == r.spec and isinstance(again.spec, RouteSpec)
