"""Authorization at L7: `to.methods` and `to.paths` as documents (what a user writes and the one
line they get back when it is wrong), `AuthzTable.decide` for a connection before its requests,
for an opaque connection and for each request (the semantics written in
meshnode/policy/authz.py), path normalization, the apply-time check that the target Service has
an HTTP port, the per-request counting in the worker, `authz suggest` from requests, and the
cost of a request decision (printed)."""

from __future__ import annotations

import timeit
from functools import partial
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.errors import UsageError
from meshnode.policy import authz
from meshnode.policy.authz import AuthzTable, compile_authz
from meshnode.policy.document import load_text, parse, parse_all
from meshnode.policy.resources import Resource, ServicePolicy, normalize_path, spec_schema
from meshnode.policy.store import Delete, plan
from meshnode.policy.suggest import Edge, suggest
from meshnode.proxy.stats import WorkerStats
from meshnode.proxy.tunnel import MeshSecurity
from meshnode.wire import Security

pytestmark = pytest.mark.timeout(60)

TD = "spiffe://td"
FRONTEND, BATCH, GRPC = f"{TD}/svc/frontend", f"{TD}/svc/batch", f"{TD}/svc/grpc"


def policy(name: str, target: str = "web", action: str = "ALLOW", dry: bool = False,
           rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"target": target, "action": action, "rules": rules or []}
    if dry:
        spec["dryRun"] = True
    return {"kind": "AuthorizationPolicy", "name": name, "spec": spec}


def table(*docs: dict[str, Any]) -> AuthzTable:
    resources = parse_all((f"doc{i}", d) for i, d in enumerate(docs))
    return compile_authz({r.key: r for r in resources})


# frontend may GET the API and the health check; grpc may call two gRPC services' methods
WEB_ALLOW = policy("web-allow", rules=[
    {"from": {"services": ["frontend"]}, "to": {"methods": ["GET"],
                                                "paths": ["/api/*", "/healthz"]}},
    {"from": {"services": ["grpc"]}, "to": {"methods": ["POST"],
                                            "paths": ["/pkg.Users/*", "/pkg.Orders/Get"]}}])
NO_ADMIN = policy("no-admin", action="DENY", rules=[{"to": {"paths": ["/admin/*"]}}])
OPEN = policy("open", rules=[{"from": {"services": ["frontend", "batch"]}}])
NO_DELETE_DRY = policy("no-delete", action="DENY", dry=True,
                       rules=[{"to": {"methods": ["DELETE"]}}])

