"""Authorization without an agent: the AuthorizationPolicy kind and the Mesh default as documents,
`compile_authz` + `AuthzTable.decide` as a table of cases (the semantics written in
meshnode/policy/authz.py), the table on the wire, the cost of a decision, and
`authz suggest` from observed edges to documents `meshnode apply -f` takes."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from meshnode.errors import NotFoundError, UsageError
from meshnode.policy import authz
from meshnode.policy.authz import AuthzTable, compile_authz, service_of
from meshnode.policy.document import load_text, parse, parse_all
from meshnode.policy.resources import Resource, ServicePolicy, spec_schema
from meshnode.policy.store import plan
from meshnode.policy.suggest import Edge, policy_name, suggest
from meshnode.wire import Security

pytestmark = pytest.mark.timeout(30)

TD = "spiffe://td"
FRONTEND, BATCH, ADMIN = f"{TD}/svc/frontend", f"{TD}/svc/batch", f"{TD}/svc/admin"


def policy(name: str, target: str = "web", action: str = "ALLOW", dry: bool = False,
           rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"target": target, "action": action}
    if dry:
        spec["dryRun"] = True
    if rules is not None:
        spec["rules"] = rules
    return {"kind": "AuthorizationPolicy", "name": name, "spec": spec}


def mesh(default: str = "ALLOW", dry: bool = False) -> dict[str, Any]:
    return {"kind": "Mesh", "name": "mesh",
            "spec": {"authorization": {"default": default, "dryRun": dry}}}


def plain(value: Any) -> Any:
    """As the control socket carries it (JSON: tuples become lists)."""
    return msgspec.json.decode(msgspec.json.encode(value))


def table(*docs: dict[str, Any]) -> AuthzTable:
    resources = parse_all((f"doc{i}", d) for i, d in enumerate(docs))
    return compile_authz({r.key: r for r in resources})


WEB_ALLOW = policy("web-allow", rules=[{"from": {"services": ["frontend"]}}])
NO_BATCH = policy("no-batch", target="*", action="DENY",
                  rules=[{"from": {"services": ["batch"]}}])

# (what is applied, the caller, the destination, port) -> (verdict, deciding policy, reason)
CASES: list[tuple[str, tuple[dict[str, Any], ...], str, str, int, str, str, str]] = [
    ("nothing applied: the mesh is open", (), BATCH, "web", 80, "allowed", "",
     f"allowed by the mesh default ALLOW: no AuthorizationPolicy decides {BATCH} to web:80"),
    ("an ALLOW policy lets its callers in", (WEB_ALLOW,), FRONTEND, "web", 8080, "allowed",
     "web-allow", f"allowed by AuthorizationPolicy web-allow (rule 1 matches {FRONTEND} to "
                  "web:8080)"),
    ("...and closes the service to everyone else", (WEB_ALLOW,), BATCH, "web", 8080, "denied",
     "web-allow", f"denied by AuthorizationPolicy web-allow (no rule allows {BATCH} to "
                  "web:8080)"),
    ("...but not other services", (WEB_ALLOW,), BATCH, "api", 80, "allowed", "",
     f"allowed by the mesh default ALLOW: no AuthorizationPolicy decides {BATCH} to api:80"),
    ("deny beats allow", (WEB_ALLOW, policy("no-frontend", action="DENY",
                                             rules=[{"from": {"services": ["frontend"]}}])),
     FRONTEND, "web", 80, "denied", "no-frontend",
     f"denied by AuthorizationPolicy no-frontend (rule 1 matches {FRONTEND} to web:80)"),
    ("a DENY for every service", (NO_BATCH,), BATCH, "api", 80, "denied", "no-batch",
     f"denied by AuthorizationPolicy no-batch (rule 1 matches {BATCH} to api:80)"),
    ("services match in any trust domain", (WEB_ALLOW,), "spiffe://other.org/svc/frontend",
     "web", 80, "allowed", "web-allow", ""),
    ("a node identity is not the service of that name", (WEB_ALLOW,), f"{TD}/node/frontend",
     "web", 80, "denied", "web-allow", ""),
    ("default DENY: a service no policy names is closed", (mesh("DENY"),), FRONTEND, "web",
     80, "denied", "", f"denied by the mesh default DENY: no AuthorizationPolicy decides "
                       f"{FRONTEND} to web:80"),
    ("default DENY: an ALLOW policy opens its service", (mesh("DENY"), WEB_ALLOW), FRONTEND,
     "web", 80, "allowed", "web-allow", ""),
    ("a policy without rules matches every caller",
     (mesh("DENY"), policy("open", target="api")), "", "api", 80, "allowed", "open",
     "allowed by AuthorizationPolicy open (it has no rules: it matches every caller, here an "
     "unauthenticated caller to api:80)"),
    ("an empty from matches any caller, on the ports of its to",
     (policy("web-8080", rules=[{"to": {"ports": [8080]}}]),), BATCH, "web", 8080,
     "allowed", "web-8080", ""),
    ("...and no other port", (policy("web-8080", rules=[{"to": {"ports": [8080]}}]),), BATCH,
     "web", 9090, "denied", "web-8080", ""),
    ("an unauthenticated caller matches no service", (WEB_ALLOW,), "", "web", 80, "denied",
     "web-allow", "denied by AuthorizationPolicy web-allow (no rule allows an "
                  "unauthenticated caller to web:80)"),
    ("...unless a rule names unauthenticated callers",
     (policy("plain", rules=[{"from": {"unauthenticated": True}}]),), "", "web", 80,
     "allowed", "plain", ""),
    ("...which is not every caller",
     (policy("plain", rules=[{"from": {"unauthenticated": True}}]),), FRONTEND, "web", 80,
     "denied", "plain", ""),
    ("DENY plaintext callers only", (policy("no-plain", action="DENY",
                                            rules=[{"from": {"unauthenticated": True}}]),),
     FRONTEND, "web", 80, "allowed", "", ""),
    ("a wildcard pattern matches below its path",
     (policy("td-svc", rules=[{"from": {"identities": [f"{TD}/svc/*"]}}]),), BATCH, "web", 80,
     "allowed", "td-svc", ""),
    ("...not in another trust domain",
     (policy("td-svc", rules=[{"from": {"identities": [f"{TD}/svc/*"]}}]),),
     "spiffe://tdx/svc/batch", "web", 80, "denied", "td-svc", ""),
    ("...nor another path", (policy("td-svc", rules=[{"from": {"identities": [f"{TD}/svc/*"]}}]),),
     f"{TD}/node/n1", "web", 80, "denied", "td-svc", ""),
    ("an exact identity", (policy("one", rules=[{"from": {"identities": [ADMIN]}}]),), ADMIN,
     "web", 80, "allowed", "one", ""),
    ("'*' is any authenticated service", (policy("any", rules=[{"from": {"identities": ["*"]}}]),),
     f"{TD}/svc/batch", "web", 80, "allowed", "any", ""),
    ("...not a host identity (an unenrolled process presents its host's)",
     (policy("any", rules=[{"from": {"identities": ["*"]}}]),),
     f"{TD}/node/n1", "web", 80, "denied", "any", ""),
    ("...not an unauthenticated one", (policy("any", rules=[{"from": {"identities": ["*"]}}]),),
     "", "web", 80, "denied", "any", ""),
    ("a target '*' ALLOW closes every service",
     (policy("all", target="*", rules=[{"from": {"services": ["admin"]}}]),), BATCH, "db", 5432,
     "denied", "all", ""),
    ("several ALLOW policies: any one matching", (WEB_ALLOW, policy("web-admin", rules=[
        {"from": {"services": ["admin"]}}])), ADMIN, "web", 80, "allowed", "web-admin", ""),
    ("several ALLOW policies: none matching names them all", (WEB_ALLOW, policy("web-admin", rules=[
        {"from": {"services": ["admin"]}}])), BATCH, "web", 80, "denied", "web-admin",
     f"denied by AuthorizationPolicy web-admin (no rule of web-admin, web-allow allows {BATCH} "
     "to web:80)"),
    ("dry run: an ALLOW policy would close the service, traffic still flows",
     (policy("web-allow", dry=True, rules=[{"from": {"services": ["frontend"]}}]),), BATCH,
     "web", 80, "would deny", "web-allow",
     f"allowed by the mesh default ALLOW: no AuthorizationPolicy decides {BATCH} to web:80; "
     f"would be denied by AuthorizationPolicy web-allow (dry run: no rule allows {BATCH} to "
     "web:80)"),
    ("dry run: its callers would not be denied", (policy(
        "web-allow", dry=True, rules=[{"from": {"services": ["frontend"]}}]),), FRONTEND, "web",
     80, "allowed", "", ""),
    ("dry run DENY", (WEB_ALLOW, policy("no-frontend", action="DENY", dry=True,
                                         rules=[{"from": {"services": ["frontend"]}}])),
     FRONTEND, "web", 80, "would deny", "no-frontend",
     f"allowed by AuthorizationPolicy web-allow (rule 1 matches {FRONTEND} to web:80); would be "
     f"denied by AuthorizationPolicy no-frontend (dry run: rule 1 matches {FRONTEND} to web:80)"),
    ("dry run does not undo an enforced denial", (WEB_ALLOW, policy(
        "web-batch", dry=True, rules=[{"from": {"services": ["batch"]}}])), BATCH, "web", 80,
     "denied", "web-allow", ""),
    ("dry-run default DENY", (mesh("DENY", dry=True),), BATCH, "web", 80, "would deny", "",
     f"allowed by the mesh default ALLOW: no AuthorizationPolicy decides {BATCH} to web:80; "
     f"would be denied by the mesh default DENY (dry run): no AuthorizationPolicy decides "
     f"{BATCH} to web:80"),
    ("dry-run default DENY spares the callers an ALLOW policy names",
     (mesh("DENY", dry=True), WEB_ALLOW), FRONTEND, "web", 80, "allowed", "web-allow", ""),
    ("a dry-run ALLOW default changes nothing", (mesh("ALLOW", dry=True),), BATCH, "web", 80,
     "allowed", "", ""),
]


@pytest.mark.parametrize(("docs", "src", "dst", "port", "verdict", "by", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(docs: tuple[dict[str, Any], ...], src: str, dst: str, port: int, verdict: str,
                by: str, reason: str) -> None:
    t = table(*docs)
    d = t.decide(src, dst, port)
    assert (d.verdict, d.policy) == (verdict, by), d
    assert d.allowed == (verdict != "denied") and d.would_deny == (verdict == "would deny")
    if reason:
        assert d.reason == reason
    assert d.reason and "\n" not in d.reason
    assert t.decide(src, dst, port) is d  # remembered
    assert t.evaluate(src, dst, port) == d


def test_the_table_travels_to_the_workers_and_decides_the_same() -> None:
    t = table(mesh("DENY", dry=True), WEB_ALLOW, NO_BATCH,
              policy("api-dry", target="api", dry=True, rules=[{"from": {"services": ["web"]}}]))
    for codec in (msgspec.json, msgspec.msgpack):
        back = codec.decode(codec.encode(Security("STRICT", t)), type=Security).authz
        assert back == t
        for src in (FRONTEND, BATCH, "", f"{TD}/svc/web"):
            for dst in ("web", "api", "db"):
                assert back.decide(src, dst, 80) == t.decide(src, dst, 80)
    assert compile_authz({}) == AuthzTable() and Security().authz.decide("", "x", 1).allowed


def test_equal_resources_compile_to_equal_tables() -> None:
    a = table(WEB_ALLOW, NO_BATCH)
    b = table(NO_BATCH, WEB_ALLOW)
    assert msgspec.json.encode(a) == msgspec.json.encode(b)
    assert a.policies == 2 and a.shadow is None
    assert table(WEB_ALLOW, mesh("DENY", dry=True)).shadow is not None


def test_the_memory_of_decisions_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authz, "_MEMO_SIZE", 8)
    t = table(WEB_ALLOW)
    for i in range(20):
        assert not t.decide(f"{TD}/svc/c{i}", "web", 80).allowed
        assert len(t.__dict__["_memo"]) <= 8
    assert b"_memo" not in msgspec.json.encode(t)


def test_service_of() -> None:
    assert service_of(FRONTEND) == "frontend"
    for not_a_service in ("", "frontend", f"{TD}/node/n1", f"{TD}/svc/", f"{TD}/svc/a/b",
                          "spiffe://td", "spiffe:///svc/x/y", "http://td/svc/x"):
        assert service_of(not_a_service) is None, not_a_service


def test_decide_cost() -> None:
    """Benchmark-style (printed, not asserted): a decision with 50 policies in the table, 5 of
    them on the destination, cold (evaluated) and remembered (the data path's usual case)."""
    docs = [policy(f"p{i}", target=f"svc{i % 10}", rules=[
        {"from": {"services": [f"c{i}", f"d{i}"], "identities": [f"{TD}/node/*"]},
         "to": {"ports": [80, 8080]}}]) for i in range(48)]
    docs += [NO_BATCH, policy("dry", target="svc0", dry=True, action="DENY",
                              rules=[{"from": {"services": ["x"]}}])]
    t = table(*docs)
    cases = [(f"{TD}/svc/c40", "svc0", 8080), (f"{TD}/svc/zz", "svc0", 80),
             (f"{TD}/svc/x", "svc0", 80), (BATCH, "svc3", 80), ("", "other", 80)]
    n = 20_000
    for label, fn in (("evaluate (cold)", t.evaluate), ("decide (remembered)", t.decide)):
        start = time.perf_counter()
        for _ in range(n):
            for c in cases:
                fn(*c)
        us = (time.perf_counter() - start) / (n * len(cases)) * 1e6
        print(f"\nauthz {label}: {us:.2f} µs per decision (50 policies)")
    empty = AuthzTable()
    start = time.perf_counter()
    for _ in range(n):
        empty.evaluate(FRONTEND, "web", 80)
    print(f"authz evaluate, no policy: {(time.perf_counter() - start) / n * 1e6:.2f} µs")


# -- documents ------------------------------------------------------------------------------
def error(text: str) -> str:
    with pytest.raises(UsageError) as exc:
        parse_all(load_text(text, "f.yaml"))
    assert "\n" not in str(exc.value)
    return str(exc.value)


AP = "kind: AuthorizationPolicy\nname: p\nspec: "


@pytest.mark.parametrize(("spec", "expected"), [
    ("{target: web, rules: [{from: {service: [a]}}]}",
     "f.yaml#1 (AuthorizationPolicy p): spec.rules[0].from: object contains unknown field "
     "service"),
    ("{target: web, color: red}", "spec: object contains unknown field color"),
    ("{rules: []}", "spec: object missing required field target"),
    ("{target: ''}", "spec: target '' is neither a service name"),
    ("{target: Web}", "spec: target 'Web' is neither a service name"),
    ("{target: web, action: AUDIT}", "spec.action: invalid enum value 'AUDIT'"),
    ("{target: web, rules: [{from: {services: ['']}}]}",
     "spec.rules[0].from: service name '' is invalid"),
    ("{target: web, rules: [{to: {ports: [80]}}, {from: {services: [a_b]}}]}",
     "spec.rules[1].from: service name 'a_b' is invalid"),
    ("{target: web, rules: [{from: {identities: ['spiffe://td/svc/fr*']}}]}",
     "spec.rules[0].from: identity 'spiffe://td/svc/fr*' is not a SPIFFE ID pattern"),
    ("{target: web, rules: [{from: {identities: ['spiffe://td/*/web']}}]}",
     "is not a SPIFFE ID pattern"),
    ("{target: web, rules: [{from: {identities: ['spiffe://*/svc/web']}}]}",
     "is not a SPIFFE ID pattern"),
    ("{target: web, rules: [{from: {identities: ['frontend']}}]}", "is not a SPIFFE ID pattern"),
    ("{target: web, rules: [{from: {identities: ['spiffe://td/svc/../x']}}]}",
     "has a '.' or '..' path segment"),
    ("{target: web, rules: [{to: {ports: [0]}}]}",
     "spec.rules[0].to: port 0 is out of range 1-65535"),
    ("{target: web, rules: [{to: {ports: [65536]}}]}", "port 65536 is out of range"),
    ("{target: web, rules: [{to: {ports: ['80']}}]}",
     "spec.rules[0].to.ports[0]: expected int, got str"),
    ("{target: web, dryRun: 'yes'}", "spec.dryRun: expected bool, got str"),
])
def test_bad_policies_name_the_field(spec: str, expected: str) -> None:
    msg = error(AP + spec)
    assert expected in msg, msg
    assert "meshnode schema AuthorizationPolicy" in msg


def test_bad_mesh_defaults_name_the_field() -> None:
    msg = error("kind: Mesh\nname: mesh\nspec: {authorization: {default: deny}}")
    assert "spec.authorization.default: invalid enum value 'deny'" in msg, msg
    assert "unknown field dryrun" in error(
        "kind: Mesh\nname: mesh\nspec: {authorization: {dryrun: true}}")


def test_a_policy_document_round_trips_as_written() -> None:
    [r] = parse_all(load_text("""
kind: AuthorizationPolicy
name: web-allow
spec:
  target: web
  rules:
  - from: {services: [frontend], identities: ['spiffe://td/node/*'], unauthenticated: true}
    to: {ports: [8080]}
""", "p.yaml"))
    assert plain(r.to_doc()["spec"]) == {"target": "web", "rules": [
        {"from": {"services": ["frontend"], "identities": ["spiffe://td/node/*"],
                  "unauthenticated": True}, "to": {"ports": [8080]}}]}
    assert parse(r.to_doc()).spec == r.spec


def test_the_target_service_must_exist() -> None:
    web = Resource("Service", "web", ServicePolicy(port=80))
    [p] = parse_all([("p", WEB_ALLOW)])
    with pytest.raises(UsageError, match="AuthorizationPolicy web-allow refers to Service web, "
                                         "which does not exist"):
        plan({}, [p])
    assert [o.action for o in plan({}, [web, p])] == ["created", "created"]
    assert [o.action for o in plan({web.key: web}, [p])] == ["created"]
    [every] = parse_all([("p", NO_BATCH)])
    assert [o.action for o in plan({}, [every])] == ["created"]  # "*" names no service
    from meshnode.policy.store import Delete

    with pytest.raises(UsageError, match="does not exist after this change"):
        plan({web.key: web, p.key: p}, [], [Delete("Service", "web")])


def test_schema_shows_the_new_fields() -> None:
    text = msgspec.json.encode(spec_schema("AuthorizationPolicy")).decode()
    for field in ('"from"', '"unauthenticated"', '"dryRun"', '"ALLOW"', '"ports"'):
        assert field in text, field
    assert '"authorization"' in msgspec.json.encode(spec_schema("Mesh")).decode()


# -- suggest --------------------------------------------------------------------------------
SERVICES = {"web", "api", "db"}


def test_suggest_one_allow_policy_per_destination_listing_its_callers() -> None:
    s = suggest([Edge("frontend", "web", 10), Edge("admin", "web", 1), Edge("web", "api", 3),
                 Edge("web", "db", 0), Edge(f"{TD}/svc/cron", "api", 2),
                 Edge(f"{TD}/node/n2", "api", 1)], SERVICES)
    assert plain(s.docs()) == [
        {"kind": "AuthorizationPolicy", "name": "api-allow", "spec": {
            "target": "api", "rules": [{"from": {"services": ["cron", "web"],
                                                 "identities": [f"{TD}/node/n2"]}}]}},
        {"kind": "AuthorizationPolicy", "name": "web-allow", "spec": {
            "target": "web", "rules": [{"from": {"services": ["admin", "frontend"]}}]}},
    ]
    assert s.notes == []
    # what it suggests is what it observed: the callers allowed, anyone else denied
    t = compile_authz({r.key: r for r in s.policies})
    assert t.decide(f"{TD}/svc/frontend", "web", 80).allowed
    assert not t.decide(f"{TD}/svc/web", "web", 80).allowed
    assert t.decide(f"{TD}/svc/anyone", "db", 80).allowed  # no traffic seen: not closed


def test_suggest_notes_what_it_cannot_list_and_filters() -> None:
    stored = {("AuthorizationPolicy", "web-allow"): parse(WEB_ALLOW)}
    s = suggest([Edge("unknown", "web", 4), Edge("frontend", "web", 1), Edge("x", "gone", 2),
                 Edge("unknown", "api", 1)], SERVICES, only="web", dry_run=True, stored=stored)
    assert [d["name"] for d in s.docs()] == ["web-allow"]
    assert s.docs()[0]["spec"]["dryRun"] is True
    assert s.notes == [
        "web: 4 connections from callers the proxy could not identify (source unknown) are "
        "not in the policy and would be denied",
        "web: AuthorizationPolicy web-allow exists; applying replaces it (see the change "
        "first: meshnode diff -f FILE)"]
    gone = suggest([Edge("x", "gone", 2)], SERVICES)
    assert gone.policies == [] and gone.notes == [
        "gone: not a Service any more, no policy (2 connections from x)"]


def test_suggest_uses_ports_when_every_edge_of_a_caller_has_one() -> None:
    s = suggest([Edge("a", "web", 1, 8080), Edge("b", "web", 1, 8080), Edge("a", "web", 1, 9090),
                 Edge("c", "web", 1, None), Edge("c", "web", 1, 8080)], SERVICES)
    assert plain(s.docs()[0]["spec"]["rules"]) == [
        {"from": {"services": ["c"]}},
        {"from": {"services": ["b"]}, "to": {"ports": [8080]}},
        {"from": {"services": ["a"]}, "to": {"ports": [8080, 9090]}}]


def test_policy_names_stay_resource_names() -> None:
    long = "s" * 62 + "x"
    assert policy_name("web") == "web-allow"
    assert len(policy_name(long)) == 63
    parse(policy(policy_name("a" * 56 + "-b" * 3), target="web"))


class _FakeTelemetry:
    def __init__(self, pairs: list[tuple[str, str, int]]) -> None:
        self.pairs = pairs

    async def edges(self, window: float) -> tuple[float, list[tuple[str, str, Any]]]:
        return min(window, 42.0), [(s, d, SimpleNamespace(connections=n, active=0))
                                   for s, d, n in self.pairs]


def _suggest_op(pairs: list[tuple[str, str, int]], **args: Any) -> dict[str, Any]:
    from meshnode.agent.api import ControlApi

    web = Resource("Service", "web", ServicePolicy(port=80))
    parts = SimpleNamespace(node="n1", telemetry=_FakeTelemetry(pairs),
                            registry=SimpleNamespace(resources=lambda: {web.key: web}))
    api = ControlApi(parts)  # type: ignore[arg-type]
    result: dict[str, Any] = asyncio.run(api.authz_suggest(args))
    return result


def test_the_suggest_operation_and_what_the_cli_writes() -> None:
    from meshnode.cli.authz import parse_duration, render

    r = _suggest_op([("frontend", "web", 3), ("unknown", "web", 1)], window=600)
    assert (r["node"], r["window"], r["span"]) == ("n1", 600, 42.0)
    assert [e["src"] for e in r["edges"]] == ["frontend", "unknown"]
    text = render(r, "10m")
    assert text.startswith("# meshnode authz suggest: the callers this host's proxy (node n1) "
                           "saw in the last 10m")
    assert "# note: web: 1 connections from callers the proxy could not identify" in text
    # apply-able: what `meshnode apply -f` reads and validates
    [p] = parse_all(load_text(text, "suggested.yaml"))
    assert p.key == ("AuthorizationPolicy", "web-allow")
    assert p.spec.rules[0].from_.services == ("frontend",)
    assert _suggest_op([], window=60)["edges"] == []
    with pytest.raises(UsageError, match="no service named 'nope'"):
        _suggest_op([], window=60, service="nope")
    with pytest.raises(UsageError, match="invalid window"):
        _suggest_op([], window=3600)
    assert [parse_duration(t) for t in ("600", "90s", "10m", "0.5h")] == [600, 90, 600, 1800]
    for bad in ("", "10x", "-1m", "0"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def test_the_cli_says_when_the_window_saw_no_traffic(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from meshnode.cli import authz as cli

    answer: dict[str, Any] = {"node": "n1", "window": 600.0, "span": 600.0, "edges": [],
                              "policies": [], "notes": []}
    monkeypatch.setattr(cli, "client", lambda instance: SimpleNamespace(
        call=lambda op, **args: answer))
    with pytest.raises(NotFoundError, match=r"no traffic observed by this host's proxy \(node "
                                            r"n1\) in the last 10m: nothing to suggest"):
        cli.suggest(window="10m", service=None, output=None, dry_run=False, instance="x")
    answer.update(edges=[{"src": "unknown", "dst": "web", "connections": 1, "port": None}],
                  notes=["web: 1 connections from callers the proxy could not identify"])
    with pytest.raises(NotFoundError, match="no caller could be named"):
        cli.suggest(window="10m", service=None, output=None, dry_run=False, instance="x")
