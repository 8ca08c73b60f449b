"""`meshnode explain` without an agent: an `ExplainInputs` snapshot in, the verdict, steps and
candidates a user reads out. The process side is faked at the host boundary (which cgroup a
PID is in); tests/integration/test_explain.py checks the same against real connections."""

from __future__ import annotations

import dataclasses
import os
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meshnode.agent.explain import ExplainInputs, ejections, explain
from meshnode.discovery.registry import EndpointRecord, ServiceRecord
from meshnode.errors import UsageError
from meshnode.host import cgroup
from meshnode.model import BalancerConfig, HostPort, OutlierConfig
from meshnode.policy import compiler
from meshnode.policy.authz import AuthzTable, compile_authz
from meshnode.policy.document import parse_all
from meshnode.policy.resources import ServicePolicy

pytestmark = pytest.mark.timeout(10)

MOUNT = Path("/sys/fs/cgroup")
ROOT = MOUNT / "meshnode-t.slice"
PID = os.getpid()  # a real process; only its cgroup is faked


class Health:
    """Health verdicts: the listed addresses are down."""

    def __init__(self, *down: str) -> None:
        self.down = {HostPort.parse(a) for a in down}

    def healthy(self, service: str, addr: HostPort) -> bool:
        return addr not in self.down

    def describe(self, service: str, addr: HostPort) -> dict[str, Any]:
        ok = addr not in self.down
        return {"healthy": ok, "reason": "" if ok else "tcp connect failed"}


def service(name: str, sid: int, *eps: str, port: int | None = 80, fail_closed: bool = False,
            lb: str = "round-robin", locality: bool = True) -> ServiceRecord:
    policy = ServicePolicy(port=port, fail_mode="closed" if fail_closed else "open",
                           balancer=BalancerConfig(algorithm=lb, locality=locality),
                           outlier=OutlierConfig())
    return ServiceRecord(name, sid, IPv4Address(f"127.240.0.{sid}"), policy,
                         endpoints=frozenset(EndpointRecord(HostPort.parse(e), "static",
                                                            node="n1") for e in eps))


def inputs(*recs: ServiceRecord, ready: bool = True, health: Health | None = None,
           dns_port: int | None = None, node: str = "",
           ejected: dict[str, dict[str, float]] | None = None,
           authz: AuthzTable | None = None, trust_domain: str = "local") -> ExplainInputs:
    services = {r.name: r for r in recs}
    health = health or Health()
    totals = {name: {"endpoints": {a: {"ejected_for": s} for a, s in eps.items()}}
              for name, eps in (ejected or {}).items()}
    return ExplainInputs(
        services=services, pushed=compiler.snapshot(services, health.healthy), ready=ready,
        capture=compiler.capture_state(services, ready), backend="ebpf", capture_reason="test",
        outbound_port=15001, dns_port=dns_port, dns_suffix="mesh", node=node, zone="",
        cgroup_mount=MOUNT, root_cgroup=ROOT, enrollments=[{"pid": PID, "service": "client"}],
        health=health, ejected_for=ejections(totals), authz=authz or AuthzTable(),
        trust_domain=trust_domain)