Q = None  # no request: the connection
# (what is applied, caller, method, path (Q: the connection; "tcp": an opaque connection)) ->
# (verdict, deciding policy, reason ("": not checked))
CASES: list[tuple[str, tuple[dict[str, Any], ...], str, str | None, str | None, str, str,
                  str]] = [
    ("connection: an ALLOW rule with methods and paths lets it in, its requests are checked",
     (WEB_ALLOW,), FRONTEND, Q, Q, "allowed", "web-allow",
     f"allowed by AuthorizationPolicy web-allow (rule 1 matches {FRONTEND} to web:8080; its "
     "methods and paths are checked per request)"),
    ("connection: a caller no rule names is denied", (WEB_ALLOW,), BATCH, Q, Q, "denied",
     "web-allow", f"denied by AuthorizationPolicy web-allow (no rule allows {BATCH} to "
                  "web:8080)"),
    ("request: method and path allowed", (WEB_ALLOW,), FRONTEND, "GET", "/api/users/7",
     "allowed", "web-allow", f"allowed by AuthorizationPolicy web-allow (rule 1 matches "
                             f"{FRONTEND} to GET /api/users/7 on web:8080)"),
    ("request: another method is not", (WEB_ALLOW,), FRONTEND, "POST", "/api/users", "denied",
     "web-allow", f"denied by AuthorizationPolicy web-allow (no rule allows {FRONTEND} to "
                  "POST /api/users on web:8080)"),
    ("request: a prefix takes its root", (WEB_ALLOW,), FRONTEND, "GET", "/api", "allowed",
     "web-allow", ""),
    ("request: ...and whole segments only", (WEB_ALLOW,), FRONTEND, "GET", "/apix", "denied",
     "web-allow", ""),
    ("request: an exact path", (WEB_ALLOW,), FRONTEND, "GET", "/healthz", "allowed",
     "web-allow", ""),
    ("request: ...is not a prefix", (WEB_ALLOW,), FRONTEND, "GET", "/healthz/x", "denied",
     "web-allow", ""),
    ("request: the query is not the path", (WEB_ALLOW,), FRONTEND, "GET", "/healthz?full=1",
     "allowed", "web-allow",
     f"allowed by AuthorizationPolicy web-allow (rule 1 matches {FRONTEND} to GET "
     "/healthz?full=1 (normalized /healthz) on web:8080)"),
    ("request: a rule's caller is still checked", (WEB_ALLOW,), BATCH, "GET", "/api/x",
     "denied", "web-allow", ""),
    ("gRPC: a method of a listed service", (WEB_ALLOW,), GRPC, "POST", "/pkg.Users/List",
     "allowed", "web-allow", f"allowed by AuthorizationPolicy web-allow (rule 2 matches {GRPC} "
                             "to POST /pkg.Users/List on web:8080)"),
    ("gRPC: one listed method", (WEB_ALLOW,), GRPC, "POST", "/pkg.Orders/Get", "allowed",
     "web-allow", ""),
    ("gRPC: not its siblings", (WEB_ALLOW,), GRPC, "POST", "/pkg.Orders/Delete", "denied",
     "web-allow", ""),
    ("gRPC: nor a service whose name starts alike", (WEB_ALLOW,), GRPC, "POST",
     "/pkg.UsersAdmin/List", "denied", "web-allow", ""),
    ("connection: a DENY rule with paths does not deny the connection", (NO_ADMIN,), BATCH, Q,
     Q, "allowed", "", f"allowed by the mesh default ALLOW: no AuthorizationPolicy decides "
                       f"{BATCH} to web:8080"),
    ("request: it denies the requests it names", (NO_ADMIN,), BATCH, "GET", "/admin/users",
     "denied", "no-admin", f"denied by AuthorizationPolicy no-admin (rule 1 matches {BATCH} to "
                           "GET /admin/users on web:8080)"),
    ("request: ...and no other", (NO_ADMIN,), BATCH, "GET", "/administrator", "allowed", "", ""),
    ("request: DENY wins over an ALLOW that takes the request", (OPEN, NO_ADMIN), FRONTEND,
     "GET", "/admin", "denied", "no-admin", ""),
    ("request: the ALLOW decides the rest", (OPEN, NO_ADMIN), FRONTEND, "GET", "/x", "allowed",
     "open", f"allowed by AuthorizationPolicy open (rule 1 matches {FRONTEND} to GET /x on "
             "web:8080)"),
    ("request: dot segments cannot step past a DENY", (OPEN, NO_ADMIN), FRONTEND, "GET",
     "/public/../admin/x", "denied", "no-admin",
     f"denied by AuthorizationPolicy no-admin (rule 1 matches {FRONTEND} to GET "
     "/public/../admin/x (normalized /admin/x) on web:8080)"),
    ("request: nor doubled slashes", (OPEN, NO_ADMIN), FRONTEND, "GET", "//admin", "denied",
     "no-admin", ""),
    ("request: nor escapes", (OPEN, NO_ADMIN), FRONTEND, "GET", "/%61dmin/x", "denied",
     "no-admin", ""),
    ("request: nor encoded slashes", (OPEN, NO_ADMIN), FRONTEND, "GET", "/x%2F..%2Fadmin",
     "denied", "no-admin", ""),
    ("request: nor an absolute-form target", (OPEN, NO_ADMIN), FRONTEND, "GET",
     "http://web.mesh/admin/x", "denied", "no-admin", ""),
    ("request: '*' (OPTIONS *) is no path a rule names", (WEB_ALLOW,), FRONTEND, "GET", "*",
     "denied", "web-allow", ""),
    ("opaque: an ALLOW rule with paths cannot allow bytes", (WEB_ALLOW,), FRONTEND, "tcp", Q,
     "denied", "web-allow", f"denied by AuthorizationPolicy web-allow (no rule allows "
                            f"{FRONTEND} to web:8080 as opaque TCP (no request to check "
                            "methods or paths on))"),
    ("opaque: a DENY rule with paths matches on its other conditions", (OPEN, NO_ADMIN),
     FRONTEND, "tcp", Q, "denied", "no-admin", ""),
    ("opaque: rules without HTTP conditions decide as ever", (OPEN,), FRONTEND, "tcp", Q,
     "allowed", "open", ""),
    ("dry run: a request the dry-run DENY names would be denied", (OPEN, NO_DELETE_DRY),
     FRONTEND, "DELETE", "/x", "would deny", "no-delete",
     f"allowed by AuthorizationPolicy open (rule 1 matches {FRONTEND} to DELETE /x on "
     f"web:8080); would be denied by AuthorizationPolicy no-delete (dry run: rule 1 matches "
     f"{FRONTEND} to DELETE /x on web:8080)"),
    ("dry run: the others are allowed", (OPEN, NO_DELETE_DRY), FRONTEND, "GET", "/x",
     "allowed", "open", ""),
    ("dry run: the connection is not counted as would-deny", (OPEN, NO_DELETE_DRY), FRONTEND,
     Q, Q, "allowed", "open", ""),
    ("dry run: an enforced denial stays one", (WEB_ALLOW, NO_DELETE_DRY), BATCH, "DELETE", "/x",
     "denied", "web-allow", ""),
    ("dry-run ALLOW with paths: a request it does not take would be denied",
     (policy("web-dry", dry=True, rules=[{"to": {"methods": ["GET"]}}]),), FRONTEND, "POST",
     "/x", "would deny", "web-dry", ""),
]


