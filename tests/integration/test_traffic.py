"""Traffic control (Route resources) through a real agent, with real clients (a keep-alive
Python load client, grpcio, TCP probes) and real servers (tests/l7/): what a user applying a
Route sees. A 90/10 split is 90/10 over 2 000 requests and moves to 50/50 under load without
an error; header and cookie rules send exactly the requests they match to the canary;
injected aborts and delays hit the configured share of requests (only those carrying the
fault's header, when it names one); mirrored copies arrive at the mirror while the real
requests are as fast as without, and a dead mirror costs the clients nothing; a rate limit
accepts its rate and answers the rest 429 with Retry-After; gRPC calls get the abort's
grpcStatus and RESOURCE_EXHAUSTED; TCP connections split by weight.

Endpoints carry labels from enrollment (`meshnode run --label version=v2`). Every host has one
worker: a split's turns and a rate limit's bucket are per worker, so one worker makes them the
configured ones exactly. Routes are applied with `meshnode apply -f`, as a user would; a test
waits for a Route to be in force by what requests then do (never for a fixed time)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Host, free_port, wait_for
from tests.integration.test_h2 import grpc_call
from tests.integration.test_http import scrape, served, settled, value, vip

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
HostFactory = Callable[..., Host]


# -- servers, clients, routes -----------------------------------------------------------------

def labelled(h: Host, service: str, labels: Iterable[str], module: str,
             *args: str) -> subprocess.Popen[str]:
    """`python -m tests.l7.MODULE ARGS` enrolled in `service` with `labels` (KEY=VALUE), as
    `meshnode run --service S --label K=V -- CMD` starts it; returned once it listens."""
    argv = [sys.executable, "-m", "meshnode.cli", "run", "--instance", h.tag,
            "--service", service]
    for label in labels:
        argv += ["--label", label]
    argv += ["--", sys.executable, "-m", f"tests.l7.{module}", *args]
    p = h.popen(argv, None, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening", module
    return p


def http_backend(h: Host, service: str, name: str, *labels: str,
                 delay_ms: int = 0) -> tuple[int, subprocess.Popen[str]]:
    """tests/l7/backend.py named `name`, an endpoint of `service`: (its port, its process)."""
    port = free_port()
    return port, labelled(h, service, labels, "backend", name, str(port), str(delay_ms))


def add_service(h: Host, name: str, ports: Iterable[int], protocol: str = "http",
                port: int = 80) -> None:
    h.call("service.add", name=name, patch={"port": port, "protocol": protocol})
    h.wait_endpoints(name, {f"127.0.0.1:{p}" for p in ports})


def apply(h: Host, tmp_path: Path, text: str) -> None:
    """`meshnode apply -f` of `text` (YAML)."""
    path = tmp_path / f"route-{time.monotonic_ns()}.yaml"
    path.write_text(text)
    r = h.cli("apply", "-f", str(path))
    assert r.returncode == 0, r.stderr


@dataclass(frozen=True)
class Row:
    """One request of tests/l7/load_client.py."""

    status: int  # 0: failed at the socket
    name: str  # the backend that answered ("": the proxy answered)
    seconds: float
    retry_after: str | None
    error_header: str | None  # x-meshnode-error
    error: str  # the socket error


def load(h: Host, url: str, n: int = 0, conns: int = 4, headers: Iterable[str] = (),
         seconds: float = 0.0, service: str = "client") -> list[Row]:
    """`n` GETs of `url` (or as many as fit in `seconds`) over `conns` keep-alive
    connections, from `service`."""
    return collect(start_load(h, url, n, conns, headers, seconds, service), n, seconds)


def start_load(h: Host, url: str, n: int = 0, conns: int = 4, headers: Iterable[str] = (),
               seconds: float = 0.0, service: str = "client") -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.l7.load_client", url, "--n", str(n),
            "--conns", str(conns), "--seconds", str(seconds)]
    for header in headers:
        argv += ["-H", header]
    return h.popen(argv, service, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   cwd=REPO)


def collect(p: subprocess.Popen[str], n: int = 0, seconds: float = 0.0) -> list[Row]:
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert lines and lines[0] == "started", (out[-2000:], err[-2000:])
    rows = [Row(*json.loads(line)) for line in lines[1:]]
    assert seconds or len(rows) == n, (len(rows), err[-2000:])
    return rows


class Background:
    """tests/l7/load_client.py running until `stop()`: its rows as they arrive."""

    def __init__(self, h: Host, url: str, conns: int = 4) -> None:
        self.p = h.popen([sys.executable, "-m", "tests.l7.load_client", url, "--n", "0",
                          "--conns", str(conns)], "client", stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert self.p.stdout is not None
        assert self.p.stdout.readline().strip() == "started"
        self.rows: list[Row] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.rows.append(Row(*json.loads(line)))

    def wait(self, n: int, timeout: float = 60) -> None:
        wait_for(f"{n} requests of the load loop", lambda: len(self.rows) >= n or (
            self.p.poll() is not None and not self.reader.is_alive() and
            _died(self.p)), timeout)

    def stop(self) -> list[Row]:
        assert self.p.stdin is not None
        self.p.stdin.write("stop\n")
        self.p.stdin.flush()
        self.p.wait(30)
        self.reader.join(10)
        assert self.p.returncode == 0, self.p.stderr.read() if self.p.stderr else ""
        return self.rows


def _died(p: subprocess.Popen[str]) -> bool:
    raise AssertionError(f"the load loop exited {p.returncode}: "
                         f"{p.stderr.read()[-2000:] if p.stderr else ''}")


def share(rows: list[Row], name: str) -> float:
    return sum(r.name == name for r in rows) / len(rows)


def errors(rows: list[Row], ok: Iterable[int] = (200,)) -> list[Row]:
    allowed = set(ok)
    return [r for r in rows if r.status not in allowed or r.error]


def started(make_host: HostFactory) -> Host:
    h = make_host("ebpf", workers=1)
    h.start()
    return h


def reviews(h: Host) -> dict[str, int]:
    """Service `reviews` on VIP:80 (http) with two endpoints, labelled version=v1 and v2:
    {backend name: port}."""
    out = {}
    for version in ("v1", "v2"):
        port, _ = http_backend(h, "reviews", version, f"version={version}")
        out[version] = port
    add_service(h, "reviews", out.values())
    return out


def split_route(v1: int, v2: int) -> str:
    return f"""\
