"""The ingress gateway against HAProxy and nginx doing the same job (issue 16 item 7):
`python -m tests.bench.gateway [--quick] [--out DIR] [--only NAMES] [--keep]`, as root.
`make bench` runs it after tests/bench/http.py (`make bench-quick` a shortened form).

The job, the same for the three: terminate TLS 1.3 for `bench.test` (one ECDSA P-256
certificate the bench makes) and route each request by path to one of two backends: /a/* to
backend 1, /b/* to backend 2 (the two nginx `return 200` servers of tests/bench/http_servers.py,
HTTP/1.1 with kept connections). ALPN h2 and http/1.1 on one port, as a browser finds it. One
network namespace holding only `lo` (a tests/harness.Host, gone on success, failure or Ctrl-C):
  direct       the load generator → backend 1 in plaintext: the reference, no TLS, no middle
  mn-gateway   a meshnode agent (one worker) with a Gateway resource (listener 127.0.0.1:18443,
               the certificate) and a Route for host bench.test; Services app-a and app-b,
               `protocol: http`, whose static endpoints are the backends. Access log on.
               meshnode does not translate h2 to HTTP/1.1 (it offers h2 by ALPN only to a host
               whose routes lead to h2 services): when bench.test is not offered h2, its h2
               load asks for h2.bench.test, whose Route leads to app-a-h2 and app-b-h2
               (`protocol: http2`, the backends' h2c ports)
  haproxy-tls  HAProxy `mode http`, nbthread 1, `bind ... ssl crt`, use_backend by path_beg,
               http-reuse always
  nginx-tls    nginx worker_processes 1, `listen ... ssl http2`, a location per prefix,
               proxy_pass to an upstream per backend with keepalive 32
HAProxy and nginx log nothing per request.

Load (tests/bench/http_load.py, one thread; the name bench.test is dialled at the proxy's
address, SNI and Host/:authority still naming it): wrk -t1 -c32 over HTTPS with keep-alive,
the paths /a/x and /b/x in turn (a Lua script); h2load -t1 -c8 -m10 over TLS (ALPN h2), the two
paths in turn; and new TLS connections: wrk -c32 with `Connection: close`, one full handshake
(no resumption) per request, what a gateway facing browsers pays (wrk's latency of such a
request starts after the handshake: the rate and the CPU show the handshake's cost). CPU per
request: utime+stime of the proxy's worker process(es) during the run over the requests
completed. Variants interleaved (a different one first each repetition), medians reported with
ratios to HAProxy and nginx; a run with more than 1 % failed requests is not counted.
Checks printed under the table: the TLS each proxy negotiates (openssl s_client, verifying the
bench's certificate for bench.test), where requests on ONE keep-alive connection land (/a
only, /b only, both in turn: routing per request, not per connection), each backend's share
under load, and meshnode_requests_total against the requests sent through the gateway.
Targets: mn-gateway HTTPS keep-alive req/s at least HAProxy's, p99 at most 1.2 times HAProxy's.
Writes gateway-<time>-<mode>.json into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshnode.errors import MeshnodeError
from tests.bench import http, report
from tests.bench import http_servers as servers
from tests.bench.client import Client, ClientError
from tests.bench.procs import ALL_CPUS, cpu_seconds, interrupt_on_signals, listens, stop_tree
from tests.bench.variants import MAX_CONNS, PORT_RANGE, spawn
from tests.harness import Host, wait_for

REPO = Path(__file__).resolve().parents[2]
DIRECT, GATEWAY, HAPROXY, NGINX = "direct", "mn-gateway", "haproxy-tls", "nginx-tls"
VARIANTS = (DIRECT, GATEWAY, HAPROXY, NGINX)
HOSTNAME = "bench.test"  # no DNS entry: every client dials the proxy's address for it
H2_HOSTNAME = "h2.bench.test"  # meshnode's h2 load: routed to the backends' h2c ports
LO = servers.LOOPBACK
GATEWAY_PORT, HAPROXY_PORT, NGINX_PORT = 18443, 18444, 18445
PATHS = ("/a/x", "/b/x")  # backend 1's route, backend 2's
SERVICES = ("app-a", "app-b")  # meshnode: the Services behind /a and /b (HTTP/1.1)
H2_SERVICES = ("app-a-h2", "app-b-h2")  # the same backends' h2c ports, for H2_HOSTNAME
EDGE = "edge"  # the Service whose identity the gateway has
VIP_PORT = 8080
CHECK_REQUESTS = 100  # per routing check, on one keep-alive connection
LOADS = ("h1", "h2", "new")
MAX_ERRORS = 0.01  # a run with more failed requests than this share is not counted
Metrics = dict[str, float | None]


@dataclass(frozen=True)
class Plan:
    mode: str
    reps: int
    seconds: int  # per run (wrk takes whole seconds)
    wrk_connections: int
    h2_clients: int
    h2_streams: int
    new_connections: int  # concurrent clients opening a TLS connection per request


def plan(quick: bool) -> Plan:
    return Plan("quick", 3, 2, 32, 8, 10, 32) if quick else Plan("full", 3, 5, 32, 8, 10, 32)


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path
    combined: Path  # certificate then key, as HAProxy's `crt` takes them


def make_cert(d: Path) -> Cert:
    """A self-signed ECDSA P-256 certificate for HOSTNAME and H2_HOSTNAME, valid a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(HOSTNAME), x509.DNSName(H2_HOSTNAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    out = Cert(d / "cert.pem", d / "key.pem", d / "combined.pem")
    out.cert.write_bytes(cert_pem)
    out.key.write_bytes(key_pem)
    out.combined.write_bytes(cert_pem + key_pem)
    for p in (out.key, out.combined):
        p.chmod(0o600)
    return out


@dataclass
class Variant:
    name: str
    port: int  # where the load connects (on LO)
    tls: bool
    h2_port: int  # direct: the backend's h2c port; the proxies: `port` (ALPN)
    h2_host: str = HOSTNAME  # the name the h2 load asks for (SNI, :authority)
    h2: bool = True  # whether the h2 load gets h2 (ALPN): else it is not measured
    workers: list[int] = field(default_factory=list)  # measured: CPU per request
    control: list[int] = field(default_factory=list)  # agent, nginx master: in the JSON only
    script: str = ""  # the wrk Lua script: dial LO:port, the paths in turn

    def base(self, h2: bool = False) -> str:
        if self.tls:
            return f"https://{self.h2_host if h2 else HOSTNAME}:{self.port}"
        return f"http://{LO}:{self.h2_port if h2 else self.port}"

    def connect_to(self, h2: bool = False) -> str:
        return f"{LO}:{self.h2_port if h2 else self.port}" if self.tls else ""


_WRK_SCRIPT = """\
-- {name}: dial {lo}:{port} whatever the URL names (bench.test has no DNS entry; SNI and Host
-- still say it), and send /a and /b in turn on every connection.
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup("{lo}", "{port}")
end
local reqs = {{}}
function init(args)
  reqs[1] = wrk.format(nil, "{a}")
  reqs[2] = wrk.format(nil, "{b}")
end
local n = 0
function request()
  n = n + 1
  return reqs[n % 2 + 1]
end
"""


@dataclass
class Bench:
    """The namespace and what runs in it, as the measures need it."""

    http: http.Bench  # the namespace, the plain load driver, the backends' stub_status
    load: Client
    variants: list[Variant] = field(default_factory=list)
    sent: int = 0  # requests sent through the gateway
    routing: dict[str, dict[str, tuple[int, int] | None]] = field(default_factory=dict)


# -- measures ---------------------------------------------------------------------------------

def measure(b: Bench, v: Variant, p: Plan, load: str) -> tuple[Metrics, tuple[int, int]] | None:
    """One load run: its metrics, and the requests each backend answered during it."""
    if load == "h2" and not v.h2:  # h2load would fall back to HTTP/1.1: not this row's load
        return None
    served0 = b.http.served()
    cpu0, ctl0 = cpu_seconds(v.workers), cpu_seconds(v.control)
    if load == "h2":
        r = b.load.ask("h2load", url=v.base(True) + PATHS[0], more_urls=[v.base(True) + PATHS[1]],
                       connect_to=v.connect_to(True), seconds=p.seconds, clients=p.h2_clients,
                       streams=p.h2_streams, log=str(b.http.dir / f"h2load-{v.name}.log"))
    else:
        new = load == "new"
        r = b.load.ask("wrk", url=v.base() + "/", seconds=p.seconds, script=v.script,
                       connections=p.new_connections if new else p.wrk_connections,
                       headers=["Connection: close"] if new else [])
    cpu, ctl = cpu_seconds(v.workers) - cpu0, cpu_seconds(v.control) - ctl0
    split = http._between(served0, b.http.served())
    n = r["requests"]
    if v.name == GATEWAY:
        b.sent += n
    if r["errors"]:
        print(f"  warning: {v.name} {load}: {r['errors']} errors of {n}", file=sys.stderr)
    if r["errors"] > MAX_ERRORS * n:  # failures are fast: their rate says nothing of the job
        return {f"{load}_errors": r["errors"], f"{load}_sent": n}, split
    return ({f"{load}_rps": r["rps"], f"{load}_p50": r["p50_ms"], f"{load}_p99": r["p99_ms"],
             f"{load}_cpu": cpu / n * 1e6 if v.workers and n else None,
             f"{load}_ctl_cpu": ctl / n * 1e6 if v.control and n else None,
             f"{load}_errors": r["errors"], f"{load}_sent": n}, split)


def check_routing(b: Bench, v: Variant) -> None:
    """CHECK_REQUESTS requests on one keep-alive connection to /a, to /b, to both in turn:
    where each landed (backend 1, backend 2)."""
    for what, urls in (("/a", PATHS[:1]), ("/b", PATHS[1:]), ("/a+/b", PATHS)):
        before = b.http.served()
        r = http._attempt(partial(b.load.ask, "h2load", url=v.base() + urls[0],
                                  more_urls=[v.base() + u for u in urls[1:]],
                                  connect_to=v.connect_to(), clients=1, streams=1,
                                  requests=CHECK_REQUESTS, h1=True,
                                  log=str(b.http.dir / f"check-{v.name}.log")),
                          f"{v.name} routing check {what}")
        if r is not None and v.name == GATEWAY:
            b.sent += r["requests"]
        b.routing.setdefault(v.name, {})[what] = \
            None if r is None else http._between(before, b.http.served())


def routed(got: dict[str, tuple[int, int] | None]) -> bool:
    """Whether the checks landed as the routes say: /a on backend 1, /b on 2, in turn on both."""
    half = CHECK_REQUESTS // 2
    return got == {"/a": (CHECK_REQUESTS, 0), "/b": (0, CHECK_REQUESTS),
                   "/a+/b": (CHECK_REQUESTS - half, half)}


def warm_up(b: Bench, v: Variant, p: Plan) -> None:
    """Pools, caches, session state and the allocators' first growth."""
    for h2 in (False, True) if v.h2 else (False,):
        r = b.load.ask("h2load", url=v.base(h2) + PATHS[0], more_urls=[v.base(h2) + PATHS[1]],
                       connect_to=v.connect_to(h2), clients=p.h2_clients if h2 else 8,
                       streams=p.h2_streams if h2 else 1, requests=3000, h1=not h2,
                       log=str(b.http.dir / f"warm-{v.name}.log"))
        if v.name == GATEWAY:
            b.sent += r["requests"]


def tls_check(h: Host, cert: Cert, port: int, name: str) -> tuple[str, str]:
    """What a client asking for `name` and offering h2 negotiates with the proxy on `port`:
    protocol, cipher, key exchange, certificate, whether it verified, and the ALPN chosen."""
    try:
        run = subprocess.run(
            ["nsenter", f"--net=/run/netns/{h.netns}", "openssl", "s_client", "-connect",
             f"{LO}:{port}", "-servername", name, "-alpn", "h2,http/1.1", "-CAfile",
             str(cert.cert), "-verify_hostname", name, "-verify_return_error"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"openssl s_client failed: {exc}", "?"
    out = run.stdout + run.stderr
    found = [m[1] if (m := re.search(pattern, out)) else "?" for pattern in (
        r"New, (\S+), Cipher is (\S+)", r"Cipher is (\S+)", r"Server Temp Key: ([^,\n]+)",
        r"Peer signature type: (\S+)", r"Server public key is (\d+) bit",
        r"ALPN protocol: (\S+)", r"Verify return code: (\d+ \([^)]*\))")]
    proto, cipher, kex, sig, bits, alpn, verify = found
    return (f"{name}: {proto} {cipher} {kex}, {sig} {bits}-bit certificate, verify {verify}, "
            f"ALPN {alpn}"), alpn


# -- set-up -----------------------------------------------------------------------------------

_HAPROXY = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s
frontend tls
    bind {lo}:{port} ssl crt {pem} alpn h2,http/1.1 ssl-min-ver TLSv1.3
    use_backend a if {{ path /a }} or {{ path_beg /a/ }}
    use_backend b if {{ path /b }} or {{ path_beg /b/ }}
backend a
    server a {lo}:{a}
backend b
    server b {lo}:{b}
"""
# nginx's `location /a/` takes /a/*; `keepalive_requests` of the http block lifts h2's limit too
_NGINX = """\
    upstream a {{ server {lo}:{a}; keepalive 32; keepalive_requests {forever};
                 keepalive_timeout 300s; }}
    upstream b {{ server {lo}:{b}; keepalive 32; keepalive_requests {forever};
                 keepalive_timeout 300s; }}
    server {{
        listen {lo}:{port} ssl http2;
        server_name {host};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location /a/ {{ proxy_pass http://a; proxy_http_version 1.1;
                       proxy_set_header Connection ""; }}
        location /b/ {{ proxy_pass http://b; proxy_http_version 1.1;
                       proxy_set_header Connection ""; }}
    }}
"""


@contextlib.contextmanager
def haproxy(run: servers.Spawn, d: Path, cert: Cert) -> Iterator[servers.Proc]:
    cfg = d / "haproxy-tls.cfg"
    cfg.write_text(_HAPROXY.format(lo=LO, maxconn=MAX_CONNS, port=HAPROXY_PORT,
                                   pem=cert.combined, a=servers.H1_PORTS[0],
                                   b=servers.H1_PORTS[1]))
    p = run(["haproxy", "-f", str(cfg), "-db"], "haproxy-tls.log")
    try:
        def up() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"haproxy exited: see {d}/haproxy-tls.log")
            return listens(p.pid, HAPROXY_PORT)

        wait_for("haproxy tls", up, 15)
        yield servers.Proc([p.pid], [])
    finally:
        stop_tree(p)


@contextlib.contextmanager
def nginx(run: servers.Spawn, d: Path, cert: Cert) -> Iterator[servers.Proc]:
    body = _NGINX.format(lo=LO, a=servers.H1_PORTS[0], b=servers.H1_PORTS[1], port=NGINX_PORT,
                         host=HOSTNAME, cert=cert.cert, key=cert.key, forever=servers.FOREVER)
    p, info = servers._nginx(run, d / "nginx-tls", body, MAX_CONNS, (NGINX_PORT,))
    try:
        yield info
    finally:
        stop_tree(p)


def gateway_docs(cert: Cert) -> list[dict[str, Any]]:
    """The Gateway and its two Routes (by path, one per host), as an operator applies them."""
    def route(name: str, host: str, services: tuple[str, ...]) -> dict[str, Any]:
        return {"kind": "Route", "name": name, "spec": {
            "hosts": [host],
            "rules": [{"name": rule, "match": [{"path": {"prefix": path[:2]}}],
                       "backends": [{"service": svc}]}
                      for rule, path, svc in zip("ab", PATHS, services, strict=True)]}}

    return [
        {"kind": "Gateway", "name": "edge", "spec": {
            "nodes": ["*"], "service": EDGE,
            "listeners": [{"address": LO, "port": GATEWAY_PORT, "protocol": "https",
                           "certificates": [{"hosts": [HOSTNAME, H2_HOSTNAME],
                                             "certFile": str(cert.cert),
                                             "keyFile": str(cert.key)}]}]}},
        route("bench", HOSTNAME, SERVICES), route("bench-h2", H2_HOSTNAME, H2_SERVICES)]


def meshnode(b: Bench, cert: Cert) -> Variant:
    """The agent (one worker, access log on), the Services and the Gateway + Routes. meshnode
    does not translate between HTTP/2 and HTTP/1.1 (and offers h2 only to a host whose routes
    lead to h2 services): its h2 load asks for H2_HOSTNAME, routed to the backends' h2c ports."""
    h = b.http.host
    h.start()
    for names, ports, protocol in ((SERVICES, servers.H1_PORTS, "http"),
                                   (H2_SERVICES, servers.H2_PORTS, "http2")):
        for svc, port in zip(names, ports, strict=True):
            h.call("service.add", name=svc, endpoints=[f"{LO}:{port}"],
                   patch={"port": VIP_PORT, "protocol": protocol})
    h.call("service.add", name=EDGE, patch={"port": VIP_PORT, "protocol": "http"})
    docs = gateway_docs(cert)
    h.call("apply", docs=docs, sources=["tests/bench/gateway.py"] * len(docs))
    v = Variant(GATEWAY, GATEWAY_PORT, True, GATEWAY_PORT, H2_HOSTNAME)
    wait_for("the gateway to answer over TLS", partial(_answers, b, v), 20)
    status = h.status()
    v.workers = [w["pid"] for w in status["workers"]]
    v.control = [int(status["pid"])]
    return v


def _answers(b: Bench, v: Variant) -> bool:
    try:
        r = b.load.ask("h2load", url=v.base() + PATHS[0], connect_to=v.connect_to(), clients=1,
                       streams=1, requests=1, h1=True, timeout=2,
                       log=str(b.http.dir / "ready.log"))
    except ClientError:  # refused, reset: not yet
        return False
    return r["requests"] == 1 and not r["errors"]


@contextlib.contextmanager
def bench(tmp: Path, only: set[str]) -> Iterator[tuple[Bench, Cert]]:
    h = Host(tmp / "mesh", "ebpf", workers=1, agent_args=("--log-level", "info"))
    try:
        subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", "sysctl", "-qw",
                        f"net.ipv4.ip_local_port_range={PORT_RANGE}"], check=True)

        def run(argv: list[str], log: str, **kw: Any) -> subprocess.Popen[Any]:
            return spawn(h, tmp, argv, log, **kw)

        cert = make_cert(tmp)
        with contextlib.ExitStack() as stack:
            stack.enter_context(servers.backends(run, tmp, MAX_CONNS))
            plain = http._driver(h, tmp, "plain", None)
            b = Bench(http.Bench(h, tmp, plain), plain)
            want = only or set(VARIANTS)
            if DIRECT in want:  # backend 1 alone, plaintext: no middle, no CPU figure
                b.variants.append(Variant(DIRECT, servers.H1_PORTS[0], False,
                                          servers.H2_PORTS[0]))
            if GATEWAY in want:
                try:
                    b.variants.append(meshnode(b, cert))
                except (AssertionError, ClientError, MeshnodeError) as exc:
                    # the others are still worth their table: this column stays empty
                    print(f"  {GATEWAY}: not measured: {exc}", file=sys.stderr)
            if HAPROXY in want:
                ha = stack.enter_context(haproxy(run, tmp, cert))
                b.variants.append(Variant(HAPROXY, HAPROXY_PORT, True, HAPROXY_PORT,
                                          workers=ha.workers))
            if NGINX in want:
                ng = stack.enter_context(nginx(run, tmp, cert))
                b.variants.append(Variant(NGINX, NGINX_PORT, True, NGINX_PORT,
                                          workers=ng.workers, control=ng.control))
            for v in b.variants:
                path = tmp / f"wrk-{v.name}.lua"
                path.write_text(_WRK_SCRIPT.format(name=v.name, lo=LO, port=v.port,
                                                   a=PATHS[0], b=PATHS[1]))
                v.script = str(path)
            yield b, cert
    finally:
        h.close()  # the load driver, the agent and its kernel state, the namespace


# -- the report -------------------------------------------------------------------------------

def table_metrics(p: Plan) -> list[report.Metric]:
    h1 = f"HTTPS keep-alive (wrk -c{p.wrk_connections}, /a /b)"
    h2 = f"h2 over TLS (h2load -c{p.h2_clients} -m{p.h2_streams})"
    new = f"new TLS connection per request (wrk -c{p.new_connections})"
    return [
        report.Metric("h1_rps", h1, "req/s", True),
        report.Metric("h1_p50", "HTTPS keep-alive latency p50", "ms", False),
        report.Metric("h1_p99", "HTTPS keep-alive latency p99", "ms", False),
        report.Metric("h1_cpu", "HTTPS keep-alive proxy CPU per request", "µs", False),
        report.Metric("h2_rps", h2, "req/s", True),
        report.Metric("h2_p50", "h2 over TLS latency p50", "ms", False),
        report.Metric("h2_p99", "h2 over TLS latency p99", "ms", False),
        report.Metric("h2_cpu", "h2 over TLS proxy CPU per request", "µs", False),
        report.Metric("new_rps", new, "conn/s", True),
        # wrk starts a request's clock once its connection is up: the handshake is not in it
        report.Metric("new_p50", "new TLS conn. latency p50 (excl. handshake)", "ms", False),
        report.Metric("new_p99", "new TLS conn. latency p99 (excl. handshake)", "ms", False),
        report.Metric("new_cpu", "proxy CPU per new TLS connection", "µs", False),
    ]


def targets(t: report.Table, judged: bool) -> list[report.Target]:
    """Issue 16's targets for the gateway; n/a when it did not route as configured."""
    x = report.TIMES
    rps = report.ratio(t, GATEWAY, HAPROXY, "h1_rps")
    p99 = report.ratio(t, GATEWAY, HAPROXY, "h1_p99")

    def judge(value: float | None, ok: Callable[[float], bool]) -> bool | None:
        return None if value is None or not judged else ok(value)

    return [report.Target(f"gateway-req/s≥1.0{x}haproxy", rps, judge(rps, lambda r: r >= 1.0)),
            report.Target(f"gateway-p99≤1.2{x}haproxy", p99, judge(p99, lambda r: r <= 1.2))]


def _verdict(t: report.Target) -> str:
    return "n/a" if t.met is None else "MET" if t.met else "NOT MET"


def _rotate(items: list[Variant], rep: int) -> list[Variant]:  # as http._rotate, typed
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


# -- the run ----------------------------------------------------------------------------------

def run(quick: bool, out: Path, only: str = "", keep: bool = False) -> int:
    """Set up, check, measure; print the table, the checks and the targets; write JSON."""
    p = plan(quick)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-gateway-bench-"))
    raw: report.Raw = {}
    loads: dict[str, dict[str, list[tuple[int, int]]]] = {}
    tls: dict[str, list[str]] = {}
    counted: dict[str, Any] = {}
    try:
        with bench(tmp, set(filter(None, only.split(",")))) as (b, cert):
            print(f"gateway: set up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            for v in b.variants:
                if v.tls:
                    v.h2 = False
                    for name in dict.fromkeys((HOSTNAME, v.h2_host)):
                        text, alpn = tls_check(b.http.host, cert, v.port, name)
                        tls.setdefault(v.name, []).append(text)
                        if alpn == "h2":  # the h2 load asks for the first name offered h2
                            v.h2, v.h2_host = True, name
                            break
                    check_routing(b, v)
                http._attempt(partial(warm_up, b, v, p), f"{v.name} warm-up")
            for rep in range(p.reps):
                for load in LOADS:
                    t0 = time.monotonic()
                    for v in _rotate(b.variants, rep):
                        got = http._attempt(partial(measure, b, v, p, load), f"{v.name} {load}")
                        if got is None:
                            continue
                        metrics, split = got
                        for key, value in metrics.items():
                            if value is not None:
                                raw.setdefault(v.name, {}).setdefault(key, []).append(value)
                        loads.setdefault(v.name, {}).setdefault(load, []).append(split)
                    print(f"gateway [{rep + 1}/{p.reps}] {load}: {time.monotonic() - t0:.1f}s",
                          file=sys.stderr)
            if any(v.name == GATEWAY for v in b.variants):
                counted = _mn_counted(b)
            names = [v.name for v in b.variants]
            pids = {v.name: {"workers": v.workers, "control": v.control} for v in b.variants}
            no_h2 = {v.name: v.h2_host for v in b.variants if not v.h2}
            h2_apart = any(v.h2 and v.h2_host != HOSTNAME for v in b.variants)
            routing = b.routing
    except KeyboardInterrupt:
        print("interrupted: every process and the namespace have been removed", file=sys.stderr)
        return 130
    finally:
        report.release(tmp, keep)
    wall = time.monotonic() - started
    table = report.medians(raw)
    ms = table_metrics(p)
    judged = routed(routing.get(GATEWAY, {}))
    ts = targets(table, judged)
    now = dt.datetime.now(dt.UTC)
    version = report.source_version(REPO)
    head = (f"meshnode gateway bench ({p.mode}): TLS 1.3 (ECDSA P-256) + routing by path to 2 "
            f"backends; one namespace, {len(ALL_CPUS)} CPUs shared by the load generator, the "
            f"proxy and the backends, Linux {platform.release()}, "
            f"{version.get('commit', 'unknown commit')}; median of {p.reps} runs of "
            f"{p.seconds}s; one worker/thread per proxy; {wall:.0f}s")
    path = out / f"gateway-{now:%Y%m%d-%H%M%S}-{p.mode}.json"
    report.write_json(path, {
        "when": now.isoformat(), "source": version, "mode": p.mode, "wall_s": wall,
        "machine": {"cpus": len(ALL_CPUS), "kernel": platform.release()},
        "plan": p.__dict__, "variants": names, "pids": pids, "raw": raw, "median": table,
        "tls": tls, "routing": routing, "split_under_load": loads, "meshnode_requests": counted,
        "ratio_to_haproxy": {v: {m.key: report.ratio(table, v, HAPROXY, m.key) for m in ms}
                             for v in names},
        "ratio_to_nginx": {v: {m.key: report.ratio(table, v, NGINX, m.key) for m in ms}
                           for v in names},
        "targets": [{"name": t.name, "value": t.value, "met": t.met} for t in ts]})
    print(head)
    print(report.table_text(table, names, ms, refs=(HAPROXY, NGINX)))
    print("  direct: plaintext HTTP/1.1 (h2c for h2) to backend 1, no TLS, no middle. The proxies "
          "speak HTTP/1.1 to the backends over kept connections, h2 clients included"
          + (f"; but mn-gateway's h2 row is h2 both sides ({H2_HOSTNAME} routed to the backends' "
             "h2c ports: bench.test was not offered h2, meshnode not translating h2 to HTTP/1.1)"
             if h2_apart else "") + ". Access log: meshnode on, HAProxy and nginx off.")
    for name in names:
        for text in tls.get(name, []):
            print(f"  {name}: TLS {text}")
        if name in no_h2:
            print(f"  {name}: h2 not measured: {no_h2[name]} was not offered h2 by ALPN")
        got = routing.get(name, {})
        under = {load: http._split_text(s) for load, s in loads.get(name, {}).items() if s}
        if got:  # direct has no routes: everything lands on backend 1
            checks = ", ".join(f"{what} {'-' if s is None else f'{s[0]}/{s[1]}'}"
                               for what, s in got.items())
            print(f"  {name}: backends 1/2, {CHECK_REQUESTS} requests on one connection: "
                  f"{checks or '-'}; under load: "
                  f"{', '.join(f'{k} {t}' for k, t in under.items()) or '-'}")
    for name in names:
        failed = {load: (sum(raw.get(name, {}).get(f"{load}_errors", [])),
                         sum(raw.get(name, {}).get(f"{load}_sent", []))) for load in LOADS}
        if bad := ", ".join(f"{load} {e} of {n}" for load, (e, n) in failed.items() if e):
            print(f"  {name}: failed requests (runs with more than {MAX_ERRORS:.0%} failed are "
                  f"not counted): {bad}")
    if counted:
        print(f"  {GATEWAY} meshnode_requests_total by dst: {counted['seen']} for "
              f"{counted['sent']} requests sent through the gateway; access log: "
              f"{counted['access_log_lines']} lines")
    print(f"wrote {path}")
    for t, what, bound in zip(ts, ("req/s", "p99"), ("target >= 1.0", "target <= 1.2"),
                              strict=True):
        print(f"gateway {what} vs haproxy: {report._fmt(t.value)} ({bound}) {_verdict(t)}")
    print(report.targets_line(ts) + ("" if judged or GATEWAY not in names else
                                      f" · ({GATEWAY} not judged: it did not route as configured)"))
    return 0


def _mn_counted(b: Bench) -> dict[str, Any]:
    """meshnode_requests_total of the routes' services against what was sent through the gateway
    (workers report about once a second)."""
    seen: dict[str, int] = {}

    def caught_up() -> bool:
        nonlocal seen
        seen = b.http.mn_requests()
        return sum(seen.get(s, 0) for s in (*SERVICES, *H2_SERVICES)) >= b.sent

    with contextlib.suppress(AssertionError, ClientError):
        wait_for("meshnode_requests_total to count the requests sent", caught_up, 5)
    h = b.http.host
    log = h.tmp / "log" / h.tag / "access.log"
    lines = sum(1 for _ in log.open("rb")) if log.exists() else 0
    return {"seen": seen, "sent": b.sent, "access_log_lines": lines}




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.gateway",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short form (make bench-quick)")
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench")
    ap.add_argument("--only", default="",
                    help=f"variants, comma-separated, of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the logs' temporary folder")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a network namespace, BPF)", file=sys.stderr)
        return 77
    if missing := [t for t in ("haproxy", "nginx", "wrk", "h2load", "openssl")
                   if shutil.which(t) is None]:
        print(f"missing: {', '.join(missing)}; install with: sudo ./setup.sh bench",
              file=sys.stderr)
        return 69
    os.environ["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    interrupt_on_signals()
    return run(args.quick, args.out, args.only, args.keep)


if __name__ == "__main__":
    sys.exit(main())
