"""HTTP across hosts: three namespaces on a bridge, an agent each, one etcd, host 0 the mesh CA.
Service `web` (http, STRICT) has an endpoint on host 1 and one on host 2; its client runs on
host 0. What the request path must do between hosts, checked where it shows: the replies
(which endpoint answered, status codes, the proxy's error header), each host's /metrics (the
identities the endpoint hosts accepted, the requests the client host counted, how few tunnel
connections carried them), and the client while an endpoint's host is lost under load.
Services `mixed` (auto), `slow` (a short TCP idle timeout) and `web2` (http2) have endpoints on
the same two hosts.

A request to another host's endpoint rides a pooled mTLS tunnel (proxy/http/dial.py: TLS 1.3
presenting the client service's certificate, a preamble with requests=True, the answer, then
HTTP/1.1 or HTTP/2 over it); its authorization is decided per request on the client's host
(proxy/http/front.py) and per connection on the endpoint's (proxy/inbound.py). Counters reach
/metrics about once a second: the tests wait for the values they expect, with a deadline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fabric import Fabric
from tests.harness import Host, wait_for
from tests.integration.test_traffic import (
    Background,
    Row,
    apply,
    errors,
    load,
    share,
    split_route,
)
from tests.tls_certs import web_certs

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
TD = "l7.test"
CLIENT_ID, WEB_ID = f"spiffe://{TD}/svc/client", f"spiffe://{TD}/svc/web"
WEB_PORT = 18180  # each backend listens on 0.0.0.0:PORT of its own host
WEB2_PORT = 18280
MIXED_PORT = 18380
SLOW_PORT = 18480


# -- the fabric, the services and their backends ------------------------------------------------

@dataclass
class Mesh:
    fabric: Fabric
    client: Host  # host 0: the caller (and the CA)
    ends: list[Host]  # hosts 1 and 2: one endpoint of each service
    web: str  # web's VIP
    backends: dict[str, subprocess.Popen[str]]  # web's, by name (web-h1, web-h2)


def backend(h: Host, module: str, service: str, name: str, port: int,
            labels: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """`python -m tests.l7.MODULE NAME PORT` on all of h's addresses, enrolled as `service`
    with `labels` (KEY=VALUE: `meshnode run --label`, the subsets a Route names)."""
    argv = ["env", "L7_BIND=0.0.0.0", sys.executable, "-m", f"tests.l7.{module}", name,
            str(port)]
    if labels:
        run = [sys.executable, "-m", "meshnode.cli", "run", "--instance", h.tag,
               "--service", service]
        for label in labels:
            run += ["--label", label]
        p = h.popen([*run, "--", *argv], None, stdout=subprocess.PIPE, text=True, cwd=REPO)
    else:
        p = h.popen(argv, service, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening", name
    return p


def identity_held(h: Host, svc: str) -> None:
    def held() -> bool:  # by the agent, and applied by every worker (the agent's barrier)
        ident = h.status()["identity"]
        return svc in ident["services"] and ident["workers_generation"] == ident["generation"]

    wait_for(f"{h.node}'s workers present {svc}'s identity", held, timeout=30)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    f = Fabric(tmp_path_factory.mktemp("l7mesh"), hosts=3, etcd_members=1, ttl=3)
    try:
        f.start_with_ca(TD)
        h0, h1, h2 = f.hosts
        vip = str(h0.call("service.add", name="web",
                          patch={"port": 80, "protocol": "http", "mtls": "STRICT"})["vip"])
        procs = {f"web-{h.node}": backend(h, "backend", "web", f"web-{h.node}", WEB_PORT)
                 for h in (h1, h2)}
        # curl is short-lived: a process of `client` that stays keeps its identity issued
        h0.popen(["sleep", "600"], "client")
        want = {f"{f.ip(i)}:{WEB_PORT}" for i in (1, 2)}
        for h in f.hosts:
            h.wait_endpoints("web", want)
        identity_held(h0, "client")
        yield Mesh(f, h0, [h1, h2], vip, procs)
    finally:
        f.close()


# -- clients and metrics ------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    status: int
    connects: int  # new TCP connections curl made for this transfer (0: reused)
    body: str

    def name(self) -> str:
        return str(json.loads(self.body)["name"])


_WRITE_OUT = "~~%{http_code} %{num_connects}\n"
_REPLY = re.compile(r"(.*?)~~(\d+) (\d+)\n", re.S)


def curl(h: Host, urls: list[str], service: str = "client") -> tuple[list[Reply], str]:
    """One curl process fetching `urls` in order (one keep-alive connection): each reply,
    and curl's -v output (the response headers)."""
    p = h.popen(["curl", "-sS", "-v", "--max-time", "20", "-w", _WRITE_OUT, *urls], service,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    replies = [Reply(int(code), int(n), body) for body, code, n in _REPLY.findall(out)]
    assert len(replies) == len(urls), (out, err[-3000:])
    return replies, err


def metric(h: Host, name: str, **labels: str) -> float:
    """The sum of a metric's samples on h's /metrics whose labels include `labels`."""
    status, text = h.http_get("/metrics")
    assert status == 200, f"{h.node} /metrics: {status} {text[:300]}"
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and \
                all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled(h: Host, name: str, want: float, **labels: str) -> float:
    """The metric once it reached `want` (it only grows), for an exact comparison after."""
    wait_for(f"{h.node}: {name}{labels} reaches {want}",
             lambda: metric(h, name, **labels) >= want, timeout=15)
    return metric(h, name, **labels)


def settled_sum(hosts: list[Host], name: str, want: float, **labels: str) -> float:
    """`settled` for a metric summed over several hosts."""
    wait_for(f"{name}{labels} over {[h.node for h in hosts]} reaches {want}",
             lambda: sum(metric(h, name, **labels) for h in hosts) >= want, timeout=15)
    return sum(metric(h, name, **labels) for h in hosts)


# -- the tests --------------------------------------------------------------------------------

def test_one_keepalive_connection_spreads_over_both_hosts_on_few_tunnels(mesh: Mesh) -> None:
    h0, (h1, h2) = mesh.client, mesh.ends
    requests0 = metric(h0, "meshnode_requests_total", src="client", dst="web",
                       status_class="2xx")
    tunnels0 = metric(h0, "meshnode_tunnel_connections_total", direction="out")
    n = 20
    replies, _ = curl(h0, [f"http://{mesh.web}/r{i}" for i in range(n)])
    assert [r.status for r in replies] == [200] * n, replies
    assert [r.connects for r in replies] == [1] + [0] * (n - 1), "not one connection"
    names = Counter(r.name() for r in replies)
    assert set(names) == {"web-h1", "web-h2"}, names
    # each endpoint's host accepted tunnels presenting the client's identity, for web
    inbound = {h.node: settled(h, "meshnode_inbound_connections_total", 1,
                               src_identity=CLIENT_ID, dst_identity=WEB_ID) for h in (h1, h2)}
    # the client's host counted every request exactly once, as a success
    assert settled(h0, "meshnode_requests_total", requests0 + n, src="client", dst="web",
                   status_class="2xx") == requests0 + n
    tunnels = metric(h0, "meshnode_tunnel_connections_total", direction="out") - tunnels0
    print(f"\n{n} requests on one curl connection from h0, by endpoint: {dict(names)}; "
          f"tunnel connections dialed by h0: {tunnels:.0f} (inbound accepted: {inbound})")
    # pooled: one tunnel per endpoint is the expectation; a few more would still be pooling
    assert 2 <= tunnels <= 4, tunnels


POLICY: dict[str, Any] = {
    "kind": "AuthorizationPolicy", "name": "web-public",
    "spec": {"target": "web", "action": "ALLOW",
             "rules": [{"from": {"services": ["client"]}, "to": {"paths": ["/public/*"]}}]}}


def served(h: Host, port: int) -> int:
    """Requests a backend answered, asked directly on its host (not through the mesh)."""
    _, body = h.http_get("/count", port=port)
    return int(json.loads(body)["count"])


def test_path_rules_are_enforced_for_endpoints_on_other_hosts(mesh: Mesh) -> None:
    h0, ends = mesh.client, mesh.ends
    h0.call("apply", docs=[POLICY])
    try:
        wait_for("the policy reaches h0's workers",
                 lambda: curl(h0, [f"http://{mesh.web}/admin"])[0][0].status == 403)
        before = sum(served(h, WEB_PORT) for h in ends)
        urls = [f"http://{mesh.web}/public/x{i}" for i in range(6)]
        replies, err = curl(h0, [f"http://{mesh.web}/admin", *urls, f"http://{mesh.web}/admin"])
        assert [r.status for r in replies] == [403] + [200] * 6 + [403], replies
        assert [r.connects for r in replies] == [1] + [0] * 7, "a denial cost the connection"
        assert {r.name() for r in replies[1:7]} <= {"web-h1", "web-h2"}
        # the proxy's own answer, and why, in a header
        assert re.search(r"^< x-meshnode-error: denied\r?$", err, re.M | re.I), err[-2000:]
        # a caller the rule does not name is refused the public paths too
        h0.popen(["sleep", "600"], "other")
        identity_held(h0, "other")
        others, _ = curl(h0, [f"http://{mesh.web}/public/x"], service="other")
        assert [r.status for r in others] == [403], others
        # decided on the client's host: no denied request reached an endpoint
        assert sum(served(h, WEB_PORT) for h in ends) - before == 6
        assert settled(h0, "meshnode_authz_denied_total", 1,
                       src=f"spiffe://{TD}/svc/other", dst="web") == 1
    finally:
        h0.call("delete", kind="AuthorizationPolicy", name="web-public")
    wait_for("the policy is gone from h0's workers",
             lambda: curl(h0, [f"http://{mesh.web}/admin"])[0][0].status == 200)


# argv: HOST PORT. Bytes that are not HTTP, then everything the other side sends until it
# closes: {"data": what came back, "error": how it ended when not by a FIN}.
RAW_CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"\x00\x01 not http at all\r\n\r\n")
data, error = b"", None
try:
    while chunk := s.recv(4096):
        data += chunk