@pytest.fixture(autouse=True)
def enrolled(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test process sits in the apps cgroup of service "client"."""
    monkeypatch.setattr(cgroup, "process_cgroup", lambda pid, mount: ROOT / "apps" / "client")


WEB = ("127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003")


def rows(e: dict[str, Any]) -> dict[str, tuple[bool, bool, float]]:
    return {c["addr"]: (c["healthy"], c["in_rotation"], c["ejected_for"])
            for c in e["candidates"]}


def test_a_vip_is_balanced_over_the_healthy_endpoints_not_ejected() -> None:
    inp = inputs(service("web", 1, *WEB), health=Health(WEB[2]),
                 ejected={"web": {WEB[1]: 42.0}})
    e = explain(inp, PID, "web.mesh:80")
    assert e["verdict"] == ("captured by ebpf → service web (VIP 127.240.0.1:80), round-robin "
                            "over 1 healthy endpoint, 1 ejected")
    assert (e["outcome"], e["rule"], e["captured"], e["name"]) == (
        "proxied", "a", True, "web.mesh")
    assert e["kernel"] == {"action": "redirect", "target": "127.0.0.1:15001", "match": "vip",
                           "endpoints": {}}
    assert rows(e) == {WEB[0]: (True, True, 0.0), WEB[1]: (True, False, 42.0),
                       WEB[2]: (False, False, 0.0)}
    assert "health: 2 of 3 healthy (down: 127.0.0.1:8003)" in e["steps"]
    assert f"outlier: 1 ejected ({WEB[1]} for 42s; per worker, the longest shown)" in e["steps"]
    assert e["steps"][-1] == "if the proxy is not ready: straight to 127.240.0.1:80 (fail-open)"


def test_when_every_candidate_is_ejected_all_are_used() -> None:
    inp = inputs(service("web", 1, *WEB[:2]), ejected={"web": {WEB[0]: 5.0, WEB[1]: 9.0}})
    e = explain(inp, PID, "127.240.0.1:80")
    assert e["verdict"].endswith("round-robin over 2 healthy endpoints"), e["verdict"]
    assert all(in_rotation for _, in_rotation, _ in rows(e).values())
    assert any(s.endswith("; all are, so all are used anyway") for s in e["steps"]), e["steps"]


def test_another_port_of_the_vip_and_no_candidate() -> None:
    inp = inputs(service("api", 2, "127.0.0.1:9000", "127.0.0.1:9001", port=None))
    e = explain(inp, PID, "127.240.0.2:9001")
    assert [c["addr"] for c in e["candidates"]] == ["127.0.0.1:9001"]
    assert "proxy rule (a): no service port → the endpoints listening on port 9001 are " \
           "candidates (1)" in e["steps"]
    n = explain(inp, PID, "127.240.0.2:7000")
    assert n["outcome"] == "no-endpoint" and n["candidates"] == []
    assert n["verdict"].endswith("but it has no endpoint on port 7000: the proxy refuses the "
                                 "connection (NoEndpoint)"), n["verdict"]


def test_an_endpoint_address_is_that_endpoint_or_passes_through_when_down() -> None:
    inp = inputs(service("web", 1, *WEB), health=Health(WEB[2]))
    b = explain(inp, PID, WEB[0])
    assert (b["rule"], b["outcome"], b["destination"]["kind"]) == ("b", "proxied", "endpoint")
    assert b["verdict"] == f"captured by ebpf → service web, endpoint {WEB[0]} only (an " \
                           "endpoint address is not balanced)"
    c = explain(inp, PID, WEB[2])
    assert (c["rule"], c["outcome"], c["captured"]) == ("c", "passthrough", True)
    assert rows(c) == {WEB[2]: (False, False, 0.0)}


def test_proxy_not_ready_fails_closed_or_open() -> None:
    inp = inputs(service("db", 3, "127.0.0.1:5432", port=5432, fail_closed=True),
                 service("web", 1, *WEB), ready=False)
    r = explain(inp, PID, "127.240.0.3:5432")
    assert (r["outcome"], r["captured"], r["kernel"]["action"]) == ("refused", False, "refuse")
    assert r["verdict"] == ("refused: the proxy is not ready and service db is fail-closed; "
                            "ebpf refuses the connect (connect fails with EPERM)")
    o = explain(inp, PID, "127.240.0.1:80")
    assert o["outcome"] == "direct" and o["verdict"].startswith(
        "not captured: the proxy is not ready and service web fails open"), o["verdict"]


def test_port_53_goes_to_the_agents_dns_while_it_redirects() -> None:
    inp = inputs(service("web", 1, *WEB), dns_port=15053)
    d = explain(inp, PID, "10.0.0.1:53")
    assert (d["outcome"], d["captured"], d["kernel"]["action"]) == ("dns", False, "dns")
    assert d["verdict"] == ("not proxied: a connect to port 53 is a DNS query; it goes to the "
                            "agent's DNS server 127.0.0.1:15053, answering as 10.0.0.1:53")
    off = explain(inputs(service("web", 1, *WEB)), PID, "10.0.0.1:53")
    assert off["outcome"] == "direct" and "not a mesh destination" in off["verdict"]


def test_locality_is_read_off_the_balancer_the_worker_would_build() -> None:
    near = explain(inputs(service("web", 1, *WEB), node="n1"), PID, "127.240.0.1:80")
    assert near["balancer"]["locality"].startswith("prefer this node (n1), then the rest")
    off = explain(inputs(service("web", 1, *WEB, locality=False), node="n1"), PID,
                  "127.240.0.1:80")
    assert off["balancer"]["locality"] == ""
    assert [c["tier"] for c in near["candidates"]] == ["this node"] * 3


def test_a_process_outside_the_apps_cgroup_is_never_captured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "process_cgroup", lambda pid, mount: MOUNT / "user.slice")
    e = explain(inputs(service("web", 1, *WEB)), PID, "127.240.0.1:80")
    assert (e["outcome"], e["captured"], e["candidates"]) == ("direct", False, [])
    assert e["verdict"].startswith(f"not captured: PID {PID} is not enrolled (cgroup "
                                   "/user.slice)"), e["verdict"]


def test_bad_destinations_are_usage_errors() -> None:
    inp = inputs(service("web", 1, *WEB))
    for dest in ("nonsense", "example.com:80"):
        with pytest.raises(UsageError):
            explain(inp, PID, dest)


def authz(*docs: dict[str, Any]) -> AuthzTable:
    rs = parse_all((f"doc{i}", d) for i, d in enumerate(docs))
    return compile_authz({r.key: r for r in rs})


def allow(*callers: str, dry: bool = False, ports: tuple[int, ...] = ()) -> dict[str, Any]:
    rule: dict[str, Any] = {"from": {"services": list(callers)}}
    if ports:
        rule["to"] = {"ports": list(ports)}
    return {"kind": "AuthorizationPolicy", "name": "web-allow",
            "spec": {"target": "web", "dryRun": dry, "rules": [rule]}}


def test_the_callers_identity_and_what_authorization_decides() -> None:
    e = explain(inputs(service("web", 1, *WEB)), PID, "web.mesh:80")
    assert e["process"]["identity"] == "spiffe://local/svc/client"
    assert "identity: spiffe://local/svc/client (no TrustBundle: trust domain local)" \
        in e["steps"]
    assert ("authorization (decided where the destination is): allowed by the mesh default "
            "ALLOW: no AuthorizationPolicy decides spiffe://local/svc/client to web:8001 (alike "
            "on ports 8002, 8003)") in e["steps"]
    assert e["steps"][-1].startswith("if the proxy is not ready")  # still the last word
    assert e["authorization"]["verdict"] == "allowed" and e["outcome"] == "proxied"
    assert [d["port"] for d in e["authorization"]["decisions"]] == [8001, 8002, 8003]
    assert e["verdict"].endswith("round-robin over 3 healthy endpoints")

    # a TrustBundle's trust domain names the identity; an allow-list without it denies
    d = explain(inputs(service("web", 1, *WEB), authz=authz(allow("frontend")),
                       trust_domain="prod.example"), PID, "127.240.0.1:80")
    assert "identity: spiffe://prod.example/svc/client" in d["steps"]
    assert d["outcome"] == "denied" and d["authorization"]["verdict"] == "denied"
    assert d["verdict"] == ("captured by ebpf → service web, then denied by AuthorizationPolicy "
                            "web-allow (no rule allows spiffe://prod.example/svc/client to "
                            "web:8001): the connection is reset")
    assert d["authorization"]["decisions"][0]["policy"] == "web-allow"
    ok = explain(inputs(service("web", 1, *WEB), authz=authz(allow("client"))), PID,
                 "127.240.0.1:80")
    assert ok["outcome"] == "proxied" and ok["authorization"]["verdict"] == "allowed"
    assert any("allowed by AuthorizationPolicy web-allow (rule 1 matches "
               "spiffe://local/svc/client to web:8001)" in step for step in ok["steps"])


def test_dry_run_and_per_port_decisions() -> None:
    w = explain(inputs(service("web", 1, *WEB), authz=authz(allow("frontend", dry=True))),
                PID, "127.240.0.1:80")
    assert w["outcome"] == "proxied" and w["authorization"]["verdict"] == "would deny"
    assert w["verdict"].endswith("; authorization would deny it once the dry run ends "
                                 "(AuthorizationPolicy web-allow)"), w["verdict"]
    mixed = explain(inputs(service("web", 1, *WEB), authz=authz(allow("client", ports=(8001,)))),
                    PID, "127.240.0.1:80")
    assert mixed["authorization"]["verdict"] == "mixed" and mixed["outcome"] == "proxied"
    assert mixed["verdict"].endswith("; authorization denies it on endpoint ports 8002, 8003")
    assert [s for s in mixed["steps"] if s.startswith("authorization, endpoint port")] == [
        "authorization, endpoint port 8001: allowed by AuthorizationPolicy web-allow (rule 1 "
        "matches spiffe://local/svc/client to web:8001)",
        "authorization, endpoint port 8002: denied by AuthorizationPolicy web-allow (no rule "
        "allows spiffe://local/svc/client to web:8002)",
        "authorization, endpoint port 8003: denied by AuthorizationPolicy web-allow (no rule "
        "allows spiffe://local/svc/client to web:8003)"]
    # rule (b): the endpoint's own port decides
    b = explain(inputs(service("web", 1, *WEB), authz=authz(allow("client", ports=(8001,)))),
                PID, WEB[1])
    assert b["outcome"] == "denied" and b["authorization"]["decisions"][0]["port"] == 8002
    default_deny = authz({"kind": "Mesh", "name": "mesh",
                          "spec": {"authorization": {"default": "DENY"}}})
    n = explain(inputs(service("web", 1, *WEB), authz=default_deny), PID, WEB[0])
    assert n["outcome"] == "denied" and "denied by the mesh default DENY" in n["verdict"]


def test_no_authorization_where_the_proxy_does_not_decide(
        monkeypatch: pytest.MonkeyPatch) -> None:
    deny = authz(allow("frontend"))
    c = explain(inputs(service("web", 1, *WEB), health=Health(WEB[2]), authz=deny), PID, WEB[2])
    assert c["outcome"] == "passthrough" and not c["authorization"]["applies"]
    assert "authorization: none: a passthrough connection has no destination service" \
        in c["steps"]
    n = explain(inputs(service("api", 2, port=None), authz=deny), PID, "127.240.0.2:7000")
    assert n["outcome"] == "no-endpoint" and not n["authorization"]["applies"]
    monkeypatch.setattr(cgroup, "process_cgroup", lambda pid, mount: MOUNT / "user.slice")
    o = explain(inputs(service("web", 1, *WEB), authz=deny), PID, "127.240.0.1:80")
    assert o["process"]["identity"] is None and o["authorization"] is None
    assert not any(s.startswith(("identity", "authorization")) for s in o["steps"])


def http_service(name: str, sid: int, *eps: str, protocol: str = "http") -> ServiceRecord:
    rec = service(name, sid, *eps)
    return dataclasses.replace(rec, policy=msgspec.structs.replace(rec.policy,
                                                                  protocol=protocol))


WEB_PATHS = {"kind": "AuthorizationPolicy", "name": "web-allow", "spec": {
    "target": "web", "rules": [{"from": {"services": ["client"]},
                                "to": {"methods": ["GET"], "paths": ["/api/*"]}}]}}
NO_ADMIN = {"kind": "AuthorizationPolicy", "name": "no-admin", "spec": {
    "target": "web", "action": "DENY", "dryRun": True,
    "rules": [{"to": {"paths": ["/api/admin/*"]}}]}}


def test_an_http_service_is_authorized_per_request() -> None:
    e = explain(inputs(http_service("web", 1, *WEB), authz=authz(WEB_PATHS, NO_ADMIN)), PID,
                "web.mesh:80")
    assert e["outcome"] == "proxied" and e["authorization"]["verdict"] == "allowed"
    assert ("authorization (decided where the destination is): allowed by AuthorizationPolicy "
            "web-allow (rule 1 matches spiffe://local/svc/client to web:8001; its methods and "
            "paths are checked per request) (alike on ports 8002, 8003)") in e["steps"]
    assert ("requests: port 80 is http: each request is authorized where it is routed, by its "
            "method and path; policies with HTTP conditions: no-admin (DENY, dry run), "
            "web-allow (ALLOW)") in e["steps"]
    assert e["authorization"]["protocol"] == "http"
    assert e["authorization"]["http_policies"] == [
        {"name": "no-admin", "action": "DENY", "dry_run": True},
        {"name": "web-allow", "action": "ALLOW", "dry_run": False}]
    assert "request" not in e["authorization"]


def test_explain_a_request() -> None:
    inp = inputs(http_service("web", 1, *WEB), authz=authz(WEB_PATHS, NO_ADMIN))
    ok = explain(inp, PID, "web.mesh:80", "GET", "/api/users")
    assert ok["authorization"]["request"]["verdict"] == "allowed"
    assert ok["verdict"].endswith("round-robin over 3 healthy endpoints"), ok["verdict"]
    no = explain(inp, PID, "web.mesh:80", "POST", "/api/users")
    assert ("request POST /api/users (decided where it is routed): denied by "
            "AuthorizationPolicy web-allow (no rule allows spiffe://local/svc/client to POST "
            "/api/users on web:8001) (alike on ports 8002, 8003)") in no["steps"]
    assert no["outcome"] == "proxied"  # the connection is; the request is answered denied
    assert no["verdict"].endswith("; the request POST /api/users is denied "
                                  "(AuthorizationPolicy web-allow)"), no["verdict"]
    assert [d["verdict"] for d in no["authorization"]["request"]["decisions"]] == ["denied"] * 3
    dry = explain(inp, PID, "web.mesh:80", "GET", "/api/x/../admin/x")
    assert dry["verdict"].endswith("; the request GET /api/x/../admin/x would be denied once "
                                   "the dry run ends (AuthorizationPolicy no-admin)")
    assert explain(inp, PID, "web.mesh:80", path="/api/x")["authorization"]["request"][
        "method"] == "GET"
    for method, path in (("get", "/"), ("GET", "api"), ("GET", "/a\nb")):
        with pytest.raises(UsageError):
            explain(inp, PID, "web.mesh:80", method, path)


def test_a_tcp_port_is_decided_as_opaque_bytes() -> None:
    inp = inputs(service("web", 1, *WEB), authz=authz(WEB_PATHS))
    e = explain(inp, PID, "web.mesh:80", "GET", "/api/x")
    assert e["outcome"] == "denied"
    assert e["verdict"] == (
        "captured by ebpf → service web, then denied by AuthorizationPolicy web-allow (no rule "
        "allows spiffe://local/svc/client to web:8001 as opaque TCP (no request to check "
        "methods or paths on)): the connection is reset")
    assert ("request GET /api/x: port 80 is tcp: the proxy sees no requests on it, only the "
            "connection is decided") in e["steps"]
    assert any(s.startswith("requests: port 80 is tcp, relayed as bytes: the methods and "
                            "paths of web-allow (ALLOW) are never checked") for s in e["steps"])
    auto = explain(inputs(http_service("web", 1, *WEB, protocol="auto"),
                          authz=authz(WEB_PATHS)), PID, "web.mesh:80")
    assert auto["outcome"] == "proxied"
    assert any(s.startswith("if the client does not speak HTTP (auto relays it as tcp): denied")
               for s in auto["steps"])


def test_the_cli_passes_the_request_to_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from meshnode.cli import explain as cli
    from meshnode.cli.app import app
    from typer.testing import CliRunner

    calls: list[dict[str, Any]] = []
    answer = {"verdict": "captured", "steps": ["request GET /x: allowed"], "candidates": []}
    monkeypatch.setattr(cli, "client", lambda instance: SimpleNamespace(
        call=lambda op, **args: calls.append({"op": op, **args}) or answer))
    result = CliRunner().invoke(app, ["explain", "42", "web.mesh:80", "--method", "GET",
                                      "--path", "/x"])
    assert result.exit_code == 0, result.output
    assert "  1. request GET /x: allowed" in result.output
    CliRunner().invoke(app, ["explain", "42", "web.mesh:80"])
    assert calls == [{"op": "explain", "pid": 42, "dest": "web.mesh:80", "method": "GET",
                      "path": "/x"},
                     {"op": "explain", "pid": 42, "dest": "web.mesh:80"}]