kind: Route
name: reviews
spec:
  service: reviews
  rules:
  - name: split
    backends:
    - {{service: reviews, subset: {{version: v1}}, weight: {v1}}}
    - {{service: reviews, subset: {{version: v2}}, weight: {v2}}}
"""


# -- the tests --------------------------------------------------------------------------------

def test_a_split_holds_its_weights_and_moves_live_without_an_error(
        make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    reviews(h)
    url = f"http://{vip(h, 'reviews')}/"
    apply(h, tmp_path, split_route(90, 10))
    # in force: smooth weighted round robin puts exactly 2 v2 turns in any 20 requests
    # (without the Route the balancer spreads about evenly)
    wait_for("the 90/10 split in force",
             lambda: sum(r.name == "v2" for r in load(h, url, 20, conns=1)) == 2, timeout=20)

    loop = Background(h, url)
    try:
        loop.wait(2000)
        before = loop.rows[:2000]
        t0 = time.monotonic()
        apply(h, tmp_path, split_route(50, 50))
        applied = len(loop.rows)

        def moved() -> bool:
            # the last 200 requests are split 50/50 (exactly, once the new weights serve)
            tail = loop.rows[-200:]
            return len(loop.rows) > applied + 200 and abs(share(tail, "v2") - 0.5) <= 0.03

        wait_for("the 50/50 split in force", moved, timeout=30)
        took = time.monotonic() - t0
        mark = len(loop.rows)
        loop.wait(mark + 2000)
    finally:
        rows = loop.stop()
    after = rows[mark:mark + 2000]
    v2_before, v2_after = share(before, "v2"), share(after, "v2")
    failed = errors(rows)
    print(f"\n90/10: v2 got {v2_before:.1%} of the first 2000 requests; 50/50 applied under "
          f"load, in force within {took:.2f}s; v2 then got {v2_after:.1%} of 2000; "
          f"{len(rows)} requests over 4 keep-alive connections, {len(failed)} errors")
    assert abs(v2_before - 0.10) <= 0.03, v2_before
    assert abs(v2_after - 0.50) <= 0.03, v2_after
    assert failed == [], Counter((r.status, r.error_header, r.error) for r in failed)
    assert {r.name for r in rows} == {"v1", "v2"}
    # the requests are counted under the rule's name
    wait_for("the requests counted", lambda: value(
        scrape(h), "meshnode_requests_total", dst="reviews", route="split",
        status_class="2xx") >= len(rows))


def test_header_and_cookie_rules_send_exactly_their_requests_to_the_canary(
        make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    reviews(h)
    url = f"http://{vip(h, 'reviews')}/"
    apply(h, tmp_path, """\