except OSError as exc:
    error = type(exc).__name__
print(json.dumps({"data": data.decode("latin-1"), "error": error}))
"""


def raw(h: Host, vip: str) -> dict[str, Any]:
    p = h.popen([sys.executable, "-c", RAW_CLIENT, vip, "80"], "client",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_opaque_bytes_on_an_auto_port_cannot_pass_a_path_rule(mesh: Mesh) -> None:
    """An `auto` port: HTTP is decided per request on the client's host; bytes that are not
    HTTP go as an opaque tunnel, which the endpoint's host decides as opaque (proxy/inbound.py):
    a rule that allows only some paths cannot allow bytes nobody can read a path from."""
    h0, (h1, h2) = mesh.client, mesh.ends
    f = mesh.fabric
    vip = str(h0.call("service.add", name="mixed",
                      patch={"port": 80, "protocol": "auto", "mtls": "STRICT"})["vip"])
    for h in (h1, h2):
        backend(h, "backend", "mixed", f"mixed-{h.node}", MIXED_PORT)
    h0.wait_endpoints("mixed", {f"{f.ip(i)}:{MIXED_PORT}" for i in (1, 2)})
    # no policy: the bytes reach a backend, which answers them (http.server: a 400)
    before = raw(h0, vip)
    assert "400 - Bad request syntax" in before["data"], before
    refusals0 = sum(metric(h, "meshnode_tunnel_refusals_total", side="server", reason="denied")
                    for h in (h1, h2))
    policy = {**POLICY, "name": "mixed-public", "spec": {**POLICY["spec"], "target": "mixed"}}
    h0.call("apply", docs=[policy])
    try:
        wait_for("the policy reaches h0's workers",
                 lambda: curl(h0, [f"http://{vip}/admin"])[0][0].status == 403)
        replies, _ = curl(h0, [f"http://{vip}/public/x", f"http://{vip}/admin"])
        assert [r.status for r in replies] == [200, 403], replies
        after = raw(h0, vip)
        assert after["data"] == "", after  # refused by the endpoint's host: nothing back
        refusals = settled_sum([h1, h2], "meshnode_tunnel_refusals_total", refusals0 + 1,
                               side="server", reason="denied")
        print(f"\nauto port, ALLOW client to /public/*: GET /public/x {replies[0].status}, "
              f"GET /admin {replies[1].status}; raw bytes without a policy: "
              f"{len(before['data'])} bytes (its 400 page), with it: {after} (endpoint hosts' "
              f"refusals: {refusals - refusals0:.0f})")
    finally:
        h0.call("delete", kind="AuthorizationPolicy", name="mixed-public")


def test_a_slow_response_from_another_host_is_governed_by_http_timeouts(mesh: Mesh) -> None:
    """`timeouts.idle` (1 s here) is the idle timeout of a service's opaque TCP connections;
    its HTTP connections have `http.timeouts` (the request's 15 s by default). A response that
    takes 2.5 s from another host's endpoint arrives: the endpoint's host must not cut the
    tunnel under a request its client is still waiting for (it did: a 502 each)."""
    h0, (h1, h2) = mesh.client, mesh.ends
    f = mesh.fabric
    vip = str(h0.call("service.add", name="slow",
                      patch={"port": 80, "protocol": "http", "mtls": "STRICT",
                             "timeouts": {"idle": 1}})["vip"])
    for h in (h1, h2):
        backend(h, "backend", "slow", f"slow-{h.node}", SLOW_PORT)
    h0.wait_endpoints("slow", {f"{f.ip(i)}:{SLOW_PORT}" for i in (1, 2)})
    replies, _ = curl(h0, [f"http://{vip}/slow/2500", f"http://{vip}/slow/2500"])
    print(f"\nservice timeouts.idle 1s, GET /slow/2500 twice from h0: "
          f"{[(r.status, r.body.strip()[:80]) for r in replies]}")
    assert [r.status for r in replies] == [200, 200], replies
    assert settled(h0, "meshnode_requests_total", 2, dst="slow", status_class="2xx") == 2
    assert metric(h0, "meshnode_request_retries_total", dst="slow") == 0


def test_h2_across_hosts_uses_both_endpoints_without_errors(mesh: Mesh) -> None:
    h0, (h1, h2) = mesh.client, mesh.ends
    f = mesh.fabric
    vip = str(h0.call("service.add", name="web2",
                      patch={"port": 80, "protocol": "http2", "mtls": "STRICT"})["vip"])
    for h in (h1, h2):
        backend(h, "h2_backend", "web2", f"web2-{h.node}", WEB2_PORT)
    eps = [f"{f.ip(i)}:{WEB2_PORT}" for i in (1, 2)]
    h0.wait_endpoints("web2", set(eps))
    tunnels0 = metric(h0, "meshnode_tunnel_connections_total", direction="out")
    n = 200
    argv = ["h2load", "-n", str(n), "-c", "2", "-m", "5", f"http://{vip}/"]
    p = h0.popen(argv, "client", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)
    assert f"requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, 0 errored, " \
           "0 timeout" in out, out
    assert f"status codes: {n} 2xx" in out, out
    assert settled(h0, "meshnode_requests_total", n, src="client", dst="web2",
                   status_class="2xx") == n
    picks = {ep: metric(h0, "meshnode_endpoint_selections_total", dst="web2", endpoint=ep)
             for ep in eps}
    tunnels = metric(h0, "meshnode_tunnel_connections_total", direction="out") - tunnels0
    print(f"\n$ {' '.join(argv)} (h0 -> web2 on h1, h2): {n} requests, 0 errors; balancer "
          f"selections by endpoint: {picks}; tunnel connections dialed by h0: {tunnels:.0f}")
    assert sum(picks.values()) == n and all(picks.values()), picks
    assert 2 <= tunnels <= 8, tunnels  # per worker and endpoint, shared by every stream
    for h in (h1, h2):
        assert metric(h, "meshnode_inbound_connections_total", src_identity=CLIENT_ID,
                      dst_identity=f"spiffe://{TD}/svc/web2") >= 1, h.node


GATEWAY_PORT = 18443


def test_the_gateway_calls_into_the_mesh_with_its_own_identity(mesh: Mesh,
                                                               tmp_path: Path) -> None:
    """A Gateway on host 0 (TLS with the operator's certificate) routes web.example.com to
    `web`, STRICT, whose endpoints are on hosts 1 and 2: the gateway dials them over mTLS
    presenting its service's identity (issued to host 0 because it runs the gateway), which
    the endpoints' hosts accept and an AuthorizationPolicy can name."""
    h0, (h1, h2) = mesh.client, mesh.ends
    root, sites = web_certs(tmp_path, {"web": ["web.example.com"]})
    cert, key = sites["web"]
    edge_id = f"spiffe://{TD}/svc/edge"
    docs: list[dict[str, Any]] = [
        {"kind": "Service", "name": "edge", "spec": {}},
        {"kind": "Route", "name": "web-public",
         "spec": {"service": "web", "hosts": ["web.example.com"], "rules": [{"name": "all"}]}},
        {"kind": "Gateway", "name": "edge",
         "spec": {"nodes": [h0.node], "service": "edge", "listeners": [
             {"address": "127.0.0.1", "port": GATEWAY_PORT, "certificates": [
                 {"hosts": ["web.example.com"], "certFile": str(cert),
                  "keyFile": str(key)}]}]}},
        {"kind": "AuthorizationPolicy", "name": "edge-no-admin",
         "spec": {"target": "web", "action": "DENY",
                  "rules": [{"from": {"services": ["edge"]}, "to": {"paths": ["/admin/*"]}}]}}]
    h0.call("apply", docs=docs)
    try:
        identity_held(h0, "edge")  # the CA issued the gateway's service identity to h0
        base = f"https://web.example.com:{GATEWAY_PORT}"

        def fetch(paths: list[str]) -> list[Reply]:
            p = h0.popen(["curl", "-sS", "--max-time", "20", "--cacert", str(root),
                          "--resolve", f"web.example.com:{GATEWAY_PORT}:127.0.0.1",
                          "-w", _WRITE_OUT, *(base + path for path in paths)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = p.communicate(timeout=60)
            replies = [Reply(int(c), int(n), b) for b, c, n in _REPLY.findall(out)]
            assert len(replies) == len(paths), (out, err)
            return replies

        wait_for("the gateway serving", lambda: fetch(["/x"])[0].status == 200, timeout=30)
        replies = fetch([f"/r{i}" for i in range(10)] + ["/admin/x"])
        assert [r.status for r in replies] == [200] * 10 + [403], replies
        names = {r.name() for r in replies[:10]}
        assert names and names <= {"web-h1", "web-h2"}, names
        for h in (h1, h2):  # the endpoints' hosts accepted the gateway's identity, for web
            if f"web-{h.node}" in names:
                assert settled(h, "meshnode_inbound_connections_total", 1,
                               src_identity=edge_id, dst_identity=WEB_ID) >= 1, h.node
    finally:
        for kind, name in (("Gateway", "edge"), ("AuthorizationPolicy", "edge-no-admin"),
                           ("Route", "web-public"), ("Service", "edge")):
            h0.call("delete", kind=kind, name=name)


REVIEWS_PORT = 18580


class Stamped(Background):
    """tests/l7/load_client.py in a loop (Background), each row with the moment it arrived."""

    def __init__(self, h: Host, url: str, conns: int = 4) -> None:
        self.stamps: list[float] = []  # before the reader starts
        super().__init__(h, url, conns)

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.stamps.append(time.monotonic())
            self.rows.append(Row(*json.loads(line)))


def switched_at(rows: list[Row], window: int = 100) -> int:
    """The first request from which on every `window` consecutive requests are 50/50 ± 10 %
    v2 (len(rows) if the tail never is)."""
    v2 = [0]
    for r in rows:
        v2.append(v2[-1] + (r.name == "v2"))
    last_bad = -1
    for i in range(len(rows) - window + 1):
        if not 0.4 <= (v2[i + window] - v2[i]) / window <= 0.6:
            last_bad = i
    return last_bad + 1


def test_a_split_holds_on_every_caller_host_and_moves_everywhere_within_the_push(
        mesh: Mesh, tmp_path: Path) -> None:
    """Service `reviews` (http, STRICT): endpoint v1 on host 1, v2 on host 2 (labels
    version=v1 / v2). A Route 90/10 v1/v2, then 50/50 applied on host 1's agent while
    keep-alive load loops run on hosts 0 and 2: each caller host holds 90/10, then follows
    the registry's watch to 50/50 within a few seconds, and no request fails meanwhile."""
    h0, (h1, h2) = mesh.client, mesh.ends
    f = mesh.fabric
    vip = str(h0.call("service.add", name="reviews",
                      patch={"port": 80, "protocol": "http", "mtls": "STRICT"})["vip"])
    backend(h1, "backend", "reviews", "v1", REVIEWS_PORT, ("version=v1",))
    backend(h2, "backend", "reviews", "v2", REVIEWS_PORT, ("version=v2",))
    callers = [h0, h2]
    for h in callers:
        h.wait_endpoints("reviews", {f"{f.ip(i)}:{REVIEWS_PORT}" for i in (1, 2)})
    h2.popen(["sleep", "600"], "client")  # h0's is the fixture's
    identity_held(h2, "client")
    url = f"http://{vip}/"
    loops: list[Stamped] = []
    try:
        apply(h0, tmp_path, split_route(90, 10))
        for h in callers:  # smooth weighted round robin: exactly 2 v2 turns in 20 requests
            wait_for(f"90/10 in force on {h.node}", lambda h=h: sum(
                r.name == "v2" for r in load(h, url, 20, conns=1)) == 2, timeout=20)
        t_start = time.monotonic()
        loops = [Stamped(h, url) for h in callers]
        for loop in loops:
            loop.wait(1000)
        t_apply = time.monotonic()
        apply(h1, tmp_path, split_route(50, 50))  # on neither caller's host
        t_applied = time.monotonic()
        marks = [len(loop.rows) for loop in loops]

        def moved(loop: Stamped, mark: int) -> bool:
            tail = loop.rows[-200:]
            return len(loop.rows) > mark + 200 and abs(share(tail, "v2") - 0.5) <= 0.05

        for loop, mark in zip(loops, marks, strict=True):
            wait_for("50/50 in force", lambda loop=loop, mark=mark: moved(loop, mark),
                     timeout=20)
        for loop in loops:
            loop.wait(len(loop.rows) + 1000)
    finally:
        try:
            runs = [loop.stop() for loop in loops]
        finally:
            h0.call("delete", kind="Route", name="reviews")
    took = max(loop.stamps[-1] for loop in loops) - t_start
    lines, checks = [], []
    for h, loop, rows in zip(callers, loops, runs, strict=True):
        stamps = loop.stamps[:len(rows)]
        before = [r for r, t in zip(rows, stamps, strict=True) if t < t_apply]
        at = switched_at(rows)
        after = rows[at:]
        switch = stamps[at] - t_applied if at < len(rows) else float("inf")
        failed = errors(rows)
        lines.append(f"  {h.node}: 90/10 -> v2 {share(before, 'v2'):.1%} of {len(before)}; "
                     f"50/50 in force {switch + t_applied - t_apply:.2f}s after apply began "
                     f"({switch:+.2f}s from its return), "
                     f"then v2 {share(after, 'v2'):.1%} of {len(after)}; {len(rows)} requests, "
                     f"{len(failed)} errors")
        checks.append((h.node, before, after, switch + t_applied - t_apply, failed))
    print(f"\nreviews v1@h1 / v2@h2, Route 90/10 then 50/50 applied on h1's agent (apply took "
          f"{t_applied - t_apply:.2f}s) under keep-alive load loops (4 connections) on h0 and "
          f"h2, {took:.1f}s of load:\n" + "\n".join(lines))
    for node, before, after, switch, failed in checks:
        assert len(before) >= 1000 and abs(share(before, "v2") - 0.10) <= 0.03, node
        assert len(after) >= 1000 and abs(share(after, "v2") - 0.50) <= 0.03, node
        # not before the apply began (the 90/10 was in force), within the push after it
        assert 0 < switch <= t_applied - t_apply + 5.0, (node, switch)
        assert failed == [], (node, Counter((r.status, r.error_header, r.error)
                                            for r in failed))


class Load:
    """curl processes one after another from host 0, `per` GETs each on one connection."""

    def __init__(self, h: Host, vip: str, per: int = 50) -> None:
        self.h, self.urls = h, [f"http://{vip}/k{i}" for i in range(per)]
        self.statuses: Counter[int] = Counter()
        self.names: Counter[str] = Counter()
        self.errors: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                replies, _ = curl(self.h, self.urls)
            except AssertionError as exc:  # curl gave up on a transfer: a client error
                self.errors.append(str(exc)[-500:])
                continue
            for r in replies:
                self.statuses[r.status] += 1
                if r.status == 200:
                    self.names[r.name()] += 1
            self.rounds += 1

    def until(self, rounds: int) -> None:
        wait_for(f"{rounds} curl rounds", lambda: self.rounds >= rounds or self.errors,
                 timeout=60)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_an_endpoint_host_lost_under_load_costs_the_client_nothing(mesh: Mesh) -> None:
    """Host 1's agent is killed, then its backend: nobody tells the registry, so host 0 keeps
    routing to the dead endpoint until host 1's lease expires (a few seconds). Meanwhile host
    1's workers still accept tunnels but cannot reach the backend: each GET sent there is
    retried on host 2."""
    h0, h1 = mesh.client, mesh.ends[0]
    f = mesh.fabric
    retries0 = metric(h0, "meshnode_request_retries_total", dst="web")
    failures0 = metric(h0, "meshnode_request_failures_total", dst="web")
    served1 = served(h1, WEB_PORT)
    with Load(h0, mesh.web) as load:
        # while requests flow to h1 (its backend has answered some of this load)
        wait_for("load reaches h1", lambda: served(h1, WEB_PORT) >= served1 + 20, timeout=60)
        h1.kill()
        victim = mesh.backends["web-h1"]
        victim.kill()
        victim.wait(10)
        at_kill = load.rounds
        h0.wait_endpoints("web", {f"{f.ip(2)}:{WEB_PORT}"})  # h1's lease expired
        gone = load.rounds
        load.until(gone + 2)  # and rounds with h1's endpoint gone
    retries = metric(h0, "meshnode_request_retries_total", dst="web") - retries0
    failures = metric(h0, "meshnode_request_failures_total", dst="web") - failures0
    total = sum(load.statuses.values())
    print(f"\nh1's agent and backend killed under a curl loop on h0: {load.rounds} rounds of 50 "
          f"GETs ({gone - at_kill} while h1's endpoint was still listed), {total} GETs, "
          f"statuses {dict(load.statuses)}, by endpoint {dict(load.names)}, retries "
          f"{retries:.0f}, request failures {failures:.0f}, client errors {len(load.errors)}")
    assert not load.errors, load.errors[:3]
    assert set(load.statuses) == {200}, load.statuses
    assert failures == 0
    assert retries >= 1  # the dead endpoint was tried, and the retry answered