@pytest.mark.parametrize(("docs", "src", "method", "path", "verdict", "by", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(docs: tuple[dict[str, Any], ...], src: str, method: str | None,
                path: str | None, verdict: str, by: str, reason: str) -> None:
    t = table(*docs)
    opaque = method == "tcp"
    if opaque:
        method = None
    d = t.decide(src, "web", 8080, method, path, opaque=opaque)
    assert (d.verdict, d.policy) == (verdict, by), d
    assert d.allowed == (verdict != "denied") and d.would_deny == (verdict == "would deny")
    if reason:
        assert d.reason == reason
    assert d.reason and "\n" not in d.reason
    assert t.evaluate(src, "web", 8080, method, path, opaque=opaque) == d  # memory changes nothing
    assert t.decide(src, "web", 8080, method, path, opaque=opaque) == d


def test_ports_and_http_conditions_must_all_hold() -> None:
    t = table(policy("p", rules=[{"to": {"ports": [8080], "methods": ["GET"]}}]))
    assert t.decide(FRONTEND, "web", 8080, "GET", "/").allowed
    assert not t.decide(FRONTEND, "web", 9090, "GET", "/").allowed
    assert not t.decide(FRONTEND, "web", 8080, "PUT", "/").allowed
    assert not t.decide(FRONTEND, "web", 9090).allowed  # the connection: no rule has 9090


def test_a_service_without_http_conditions_decides_requests_as_its_connection() -> None:
    t = table(WEB_ALLOW, policy("api-allow", target="api",
                                rules=[{"from": {"services": ["frontend"]}}]))
    assert t.http_targets == frozenset({"web"}) and not t.http_all
    conn = t.decide(FRONTEND, "api", 80)
    assert t.decide(FRONTEND, "api", 80, "DELETE", "/anything") is conn
    assert t.decide(FRONTEND, "api", 80, opaque=True) is conn
    assert t.decide(FRONTEND, "db", 80, "GET", "/") is t.decide(FRONTEND, "db", 80)
    every = table(policy("all-get", target="*", rules=[{"to": {"methods": ["GET"]}}]))
    assert every.http_all and not every.decide(BATCH, "db", 80, "PUT", "/").allowed


def test_any_path_is_no_condition() -> None:
    t = table(policy("p", rules=[{"from": {"services": ["batch"]}, "to": {"paths": ["*"]}}]),
              policy("q", action="DENY", rules=[{"from": {"services": ["frontend"]},
                                                 "to": {"paths": ["/*"]}}]))
    assert t.http_targets == frozenset()  # rules on any path are connection rules
    assert t.decide(BATCH, "web", 80).allowed and t.decide(BATCH, "web", 80, opaque=True).allowed
    assert t.decide(FRONTEND, "web", 80).policy == "q"


def test_the_table_travels_and_decides_requests_the_same() -> None:
    t = table(WEB_ALLOW, NO_ADMIN, NO_DELETE_DRY, OPEN)
    for codec in (msgspec.json, msgspec.msgpack):
        back = codec.decode(codec.encode(Security("STRICT", t)), type=Security).authz
        assert back == t
        for src in (FRONTEND, BATCH, GRPC, ""):
            for method, path in (("GET", "/api/x"), ("DELETE", "/admin"), ("POST", "/x")):
                assert back.decide(src, "web", 80, method, path) == \
                    t.decide(src, "web", 80, method, path)


def test_the_memory_of_request_plans_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authz, "_MEMO_SIZE", 8)
    t = table(WEB_ALLOW)
    for i in range(20):
        assert not t.decide(f"{TD}/svc/c{i}", "web", 80, "GET", f"/api/{i}").allowed
        assert len(t.__dict__["_plans"]) <= 8
    assert b"_plans" not in msgspec.json.encode(t)


@settings(max_examples=300, deadline=None)
@given(method=st.text(max_size=30), path=st.text(max_size=300), port=st.integers(1, 65535),
       src=st.sampled_from([FRONTEND, BATCH, GRPC, "", f"{TD}/node/n1"]))
def test_decide_never_raises_and_says_why_on_one_line(method: str, path: str, port: int,
                                                      src: str) -> None:
    t = _FUZZ_TABLE
    d = t.decide(src, "web", port, method, path)
    assert isinstance(d.allowed, bool) and d.reason and "\n" not in d.reason
    assert t.decide(src, "web", port, None, None, opaque=True).reason
    normal = normalize_path(path)
    if normal == "/admin" or normal.startswith("/admin/"):
        assert not d.allowed and d.policy == "no-admin"


_FUZZ_TABLE = table(WEB_ALLOW, NO_ADMIN, NO_DELETE_DRY,
                    policy("web-more", rules=[{"from": {"services": ["batch"]}}]))


# -- paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "normal"), [
    ("/api/users", "/api/users"), ("/", "/"), ("/a/", "/a/"), ("/a/../admin", "/admin"),
    ("//admin", "/admin"), ("/%61dmin", "/admin"), ("/x%2F..%2Fadmin", "/admin"),
    ("/a\\..\\b", "/b"), ("/a/b/..", "/a/"), ("/..", "/"), ("/a/.", "/a/"),
    ("/a?b=/../c", "/a"), ("/a#x", "/a"), ("/%c3%a9", "/%C3%A9"),
    ("/%252e%252e/admin", "/%252e%252e/admin"), ("/.well-known/x", "/.well-known/x"),
    ("http://web.mesh:80/a/./b?x", "/a/b"), ("HTTPS://h", "/"), ("*", "*"),
    ("web.mesh:443", "web.mesh:443"), ("", ""),
])
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([*"/.%\\?#ab", "%2e", "%2F", "%5c", "%41", "%zz", "%25",
                                 "//", "/..", "/."]), max_size=30)
       .map(lambda parts: "/" + "".join(parts)) | st.text(max_size=60))