kind: Route
name: reviews
spec:
  service: reviews
  rules:
  - name: canary
    match:
    - headers: [{name: x-canary, exact: "1"}]
    backends: [{service: reviews, subset: {version: v2}}]
  - name: testers
    match:
    - cookies: [{name: user, regex: "^(alice|bob)$"}]
    backends: [{service: reviews, subset: {version: v2}}]
  - name: stable
    backends: [{service: reviews, subset: {version: v1}}]
""")
    wait_for("the Route in force",
             lambda: {r.name for r in load(h, url, 10, conns=1)} == {"v1"}, timeout=20)
    cases = {
        ("x-canary: 1",): "v2",
        ("x-canary: 0",): "v1",
        ("x-canary: 11",): "v1",
        (): "v1",
        ("cookie: theme=dark; user=alice",): "v2",
        ("cookie: user=bob",): "v2",
        ("cookie: user=alicia",): "v1",
        ("cookie: user=eve; x=alice",): "v1",
        ("x-canary: 1", "cookie: user=eve"): "v2",
    }
    got = {}
    for headers, want in cases.items():
        rows = load(h, url, 50, conns=2, headers=headers)
        got[headers] = Counter(r.name for r in rows)
        assert errors(rows) == [], (headers, errors(rows)[:3])
        assert got[headers] == {want: 50}, (headers, got[headers])
    print("\n" + "\n".join(f"{' + '.join(k) or '(no header)'}: {dict(v)}"
                           for k, v in got.items()))
    settled(h, "meshnode_requests_total", 100, dst="reviews", route="canary")
    settled(h, "meshnode_requests_total", 100, dst="reviews", route="testers")


def test_faults_abort_and_delay_their_share_of_requests(make_host: HostFactory,
                                                          tmp_path: Path) -> None:
    h = started(make_host)
    port, _ = http_backend(h, "web", "web-0")
    add_service(h, "web", [port])
    address = vip(h, "web")
    apply(h, tmp_path, """\
kind: Route
name: web
spec:
  service: web
  rules:
  - name: aborts
    match: [{path: {prefix: /abort}}]
    fault: {abort: {status: 503, percent: 20}}
  - name: delays
    match: [{path: {prefix: /delay}}]
    fault: {delay: {seconds: 0.4, percent: 10}}
  - name: tagged
    match: [{path: {prefix: /tagged}}]
    fault:
      abort: {status: 500, percent: 100}
      headers: [{name: x-fault, exact: "1"}]
