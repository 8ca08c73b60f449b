"""HTTP/1.1 through a real agent, with real clients (curl, wrk, Python sockets) and real servers
(tests/l7/): what a user of an `http` or `auto` port sees. The requests of one keep-alive
connection spread over the endpoints; the request counters are exact per status class; an
endpoint killed under wrk costs the clients nothing (retries), while retries stop at the budget
when every endpoint fails; the request, per-try and idle timeouts fire; a trace's spans link
across two hops at a real OTLP receiver; an `auto` port hands a server-first protocol its banner
within the detection window and relays a client-first one at once; the access log has a line
per request.

Counters are read from /metrics, which the agent fills from its workers about once a second:
the tests wait for the value they expect (with a deadline), never for a fixed time. Every host
has one worker, so a service's retry budget (kept per worker) is the one configured."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnode.host.netns import enter_netns
from tests.harness import Host, free_port, wait_for
from tests.integration.conftest import BACKENDS
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
HostFactory = Callable[..., Host]
# 5xx answers never eject an endpoint: in these tests the statuses are the test's, not a fault
NO_5XX_EJECTION = {"outlier": {"consecutive5xx": 0}}

# argv: VIP. One request on a keep-alive connection, then the connection is left idle: prints
# {"status": N, "idle": seconds from the response to the proxy's close (EOF), or null}.
IDLE_CLIENT = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET /idle HTTP/1.1\r\nHost: web\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
head, _, body = buf.partition(b"\r\n\r\n")
length = 0
for line in head.split(b"\r\n")[1:]:
    name, _, value = line.partition(b":")
    if name.strip().lower() == b"content-length":
        length = int(value)
while len(body) < length:
    body += s.recv(4096)
t0 = time.monotonic()
try:
    idle = time.monotonic() - t0 if s.recv(1) == b"" else None
except OSError:
    idle = time.monotonic() - t0
print(json.dumps({"status": int(head.split()[1]), "idle": idle}))
"""


# -- servers and clients ----------------------------------------------------------------------

def ports(n: int) -> list[int]:
    chosen: set[int] = set()
    while len(chosen) < n:
        chosen.add(free_port())
    return sorted(chosen)