def test_normalizing_is_idempotent_and_leaves_no_dot_segments(raw: str) -> None:
    once = normalize_path(raw)
    assert normalize_path(once) == once
    if once.startswith("/"):
        segments = once.split("/")[1:-1]  # the last may be empty: a trailing slash
        assert "." not in segments and ".." not in segments and "" not in segments
        assert "\\" not in once and "?" not in once and "#" not in once


# -- documents ------------------------------------------------------------------------------
def error(text: str) -> str:
    with pytest.raises(UsageError) as exc:
        parse_all(load_text(text, "f.yaml"))
    assert "\n" not in str(exc.value)
    return str(exc.value)


AP = "kind: AuthorizationPolicy\nname: p\nspec: "


@pytest.mark.parametrize(("to", "expected"), [
    ("{methods: [get]}", "spec.rules[0].to: method 'get' is not an HTTP method: write it in "
                         "capitals, e.g. GET (gRPC calls are POST)"),
    ("{methods: ['']}", "method '' is not an HTTP method"),
    ("{methods: [GET, 'PO ST']}", "method 'PO ST' is not an HTTP method"),
    ("{paths: [api]}", "spec.rules[0].to: path 'api' must start with '/' (or be '*': any "
                       "path)"),
    ("{paths: ['']}", "path '' must start with '/'"),
    ("{paths: ['/api*']}", "path '/api*': '*' is only allowed as the whole last segment"),
    ("{paths: ['/*/x']}", "'*' is only allowed as the whole last segment"),
    ("{paths: ['/a b']}", "path '/a b' holds a character a path cannot carry as it is"),
    ("{paths: ['/a?x=1']}", "path '/a?x=1' holds a character"),
    ("{paths: ['/%zz']}", "path '/%zz' has a '%' not followed by two hex digits"),
    ("{paths: ['/a/../b']}", "path '/a/../b' is not in normal form (requests are matched "
                             "normalized): write '/b'"),
    ("{paths: ['//a/*']}", "write '/a/*'"),
    ("{paths: ['/a//*']}", "write '/a/*'"),
    ("{paths: ['/%61pi']}", "write '/api'"),
    ("{paths: '/a'}", "spec.rules[0].to.paths: expected array, got str"),
])
def test_bad_http_conditions_name_the_field_and_the_fix(to: str, expected: str) -> None:
    msg = error(AP + "{target: web, rules: [{to: " + to + "}]}")
    assert expected in msg, msg