""")
    wait_for("the Route in force", lambda: all(
        r.status == 500 for r in load(h, f"http://{address}/tagged", 3, 1, ["x-fault: 1"])))

    base = served(h, port)
    aborts = load(h, f"http://{address}/abort", 2000, conns=8)
    statuses = Counter(r.status for r in aborts)
    aborted = statuses[503]
    assert set(statuses) == {200, 503} and not any(r.error for r in aborts), statuses
    # an aborted request never reached the endpoint
    assert served(h, port) - base == statuses[200]

    delays = load(h, f"http://{address}/delay", 2000, conns=16)
    assert errors(delays) == []
    held = sorted(r.seconds for r in delays if r.seconds >= 0.4)
    quick = [r.seconds for r in delays if r.seconds < 0.4]

    tagged = load(h, f"http://{address}/tagged", 100, 2, ["x-fault: 1"])
    untagged = load(h, f"http://{address}/tagged", 100, 2)
    print(f"\nabort 503 for 20%: {aborted} of 2000 ({aborted / 2000:.1%}); delay 0.4s for "
          f"10%: {len(held)} of 2000 ({len(held) / 20:.1f}%) took {held[0]:.3f}-"
          f"{held[-1]:.3f}s, the others median {statistics.median(quick) * 1000:.1f} ms; "
          f"only with x-fault: 1: {Counter(r.status for r in tagged)}, without: "
          f"{Counter(r.status for r in untagged)}")
    assert abs(aborted / 2000 - 0.20) <= 0.03
    assert abs(len(held) / 2000 - 0.10) <= 0.03
    assert held[-1] < 1.0, held[-5:]  # held for the delay, not more
    assert statistics.median(quick) < 0.1
    assert [r.status for r in tagged] == [500] * 100
    assert [r.status for r in untagged] == [200] * 100


def test_mirrored_copies_arrive_and_never_slow_or_fail_the_real_requests(
        make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    port, _ = http_backend(h, "web", "web-0")
    add_service(h, "web", [port])
    # the mirror answers 20 ms late: were a request to wait for its copy, it would show. A
    # static endpoint: it stays in the table once its process is killed (copies then fail to
    # connect, rather than find no endpoint)
    shadow_port = free_port()
    shadow = h.popen([sys.executable, "-m", "tests.l7.backend", "shadow-0", str(shadow_port),
                      "20"], None, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert shadow.stdout is not None and shadow.stdout.readline().strip() == "listening"
    h.call("service.add", name="web-shadow", endpoints=[f"127.0.0.1:{shadow_port}"],
           patch={"port": 80, "protocol": "http"})
    h.wait_endpoints("web-shadow", {f"127.0.0.1:{shadow_port}"})
    url = f"http://{vip(h, 'web')}/"
    n = 500
    baseline = load(h, url, n, conns=1)
    apply(h, tmp_path, """\
kind: Route
name: web
spec:
  service: web
  rules:
  - name: mirrored
    mirror: {service: web-shadow, percent: 100}
""")
    wait_for("copies at the mirror", lambda: load(h, url, 1, conns=1) and served(
        h, shadow_port) > 0, timeout=20)
    # the copies so far, once all answered and counted
    settled_count = wait_for("the copies so far answered and counted", lambda: (
        c := served(h, shadow_port)) == value(
        scrape(h), "meshnode_mirror_requests_total", src="client", dst="web-shadow") and c)
    mirrored = load(h, url, n, conns=1)

    def copies(samples: list[Any]) -> tuple[float, dict[str, float]]:
        return (value(samples, "meshnode_mirror_requests_total", src="client",
                      dst="web-shadow"),
                {lab["reason"]: v for name, lab, v in samples
                 if name == "meshnode_mirror_dropped_total" and lab["dst"] == "web-shadow"})

    # every copy accounted for, answered or dropped
    sent, dropped = wait_for(f"{n} more copies counted", lambda: (c := copies(scrape(h))) and (
        c[0] + sum(c[1].values()) >= settled_count + n) and c)
    # every request copied once (sequential requests: fewer copies in flight than the bound)
    assert (sent, dropped) == (settled_count + n, {}), (sent - settled_count, dropped)
    assert served(h, shadow_port) == sent

    shadow.kill()
    shadow.wait(10)
    dead = load(h, url, n, conns=1)
    _, drops = wait_for("dropped copies counted", lambda: (c := copies(scrape(h))) and sum(
        c[1].values()) >= n and c)

    def ms(rows: list[Row], q: float) -> float:
        return statistics.quantiles([r.seconds for r in rows], n=100)[int(q) - 1] * 1000

    print(f"\n{n} sequential requests, p50/p90/p99 ms: no mirror {ms(baseline, 50):.2f}/"
          f"{ms(baseline, 90):.2f}/{ms(baseline, 99):.2f}; mirrored to a 20 ms mirror "
          f"{ms(mirrored, 50):.2f}/{ms(mirrored, 90):.2f}/{ms(mirrored, 99):.2f}; mirror "
          f"killed {ms(dead, 50):.2f}/{ms(dead, 90):.2f}/{ms(dead, 99):.2f}; copies "
          f"answered {settled_count + n}, dropped once dead {drops}")
    for rows in (baseline, mirrored, dead):
        assert errors(rows) == [] and {r.name for r in rows} == {"web-0"}
    # the real requests do not wait for their copies (20 ms each)
    assert ms(mirrored, 50) < max(2 * ms(baseline, 50), ms(baseline, 50) + 5)
    assert ms(mirrored, 90) < 20 and ms(dead, 90) < 20
    assert ms(dead, 50) < max(2 * ms(baseline, 50), ms(baseline, 50) + 5)


def test_a_rate_limit_accepts_its_rate_and_answers_the_rest_429(
        make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    port, _ = http_backend(h, "web", "web-0")
    add_service(h, "web", [port])
    address = vip(h, "web")
    rate, burst, window = 100, 50, 3.0
    apply(h, tmp_path, f"""\