def run(h: Host, module: str, *args: str, service: str | None) -> subprocess.Popen[str]:
    """`python -m tests.l7.MODULE ARGS` in the host (enrolled as `service`), once listening."""
    p = h.popen([sys.executable, "-m", f"tests.l7.{module}", *args], service,
                stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening", module
    return p


def http_service(h: Host, name: str, n: int, patch: dict[str, Any] | None = None,
                 delays: dict[int, int] | None = None, protocol: str = "http",
                 port: int = 80) -> dict[str, tuple[int, subprocess.Popen[str]]]:
    """Service `name` on VIP:`port` with `n` backends (tests/l7/backend.py) named NAME-i:
    {backend name: (its port, its process)}. `delays`: ms added to backend i's every answer."""
    out = {}
    for i, p in enumerate(ports(n)):
        delay = str((delays or {}).get(i, 0))
        out[f"{name}-{i}"] = (p, run(h, "backend", f"{name}-{i}", str(p), delay, service=name))
    h.call("service.add", name=name,
           patch={"port": port, "protocol": protocol, **(patch or {})})
    h.wait_endpoints(name, {f"127.0.0.1:{p}" for p, _ in out.values()})
    return out


def vip(h: Host, service: str) -> str:
    return str(h.service(service)["vip"])


def served(h: Host, backend_port: int) -> int:
    """How many requests a backend answered, asked directly (not through the mesh)."""
    status, body = h.http_get("/count", port=backend_port)
    assert status == 200, body
    return int(json.loads(body)["count"])


@dataclass(frozen=True)
class Reply:
    status: int
    seconds: float
    connects: int  # new TCP connections curl made for this transfer (0: reused)
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


_WRITE_OUT = "~~%{http_code} %{time_total} %{num_connects}\n"  # not @: that reads a file
_REPLY = re.compile(r"(.*?)~~(\d+) ([\d.]+) (\d+)\n", re.S)


def curl(h: Host, urls: list[str], *args: str,
         service: str | None = "client") -> tuple[list[Reply], str]:
    """One curl process fetching `urls` in order (one connection, kept alive): each reply,
    and curl's -v output."""
    p = h.popen(["curl", "-sS", "-v", "-w", _WRITE_OUT, *args, *urls], service,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    replies = [Reply(int(code), float(t), int(n), body)
               for body, code, t, n in _REPLY.findall(out)]
    assert len(replies) == len(urls), (out, err[-3000:])
    return replies, err


# -- metrics ----------------------------------------------------------------------------------

Sample = tuple[str, dict[str, str], float]
_SAMPLE = re.compile(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(h: Host) -> list[Sample]:
    status, text = h.http_get("/metrics")
    assert status == 200
    out = []
    for line in text.splitlines():
        m = _SAMPLE.fullmatch(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == x for k, x in labels.items()))


def settled(h: Host, name: str, expected: float, timeout: float = 15.0,
            **labels: str) -> list[Sample]:
    """The metrics once `name{labels}` reaches `expected` (the agent pulls the workers' counters
    about every second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(h)
        got = value(samples, name, **labels)
        if got == expected:
            return samples
        if time.monotonic() > deadline:
            rows = [s for s in samples if s[0].startswith(("meshnode_request",
                                                           "meshnode_retry"))]
            raise AssertionError(f"{name}{labels} is {got}, not {expected}; {rows}")
        time.sleep(0.2)


def requests_by_class(samples: list[Sample], dst: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, lab, v in samples:
        if n == "meshnode_requests_total" and lab.get("dst") == dst:
            out[lab["status_class"]] = out.get(lab["status_class"], 0.0) + v
    return out


def access_log(h: Host, dst: str, n: int) -> list[dict[str, Any]]:
    """The access log's request lines to `dst`, once there are `n` (lines are flushed in
    batches every 0.2 s)."""
    path = h.tmp / "log" / h.tag / "access.log"

    def lines() -> list[dict[str, Any]] | None:
        if not path.exists():
            return None
        found = [x for x in map(json.loads, path.read_text().splitlines())
                 if x.get("kind") == "request" and x.get("dst") == dst]
        return found if len(found) >= n else None

    found: list[dict[str, Any]] = wait_for(f"{n} access log lines to {dst}", lines)
    return found


def started(make_host: HostFactory, backend: str = "ebpf") -> Host:
    h = make_host(backend, workers=1)
    h.start()
    return h


# -- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_of_one_keep_alive_connection_spread_over_endpoints(
        make_host: HostFactory, backend: str) -> None:
    h = started(make_host, backend)
    http_service(h, "web", 2)
    address = vip(h, "web")
    replies, err = curl(h, [f"http://{address}/k{i}" for i in range(20)])
    assert [r.status for r in replies] == [200] * 20
    # one TCP connection: curl opened it for the first URL and reused it 19 times
    assert [r.connects for r in replies] == [1] + [0] * 19
    assert err.count("Re-using existing connection") == 19, err[-2000:]
    names = Counter(r.json()["name"] for r in replies)
    assert set(names) == {"web-0", "web-1"}, names
    assert [r.json()["path"] for r in replies] == [f"/k{i}" for i in range(20)]
    samples = settled(h, "meshnode_requests_total", 20, src="client", dst="web",
                      route="default", method="GET", status_class="2xx")
    assert requests_by_class(samples, "web") == {"2xx": 20}
    picks = {lab["endpoint"]: v for n, lab, v in samples
             if n == "meshnode_endpoint_selections_total" and lab["dst"] == "web"}
    print(f"\n{backend}: 20 requests on one connection, by endpoint: {dict(names)}; "
          f"balancer selections: {picks}")
    assert sum(picks.values()) == 20 and len(picks) == 2


def test_request_counters_are_exact_per_status_class_and_logged(
        make_host: HostFactory) -> None:
    h = started(make_host)
    backends = http_service(h, "web", 2, NO_5XX_EJECTION)
    address = vip(h, "web")
    paths = ["/status/200"] * 6 + ["/status/404"] * 4 + ["/status/500"] * 3
    paths = paths[::2] + paths[1::2]  # interleaved
    replies, _ = curl(h, [f"http://{address}{p}" for p in paths])
    assert [r.status for r in replies] == [int(p.rsplit("/", 1)[1]) for p in paths]
    samples = settled(h, "meshnode_requests_total", len(paths), dst="web")
    assert requests_by_class(samples, "web") == {"2xx": 6, "4xx": 4, "5xx": 3}
    assert value(samples, "meshnode_requests_total", src="client", dst="web",
                 route="default", method="GET", status_class="5xx") == 3
    # a 500 is the application's answer: not retried (only 502, 503 and 504 are)
    assert value(samples, "meshnode_request_retries_total", dst="web") == 0
    assert value(samples, "meshnode_request_failures_total", dst="web") == 0
    counts = {name: served(h, port) for name, (port, _) in backends.items()}
    assert sum(counts.values()) == len(paths), counts

    lines = access_log(h, "web", len(paths))
    endpoints = {f"127.0.0.1:{port}" for port, _ in backends.values()}
    assert len(lines) == len(paths)
    for line in lines:
        assert (line["kind"], line["src"], line["method"], line["route"]) == \
            ("request", "client", "GET", "default"), line
        assert line["status"] == int(line["path"].rsplit("/", 1)[1]), line
        assert line["endpoint"] in endpoints, line
        assert (line["attempts"], line["retries"], line["outcome"]) == (1, 0, "ok"), line
    assert sorted(x["path"] for x in lines) == sorted(paths)
    print(f"\nby class {requests_by_class(samples, 'web')}, by backend {counts}; "
          f"an access log line: {json.dumps(lines[0])}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_endpoint_killed_under_load_costs_the_clients_no_errors(
        make_host: HostFactory, backend: str) -> None:
    h = started(make_host, backend)
    # 5 ms an answer: most of a request's time is spent at its endpoint, so the killed one
    # has requests in flight (reset under them) as well as connections in the pool
    backends = http_service(h, "web", 3, delays={0: 5, 1: 5, 2: 5})
    address = vip(h, "web")
    victim_port, victim = backends["web-2"]
    victim_addr = f"127.0.0.1:{victim_port}"
    wrk = h.popen(["wrk", "-t1", "-c8", "-d6s", f"http://{address}/"], "client",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # mid-run: once the victim has its share of the load
        wait_for("web-2 serving wrk's requests", lambda: served(h, victim_port) >= 50,
                 timeout=10)
        victim.kill()
        killed = time.monotonic()

        def out_of_rotation() -> str | None:
            if victim_addr not in {e["addr"] for e in h.service("web")["endpoints"]}:
                return "removed"
            if value(scrape(h), "meshnode_endpoint_ejected_seconds", dst="web",
                     endpoint=victim_addr) > 0:
                return "ejected"
            return None

        how = wait_for("the killed endpoint out of rotation", out_of_rotation, timeout=5)
        after = time.monotonic() - killed
        # the next pull of the worker's counters covers every request sent until then
        before = value(scrape(h), "meshnode_requests_total", dst="web")
        samples = wait_for("a newer counter pull", lambda: (s := scrape(h)) and value(
            s, "meshnode_requests_total", dst="web") > before and s, timeout=5)
        picked = value(samples, "meshnode_endpoint_selections_total", dst="web",
                       endpoint=victim_addr)
        out, err = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
    print(f"\n{backend}: $ wrk -t1 -c8 -d6s http://{address}/ (web-2 killed with SIGKILL "
          f"mid-run, {how} {after:.2f}s later)\n{out}{err}")
    assert wrk.returncode == 0, err
    assert "Non-2xx or 3xx responses" not in out and "Socket errors" not in out, out
    m = re.search(r"(\d+) requests in", out)
    assert m is not None, out
    total = int(m[1])
    samples = settled(h, "meshnode_requests_total", 0, dst="web", status_class="5xx")
    samples = wait_for("wrk's requests counted", lambda: (s := scrape(h)) and value(
        s, "meshnode_requests_total", dst="web", status_class="2xx") >= total and s)
    retries = value(samples, "meshnode_request_retries_total", dst="web")
    exhausted = value(samples, "meshnode_retry_budget_exhausted_total", dst="web")
    classes = requests_by_class(samples, "web")
    failures = {lab["reason"]: v for n, lab, v in samples
                if n == "meshnode_request_failures_total" and lab["dst"] == "web"}
    print(f"wrk: {total} requests, 0 errors; proxy: requests by class {classes}, "
          f"retries {retries:.0f}, budget exhausted {exhausted:.0f}, failures {failures}")
    assert retries > 0
    assert exhausted == 0
    assert classes.get("5xx", 0) == 0 and classes.get("4xx", 0) == 0, classes
    # wrk stops with requests in flight: those few are the only ones without a response
    assert classes.get("none", 0) <= 8, classes
    # nothing went to the killed endpoint once it was out of rotation
    assert value(samples, "meshnode_endpoint_selections_total", dst="web",
                 endpoint=victim_addr) == picked


def test_retries_stop_at_the_budget_when_every_endpoint_fails(make_host: HostFactory) -> None:
    h = started(make_host)
    ratio, per_second, window, n = 0.2, 0.2, 10, 40
    budget = {"ratio": ratio, "minPerSecond": per_second, "window": window}
    backends = http_service(h, "web", 2, {
        **NO_5XX_EJECTION,
        "http": {"retry": {"attempts": 2, "backoff": 0}, "retryBudget": budget}})
    address = vip(h, "web")
    replies, _ = curl(h, [f"http://{address}/status/503"] * n)
    elapsed = sum(r.seconds for r in replies)
    assert elapsed < window  # every request (and retry) within one budget window
    samples = settled(h, "meshnode_requests_total", n, dst="web")
    retries = value(samples, "meshnode_request_retries_total", dst="web")
    exhausted = value(samples, "meshnode_retry_budget_exhausted_total", dst="web")
    counts = {name: served(h, port) for name, (port, _) in backends.items()}
    bound = ratio * n + per_second * window
    statuses = Counter(r.status for r in replies)
    errors = Counter(r.body.strip() for r in replies if r.status != 503)
    print(f"\n{n} requests, every endpoint answering 503, retry attempts 2, budget {budget}: "
          f"retries {retries:.0f} (bound {bound:.0f}, {2 * n} without a budget), "
          f"budget exhausted {exhausted:.0f}, requests at the backends {counts}, "
          f"clients got {dict(statuses)} {dict(errors)} in {elapsed:.2f}s")
    assert 0 < retries <= bound
    assert exhausted > 0
    # no retry storm: the backends saw each request once, plus the budgeted retries
    assert sum(counts.values()) == n + retries, counts
    # the clients get the endpoints' answer, 503, whether or not a retry was allowed
    assert statuses == {503: n}, (statuses, errors)


def test_request_per_try_and_idle_timeouts_fire(make_host: HostFactory) -> None:
    h = started(make_host)
    # web-0 answers at once, web-1 after 1.5 s; round-robin sends every other request's first
    # attempt to web-1, where the per-try timeout gives up on it
    backends = http_service(h, "web", 2, {
        "balancer": {"algorithm": "round-robin"},
        **NO_5XX_EJECTION,
        "http": {"timeouts": {"request": 5, "perTry": 0.25, "idle": 1.0},
                 "routes": [{"name": "slow", "match": {"pathPrefix": "/slow"},
                             "timeouts": {"request": 0.3}}]}},
        delays={1: 1500})
    address = vip(h, "web")
    fast = f"127.0.0.1:{backends['web-0'][0]}"

    # the request timeout: 504 after 0.3 s, said by the proxy
    (reply,), _ = curl(h, [f"http://{address}/slow/2000"], "-i")
    assert reply.status == 504
    assert "x-meshnode-error: timeout" in reply.body.lower(), reply.body
    assert 0.3 <= reply.seconds < 1.0, reply.seconds

    # the per-try timeout: a GET that meets the slow endpoint is retried on the fast one
    replies, _ = curl(h, [f"http://{address}/p{i}" for i in range(4)])
    assert [(r.status, r.json()["name"]) for r in replies] == [(200, "web-0")] * 4
    assert all(r.seconds < 1.0 for r in replies), [r.seconds for r in replies]
    samples = settled(h, "meshnode_requests_total", 5, dst="web")
    assert value(samples, "meshnode_requests_total", dst="web", route="slow",
                 status_class="5xx") == 1
    assert value(samples, "meshnode_request_failures_total", dst="web", route="slow",
                 reason="timeout") == 1
    retries = value(samples, "meshnode_request_retries_total", dst="web", route="default")
    assert retries >= 1
    lines = access_log(h, "web", 5)
    retried = [x for x in lines if x["retries"]]
    assert len(retried) == retries
    for x in retried:
        assert (x["status"], x["endpoint"], x["attempts"], x["retries"], x["outcome"]) == \
            (200, fast, 2, 1, "ok"), x
    (slow,) = [x for x in lines if x["route"] == "slow"]
    assert (slow["status"], slow["outcome"]) == (504, "timeout"), slow

    # the idle timeout: a keep-alive connection with nothing in flight is closed after 1 s
    p = h.popen([sys.executable, "-c", IDLE_CLIENT, address], "client",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    idle = json.loads(out)
    print(f"\nrequest timeout 0.3s: 504 in {reply.seconds:.3f}s; perTry 0.25s: "
          f"{[round(r.seconds, 3) for r in replies]}s, {retries:.0f} retried; idle 1.0s: "
          f"closed after {idle['idle']}s")
    assert idle["status"] == 200
    assert idle["idle"] is not None and 1.0 <= idle["idle"] < 3.0, idle


def test_a_trace_links_its_spans_across_two_hops(make_host: HostFactory,
                                                  tmp_path: Path) -> None:
    h = started(make_host)
    receiver = in_namespace(h, OtlpReceiver)
    with receiver:
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text("kind: Mesh\nname: mesh\nspec:\n  tracing:\n"
                        f"    otlpEndpoint: \"{receiver.endpoint}\"\n    sampling: 1.0\n")
        r = h.cli("apply", "-f", str(mesh))
        assert r.returncode == 0, r.stderr
        http_service(h, "b", 1)
        b_vip = vip(h, "b")
        a_port = free_port()
        run(h, "forwarder", "a-0", str(a_port), f"http://{b_vip}/inner", service="a")
        h.call("service.add", name="a", patch={"port": 80, "protocol": "http"})
        h.wait_endpoints("a", {f"127.0.0.1:{a_port}"})

        (reply,), _ = curl(h, [f"http://{vip(h, 'a')}/outer"])
        assert reply.status == 200, reply.body
        answer = reply.json()
        spans = receiver.wait_for(lambda s: len(s) >= 2, timeout=15)
    assert len(spans) == 2, spans
    (first,) = [s for s in spans if s.attributes["meshnode.dst"] == "a"]
    (second,) = [s for s in spans if s.attributes["meshnode.dst"] == "b"]
    print(f"\nspans at the OTLP receiver:\n  {first}\n  {second}\n"
          f"traceparent seen by a: {answer['traceparent']}, by b: "
          f"{answer['upstream']['traceparent']}")
    # client -> a: a new trace (curl sent no traceparent)
    assert first.parent_span_id == ""
    assert (first.attributes["meshnode.src"], first.attributes["http.response.status_code"],
            first.attributes["url.path"], first.attributes["http.request.method"]) == \
        ("client", 200, "/outer", "GET")
    assert first.name == "GET a"
    # a -> b: the same trace, its parent the first hop's span (a forwarded the traceparent
    # the proxy gave it, naming that span)
    assert second.trace_id == first.trace_id
    assert second.parent_span_id == first.span_id
    assert (second.attributes["meshnode.src"], second.attributes["http.response.status_code"],
            second.attributes["url.path"]) == ("a", 200, "/inner")
    assert answer["traceparent"] == f"00-{first.trace_id}-{first.span_id}-01"
    assert answer["upstream"]["traceparent"] == f"00-{first.trace_id}-{second.span_id}-01"
    for s in (first, second):
        assert s.kind == 3 and s.status_code == 0 and s.attributes["meshnode.retries"] == 0
        assert s.resource["service.name"] == "meshnode-proxy"


def in_namespace(h: Host, make: Callable[[], OtlpReceiver]) -> OtlpReceiver:
    """`make()` called on a thread that joined the host's network namespace (setns is per
    thread), so its listening socket is there, where the workers export to 127.0.0.1."""
    made: list[OtlpReceiver] = []
    failed: list[BaseException] = []

    def build() -> None:
        try:
            enter_netns(h.netns)
            made.append(make())
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    t = threading.Thread(target=build)
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return made[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_port_detects_http_and_never_stalls_a_server_first_protocol(
        make_host: HostFactory, backend: str) -> None:
    h = started(make_host, backend)
    http_service(h, "web", 1, protocol="auto")
    mail_port, kv_port = ports(2)
    run(h, "tcp_server", str(mail_port), "220 ready", service="mail")
    run(h, "tcp_server", str(kv_port), service="kv")
    h.call("service.add", name="mail",
           patch={"port": 25, "protocol": "auto", "http": {"detectTimeout": 0.2}})
    # a long window: a client-first protocol must not wait for it
    h.call("service.add", name="kv",
           patch={"port": 6379, "protocol": "auto", "http": {"detectTimeout": 2.0}})
    h.wait_endpoints("mail", {f"127.0.0.1:{mail_port}"})
    h.wait_endpoints("kv", {f"127.0.0.1:{kv_port}"})

    # HTTP/1.1 is found and handled per request
    (reply,), _ = curl(h, [f"http://{vip(h, 'web')}/"])
    assert (reply.status, reply.json()["name"]) == (200, "web-0")

    def probe(host: str, port: int, *send: str, service: str | None) -> list[float]:
        p = h.popen([sys.executable, "-m", "tests.l7.tcp_probe", host, str(port), "5", *send],
                    service, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    cwd=REPO)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        got = json.loads(out)
        assert got["lines"] == [send[0] if send else "220 ready"] * 5, got
        return list(got["seconds"])

    # server-first: the banner arrives once the 0.2 s window has passed, not later
    banner = probe(vip(h, "mail"), 25, service="client")
    direct = probe("127.0.0.1", mail_port, service=None)
    # client-first, not HTTP: relayed as tcp as soon as the first bytes say so
    ping = probe(vip(h, "kv"), 6379, "PING", service="client")
    ping_direct = probe("127.0.0.1", kv_port, "PING", service=None)
    samples = settled(h, "meshnode_protocol_detections_total", 5, dst="kv", result="tcp")
    print(f"\n{backend}: banner {banner}, direct {direct}; PING {ping}, direct {ping_direct}")
    print(f"{backend}: auto, detectTimeout 0.2s, server-first banner: median "
          f"{statistics.median(banner) * 1000:.1f} ms through the mesh (max "
          f"{max(banner) * 1000:.1f}) vs {statistics.median(direct) * 1000:.1f} ms direct; "
          f"client-first PING (detectTimeout 2s): median {statistics.median(ping) * 1000:.1f} "
          f"ms vs {statistics.median(ping_direct) * 1000:.1f} ms direct")
    assert all(0.2 <= t < 0.5 for t in banner), banner
    assert all(t < 1.0 for t in ping), ping
    detections = {(lab["dst"], lab["result"]): v for n, lab, v in samples
                  if n == "meshnode_protocol_detections_total"}
    assert detections == {("web", "http1"): 1, ("mail", "timeout"): 5, ("kv", "tcp"): 5}
    assert requests_by_class(samples, "web") == {"2xx": 1}
    assert requests_by_class(samples, "mail") == {} and requests_by_class(samples, "kv") == {}