def test_http_conditions_round_trip_and_show_in_the_schema() -> None:
    [r] = parse_all([("p", WEB_ALLOW)])
    back = parse(msgspec.json.decode(msgspec.json.encode(r.to_doc())))
    assert back.spec == r.spec
    assert r.spec.rules[1].to.paths == ("/pkg.Users/*", "/pkg.Orders/Get")
    text = msgspec.json.encode(spec_schema("AuthorizationPolicy")).decode()
    assert '"methods"' in text and '"paths"' in text and "/package.Service/Method" in text


def _svc(name: str, **spec: Any) -> Resource:
    return parse({"kind": "Service", "name": name, "spec": spec})


def test_http_conditions_need_an_http_port_on_the_target() -> None:
    [p] = parse_all([("p", WEB_ALLOW)])
    tcp, http = _svc("web", port=80), _svc("web", port=80, protocol="http")
    with pytest.raises(UsageError) as exc:
        plan({tcp.key: tcp}, [p])
    assert exc.value.message == (
        "AuthorizationPolicy web-allow has rules with HTTP methods or paths, but Service web "
        "has no HTTP port (every port is tcp): they could never be checked")
    assert exc.value.hint == ("set Service web's protocol (or a port's) to http, http2, grpc "
                              "or auto, or remove the methods and paths from "
                              "AuthorizationPolicy web-allow")
    assert [o.action for o in plan({http.key: http}, [p])] == ["created"]
    assert [o.action for o in plan({}, [http, p])] == ["created", "created"]
    one_port = _svc("web", port=80, ports=[{"port": 8080, "protocol": "grpc"}])
    assert [o.action for o in plan({one_port.key: one_port}, [p])] == ["created"]
    # a stored policy keeps its Service from going back to tcp
    with pytest.raises(UsageError, match="has no HTTP port"):
        plan({http.key: http, p.key: p}, [tcp])
    assert [o.action for o in plan({http.key: http, p.key: p}, [tcp],
                                   [Delete("AuthorizationPolicy", "web-allow")])] == \
        ["configured", "deleted"]
    # a policy without HTTP conditions, and one on every service, need no HTTP port
    [plain, every] = parse_all([("a", OPEN), ("b", policy("g", target="*", rules=[
        {"to": {"methods": ["GET"]}}]))])
    assert [o.action for o in plan({tcp.key: tcp}, [plain, every])] == ["created", "created"]


# -- the worker -----------------------------------------------------------------------------
def test_the_worker_counts_denied_and_would_deny_requests() -> None:
    stats = WorkerStats()
    sec = MeshSecurity("n1", stats, lambda service: ServicePolicy(), 1.0)
    sec.apply(Security("PERMISSIVE", table(WEB_ALLOW, NO_DELETE_DRY)))
    assert sec.authorize_request(FRONTEND, "web", 80, "GET", "/api/x").allowed
    for _ in range(2):
        assert not sec.authorize_request(FRONTEND, "web", 80, "GET", "/admin").allowed
    assert sec.authorize_request(FRONTEND, "web", 80, "DELETE", "/api/x").allowed is False
    sec.apply(Security("PERMISSIVE", table(OPEN, NO_DELETE_DRY)))
    assert sec.authorize_request(FRONTEND, "web", 80, "DELETE", "/x").would_deny
    assert stats.labelled["authz_denied"] == {(FRONTEND, "web", "web-allow"): 3}
    assert stats.labelled["authz_would_deny"] == {(FRONTEND, "web", "no-delete"): 1}