kind: Route
name: web
spec:
  service: web
  rules:
  - name: limited
    match: [{{path: {{prefix: /limited}}}}]
    rateLimit: {{requestsPerSecond: {rate}, burst: {burst}}}
  - name: per-source
    match: [{{path: {{prefix: /per-source}}}}]
    rateLimit: {{requestsPerSecond: {rate / 2}, burst: 10, perSource: true}}
""")
    url = f"http://{address}/limited"
    wait_for("the limit in force", lambda: any(
        r.status == 429 for r in load(h, url, 200, conns=4)), timeout=20)
    base = served(h, port)
    rows = load(h, url, conns=4, seconds=window)
    statuses = Counter(r.status for r in rows)
    accepted = statuses[200]
    limited = [r for r in rows if r.status == 429]
    bound = rate * window + burst
    print(f"\nrateLimit {rate}/s burst {burst}: {len(rows)} requests in {window}s, "
          f"{accepted} accepted ({accepted / window:.1f}/s; bound {bound:.0f}), "
          f"{len(limited)} answered 429, Retry-After {Counter(r.retry_after for r in limited)}")
    assert set(statuses) == {200, 429}, statuses
    assert len(rows) > 2 * bound  # the client offered well over the limit
    assert rate * window * 0.9 <= accepted <= bound + rate * 0.1
    assert served(h, port) - base == accepted  # a limited request never reached the endpoint
    assert all(r.retry_after is not None and float(r.retry_after) > 0 for r in limited)
    # counted under the rule's name (the probes before included)
    samples = wait_for("the requests counted", lambda: (s := scrape(h)) and value(
        s, "meshnode_requests_total", dst="web", route="limited", status_class="4xx") >= len(
        limited) and s)
    assert value(samples, "meshnode_requests_total", dst="web", route="limited",
                 status_class="2xx") >= accepted

    # per source: two callers at once, each with a bucket of its own (the second's service
    # made first: a new service's cgroup is captured once the agent has set it up)
    wait_for("service other calling", lambda: load(
        h, f"http://{address}/", 1, 1, service="other")[0].status == 200)
    both = [start_load(h, f"http://{address}/per-source", conns=2, seconds=window,
                       service=caller) for caller in ("client", "other")]
    # read both at once: a client whose output pipe fills up stops sending
    with ThreadPoolExecutor(2) as pool:
        rows_by = dict(zip(("client", "other"), pool.map(
            lambda p: collect(p, seconds=window), both), strict=True))
    per = {caller: Counter(r.status for r in rows) for caller, rows in rows_by.items()}
    print(f"perSource {rate / 2:g}/s burst 10, two callers at once for {window}s: "
          f"{ {k: dict(v) for k, v in per.items()} }")
    for got in per.values():
        assert set(got) == {200, 429}, got
        assert rate / 2 * window * 0.9 <= got[200] <= rate / 2 * window + 10 + rate * 0.05


def test_grpc_calls_get_the_abort_status_and_resource_exhausted(
        make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    port, shadow_port = free_port(), free_port()
    labelled(h, "grpc", (), "grpc_backend", "serve", "grpc-0", str(port))
    add_service(h, "grpc", [port], protocol="grpc")
    labelled(h, "grpc-shadow", (), "grpc_backend", "serve", "shadow-0", str(shadow_port))
    add_service(h, "grpc-shadow", [shadow_port], protocol="grpc")
    target = f"{vip(h, 'grpc')}:80"
    apply(h, tmp_path, """\