# -- suggest --------------------------------------------------------------------------------
def test_suggest_lists_the_methods_and_route_paths_each_caller_used() -> None:
    web = _svc("web", port=80, protocol="http", http={"routes": [
        {"name": "api", "match": {"pathPrefix": "/api/"}},
        {"name": "login", "match": {"pathExact": "/login"}},
        {"name": "any-get", "match": {"methods": ["GET"]}}]})
    stored = {web.key: web}
    edges = [Edge("frontend", "web", 5, 80, (("api", "GET"), ("api", "POST"),
                                             ("login", "POST"))),
             Edge("batch", "web", 2, 80, (("api", "GET"), ("login", "POST"))),
             Edge("cron", "web", 1, 80, (("default", "GET"), ("any-get", "GET"))),
             Edge("probe", "web", 1, 80, (("api", "other"),)),
             Edge("admin", "web", 1, 80)]
    s = suggest(edges, {"web"}, stored=stored)
    rules = msgspec.json.decode(msgspec.json.encode(s.docs()[0]["spec"]["rules"]))
    assert rules == [
        {"from": {"services": ["admin"]}, "to": {"ports": [80]}},
        {"from": {"services": ["probe"]}, "to": {"ports": [80], "paths": ["/api/*"]}},
        {"from": {"services": ["cron"]}, "to": {"ports": [80], "methods": ["GET"]}},
        {"from": {"services": ["batch"]},
         "to": {"ports": [80], "methods": ["GET"], "paths": ["/api/*"]}},
        {"from": {"services": ["frontend"]},
         "to": {"ports": [80], "methods": ["GET", "POST"], "paths": ["/api/*"]}},
        {"from": {"services": ["batch", "frontend"]},
         "to": {"ports": [80], "methods": ["POST"], "paths": ["/login"]}}]
    assert s.notes == ["web: an HTTP service, but the requests of admin were not recorded: "
                       "their rules allow every method and path (narrow them with to.methods "
                       "and to.paths, checked per request)"]
    # what it suggests takes what was seen, and nothing else
    t = compile_authz({**stored, **{r.key: r for r in s.policies}})
    assert t.decide(f"{TD}/svc/batch", "web", 80, "GET", "/api/users").allowed
    assert not t.decide(f"{TD}/svc/batch", "web", 80, "POST", "/api/users").allowed
    assert t.decide(f"{TD}/svc/frontend", "web", 80, "POST", "/login").allowed
    assert not t.decide(f"{TD}/svc/cron", "web", 80, "POST", "/login").allowed
    plan(stored, s.policies)  # and it applies: the Service has its HTTP port


def test_suggest_keeps_connection_rules_for_tcp_services() -> None:
    db = _svc("db", port=5432)
    s = suggest([Edge("web", "db", 3, 5432, (("default", "GET"),))], {"db"},
                stored={db.key: db})
    to = s.policies[0].spec.rules[0].to
    assert (to.ports, to.methods, to.paths) == ((5432,), (), ())
    assert s.notes == []


# -- cost -----------------------------------------------------------------------------------
def test_request_decision_cost() -> None:
    """Benchmark-style (printed, not asserted): timeit of decide() per request with 50
    policies in the table, 4 on the destination with paths, a dry-run one among them."""
    docs = [policy(f"p{i}", target=f"svc{i % 10}", rules=[
        {"from": {"services": [f"c{i}"]}, "to": {"ports": [80, 8080]}}]) for i in range(46)]
    docs += [WEB_ALLOW, NO_ADMIN, NO_DELETE_DRY, policy("web-more", rules=[
        {"from": {"services": ["batch"]}, "to": {"paths": ["/batch/*", "/jobs/*"]}}])]
    t = table(*docs)
    cases = {
        "no policy with paths on the service": (FRONTEND, "svc3", 80, "GET", "/api/users/1"),
        "allowed by a path prefix": (FRONTEND, "web", 80, "GET", "/api/users/12345"),
        "denied, no rule takes it": (FRONTEND, "web", 80, "GET", "/other/x"),
        "gRPC method allowed": (GRPC, "web", 80, "POST", "/pkg.Users/List"),
        "a path to normalize": (FRONTEND, "web", 80, "GET", "/api/../api/x?q=1"),
        "connection (remembered)": (FRONTEND, "web", 80, None, None),
    }
    n, best = 10_000, dict.fromkeys(cases, float("inf"))
    for _ in range(7):  # interleaved, the best of each: the machine is shared
        for label, args in cases.items():
            best[label] = min(best[label], timeit.timeit(partial(t.decide, *args), number=n))
    for label, seconds in best.items():
        print(f"\nauthz decide per request, {label}: {seconds / n * 1e6:.2f} µs")