kind: Route
name: grpc
spec:
  service: grpc
  rules:
  - name: broken
    match: [{grpc: {service: test.Echo, method: Unary}}]
    fault: {abort: {grpcStatus: 14, percent: 100}}
  - name: limited
    match: [{grpc: {service: test.Echo, method: Flaky}}]
    rateLimit: {requestsPerSecond: 1, burst: 5}
  - name: mirrored
    match: [{grpc: {service: test.Echo, method: Slow}}]
    mirror: {service: grpc-shadow}
""")
    wait_for("the Route in force",
             lambda: grpc_call(h, target, "unary", 1)[0]["code"] == "UNAVAILABLE")
    unary = grpc_call(h, target, "unary", 10)
    flaky = grpc_call(h, target, "flaky", 30)
    counts = json.loads(grpc_call(h, f"127.0.0.1:{port}", "count", service=None)[0]
                        ["replies"][0])
    codes = Counter(r["code"] for r in flaky)
    print(f"\nabort grpcStatus 14: {Counter(r['code'] for r in unary)} "
          f"({unary[0]['details']!r}); rateLimit 1/s burst 5, 30 calls: {dict(codes)} "
          f"({next(r['details'] for r in flaky if r['code'] != 'OK')!r}); served {counts}")
    assert [r["code"] for r in unary] == ["UNAVAILABLE"] * 10
    assert counts.get("Unary", 0) == 0  # aborted before any endpoint
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert 5 <= codes["OK"] <= 7, codes  # the burst, and what refilled meanwhile
    assert counts.get("Flaky", 0) == codes["OK"]

    # a gRPC call mirrored: the copy reaches the mirror's gRPC server (HTTP/2), the answer
    # is the real endpoint's
    (slow,) = grpc_call(h, target, "slow", 10)
    assert (slow["code"], slow["replies"]) == ("OK", ["grpc-0:10"])

    def at_shadow() -> dict[str, int]:
        served: dict[str, int] = json.loads(grpc_call(
            h, f"127.0.0.1:{shadow_port}", "count", service=None)[0]["replies"][0])
        return served

    assert wait_for("the copy at the mirror", at_shadow) == {"Slow": 1}
    settled(h, "meshnode_mirror_requests_total", 1, src="client", dst="grpc-shadow")


def test_tcp_connections_split_by_weight(make_host: HostFactory, tmp_path: Path) -> None:
    h = started(make_host)
    ports = {}
    for name, service, labels in (("v1", "db", ("version=v1",)), ("v2", "db", ("version=v2",)),
                                  ("next", "db-next", ())):
        ports[name] = free_port()
        labelled(h, service, labels, "tcp_server", str(ports[name]), name)
    add_service(h, "db", [ports["v1"], ports["v2"]], protocol="tcp", port=5432)
    add_service(h, "db-next", [ports["next"]], protocol="tcp", port=5432)
    address = vip(h, "db")
    apply(h, tmp_path, """\
kind: Route
name: db
spec:
  service: db
  tcp:
    backends:
    - {service: db, subset: {version: v1}, weight: 2}
    - {service: db, subset: {version: v2}, weight: 1}
    - {service: db-next, weight: 1}
""")

    def banners(n: int) -> Counter[str]:
        p = h.popen([sys.executable, "-m", "tests.l7.tcp_probe", address, "5432", str(n)],
                    "client", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    cwd=REPO)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        return Counter(json.loads(out)["lines"])

    # without the Route no connection reaches db-next
    wait_for("the split in force", lambda: banners(4)["next"] == 1, timeout=20)
    got = banners(40)
    print(f"\ntcp split v1:v2:db-next = 2:1:1 over 40 connections: {dict(got)}")
    assert got == {"v1": 20, "v2": 10, "next": 10}
    # a connection's metrics name the service it went to
    wait_for("db-next's connections counted", lambda: value(
        scrape(h), "meshnode_connections_opened_total", src="client", dst="db-next") >= 11)
