"""HTTP/2 and gRPC through a real agent, with real clients (curl, nghttp, h2load, grpcio, raw
h2 sockets) and real servers (tests/l7/h2_backend.py, tests/l7/grpc_backend.py): what a user of
an `http2` or `grpc` port sees. The streams of one client connection spread over the endpoints;
h2load's requests are all answered and counted exactly; unary and streaming gRPC calls (both
ways) pass, their statuses pass through, and an UNAVAILABLE from one endpoint is retried on the
other; timeouts and the proxy's own errors say why in each protocol's terms; a rapid reset, an
HPACK bomb and invalid pseudo-headers get the RFC's error while other clients are served.

Counters are read from /metrics (filled from the workers about once a second): the tests wait
for the value they expect, with a deadline. Every host has one worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import Host, wait_for
from tests.integration.conftest import BACKENDS
from tests.integration.test_http import (
    NO_5XX_EJECTION,
    REPO,
    ports,
    requests_by_class,
    run,
    scrape,
    settled,
    started,
    value,
    vip,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

HostFactory = Callable[..., Host]


def h2_service(h: Host, name: str, n: int, patch: dict[str, Any] | None = None,
               protocol: str = "http2", garbage: bool = False) -> dict[str, int]:
    """Service `name` on VIP:80 with `n` h2 backends NAME-i: {backend name: its port}."""
    out = {}
    for i, p in enumerate(ports(n)):
        run(h, "h2_backend", f"{name}-{i}", str(p), *(["--garbage"] if garbage else []),
            service=name)
        out[f"{name}-{i}"] = p
    h.call("service.add", name=name, patch={"port": 80, "protocol": protocol, **(patch or {})})
    h.wait_endpoints(name, {f"127.0.0.1:{p}" for p in out.values()})
    return out


def grpc_service(h: Host, name: str, unavailable: tuple[int, ...] = (),
                 patch: dict[str, Any] | None = None) -> dict[str, int]:
    """Service `name` on VIP:80 (protocol grpc) with two gRPC backends NAME-0 and NAME-1;
    those in `unavailable` answer Flaky with UNAVAILABLE."""
    out = {}
    for i, p in enumerate(ports(2)):
        run(h, "grpc_backend", "serve", f"{name}-{i}", str(p),
            *(["--unavailable"] if i in unavailable else []), service=name)
        out[f"{name}-{i}"] = p
    h.call("service.add", name=name, patch={"port": 80, "protocol": "grpc", **(patch or {})})
    h.wait_endpoints(name, {f"127.0.0.1:{p}" for p in out.values()})
    return out


def curl_h2(h: Host, url: str, *args: str) -> tuple[int, str]:
    """`curl --http2-prior-knowledge URL`: (status, stdout). One request per curl: curl
    7.88's second transfer on a prior-knowledge connection fails on its own side
    (curl/curl#10634, fixed in 8.0), so many streams on one connection are nghttp's job."""
    p = h.popen(["curl", "-sS", "--http2-prior-knowledge", "-w", "~~%{http_code}\n", *args,
                 url], "client", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    m = re.search(r"~~(\d+)\n$", out)
    assert m is not None, (out, err)
    return int(m[1]), out


def nghttp(h: Host, urls: list[str]) -> tuple[list[int], list[Any], str]:
    """nghttp2's client fetching `urls` as concurrent streams of one HTTP/2 connection
    (prior knowledge): (statuses, JSON bodies, its -v output)."""
    p = h.popen(["nghttp", "-v", *urls], "client", stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out[-3000:], err)
    assert out.count("] Connected") == 1, out[-3000:]
    statuses = [int(x) for x in re.findall(r"recv \(stream_id=\d+\) :status: (\d+)", out)]
    bodies = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return statuses, bodies, out


def grpc_call(h: Host, target: str, scenario: str, n: int = 10,
              service: str | None = "client") -> list[dict[str, Any]]:
    """tests/l7/grpc_backend.py's client: one result per call."""
    p = h.popen([sys.executable, "-m", "tests.l7.grpc_backend", "call", target, scenario,
                 str(n)], service, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                cwd=REPO)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines()]


def probe(h: Host, attack: str, target: str, *args: str) -> dict[str, Any]:
    """tests/l7/h2_probe.py: what the proxy answered a misbehaving client."""
    p = h.popen([sys.executable, "-m", "tests.l7.h2_probe", attack, target, "80", *args],
                "client", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


# -- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_of_one_connection_spread_over_endpoints(make_host: HostFactory,
                                                         backend: str) -> None:
    h = started(make_host, backend)
    h2_service(h, "web", 2)
    address = vip(h, "web")
    n = 20
    statuses, bodies, _ = nghttp(h, [f"http://{address}/s{i}" for i in range(n)])
    assert statuses == [200] * n
    names = Counter(b["name"] for b in bodies)
    assert set(names) == {"web-0", "web-1"}, names
    assert sorted(b["path"] for b in bodies) == sorted(f"/s{i}" for i in range(n))
    # the proxy's traceparent went up: a trace started per request
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", b["traceparent"])
               for b in bodies), bodies
    samples = settled(h, "meshnode_requests_total", n, src="client", dst="web",
                      route="default", method="GET", status_class="2xx")
    assert requests_by_class(samples, "web") == {"2xx": n}
    assert value(samples, "meshnode_request_failures_total", dst="web") == 0
    picks = {lab["endpoint"]: v for name, lab, v in samples
             if name == "meshnode_endpoint_selections_total" and lab["dst"] == "web"}
    print(f"\n{backend}: {n} streams on one HTTP/2 connection, by endpoint: {dict(names)}; "
          f"balancer selections: {picks}")
    assert sum(picks.values()) == n and len(picks) == 2


def test_h2load_requests_all_answered_and_counted(make_host: HostFactory) -> None:
    h = started(make_host)
    h2_service(h, "web", 2)
    address = vip(h, "web")
    argv = ["h2load", "-n", "2000", "-c", "4", "-m", "10", f"http://{address}/"]
    p = h.popen(argv, "client", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=90)
    print(f"\n$ {' '.join(argv)}\n{out}{err}")
    assert p.returncode == 0, err
    assert "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, " \
           "0 errored, 0 timeout" in out, out
    assert "status codes: 2000 2xx" in out, out
    samples = settled(h, "meshnode_requests_total", 2000, src="client", dst="web",
                      method="GET", status_class="2xx")
    assert requests_by_class(samples, "web") == {"2xx": 2000}
    assert value(samples, "meshnode_request_failures_total", dst="web") == 0
    assert value(samples, "meshnode_request_retries_total", dst="web") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpc_unary_and_streaming_calls_statuses_and_retries(make_host: HostFactory,
                                                             backend: str) -> None:
    h = started(make_host, backend)
    # round-robin: every other call's first attempt meets grpc-1, whose Flaky is UNAVAILABLE
    backends = grpc_service(h, "grpc", unavailable=(1,),
                            patch={**NO_5XX_EJECTION, "balancer": {"algorithm": "round-robin"},
                                   "http": {"retry": {"backoff": 0}}})
    target = f"{vip(h, 'grpc')}:80"

    unary = grpc_call(h, target, "unary", 10)
    assert [r["code"] for r in unary] == ["OK"] * 10
    assert [r["replies"][0].split(":")[1] for r in unary] == [f"u{i}" for i in range(10)]
    assert {r["replies"][0].split(":")[0] for r in unary} == {"grpc-0", "grpc-1"}

    server, client, bidi = grpc_call(h, target, "streams")
    assert server["code"] == "OK" and [r.split(":")[1] for r in server["replies"]] == \
        ["0", "1", "2", "3", "4"], server
    assert client["code"] == "OK" and client["replies"][0].endswith(":a,b,c"), client
    assert bidi["code"] == "OK" and [r.split(":")[1] for r in bidi["replies"]] == \
        ["m0", "m1", "m2", "m3"], bidi

    not_found, invalid = grpc_call(h, target, "statuses")
    assert (not_found["code"], invalid["code"]) == ("NOT_FOUND", "INVALID_ARGUMENT")
    assert not_found["details"].endswith("fails with NOT_FOUND"), not_found

    flaky = grpc_call(h, target, "flaky", 10)
    assert [(r["code"], r["replies"][0].split(":")[0]) for r in flaky] == [("OK", "grpc-0")] * 10

    counts = {name: json.loads(grpc_call(h, f"127.0.0.1:{port}", "count", service=None)[0]
                               ["replies"][0]) for name, port in backends.items()}
    unavailable = counts["grpc-1"].get("Flaky", 0)
    ok = 10 + 3 + 10
    samples = settled(h, "meshnode_requests_total", ok, dst="grpc", status_class="OK")
    classes = requests_by_class(samples, "grpc")
    retries = value(samples, "meshnode_request_retries_total", dst="grpc")
    print(f"\n{backend}: gRPC calls by status {classes}; Flaky served by backend "
          f"{ {n: c.get('Flaky', 0) for n, c in counts.items()} }, retries {retries:.0f}")
    # every UNAVAILABLE was retried on the other endpoint: the client saw none
    assert unavailable >= 1
    assert retries == unavailable
    assert classes == {"OK": ok, "NOT_FOUND": 1, "INVALID_ARGUMENT": 1}, classes
    assert value(samples, "meshnode_requests_total", src="client", dst="grpc",
                 route="default", method="POST", status_class="OK") == ok
    assert value(samples, "meshnode_retry_budget_exhausted_total", dst="grpc") == 0


def test_timeouts_and_the_proxys_own_errors(make_host: HostFactory) -> None:
    h = started(make_host)
    h2_service(h, "web", 2, {
        **NO_5XX_EJECTION,
        "http": {"retry": {"backoff": 0},
                 "routes": [{"name": "slow", "match": {"pathPrefix": "/slow"},
                             "timeouts": {"request": 0.3}}]}})
    h2_service(h, "junk", 1, garbage=True)
    grpc_service(h, "grpc", patch={"http": {"timeouts": {"request": 0.5}}})
    h.call("service.add", name="empty", patch={"port": 80, "protocol": "grpc"})
    web, junk = vip(h, "web"), vip(h, "junk")

    # HTTP/2: a status and x-meshnode-error saying why
    cases = [(f"http://{web}/slow/2000", 504, "timeout"),
             (f"http://{web}/reset", 502, "reset"),
             (f"http://{junk}/", 502, "upstream_error")]
    for url, status, reason in cases:
        got, out = curl_h2(h, url, "-i")
        assert got == status, out
        assert f"x-meshnode-error: {reason}" in out, out
    # the reset stream was retried on each endpoint (GET, attempts 2) before the 502
    samples = settled(h, "meshnode_request_retries_total", 2, dst="web", route="default")
    assert value(samples, "meshnode_requests_total", dst="web", route="slow",
                 status_class="5xx") == 1
    assert value(samples, "meshnode_request_failures_total", dst="web", route="slow",
                 reason="timeout") == 1

    # gRPC: a trailers-only answer whose status and message say why
    (slow,) = grpc_call(h, f"{vip(h, 'grpc')}:80", "slow", 2000)
    assert slow["code"] == "DEADLINE_EXCEEDED", slow
    assert "timeouts.request" in slow["details"], slow
    (none,) = grpc_call(h, f"{vip(h, 'empty')}:80", "unary", 1)
    assert none["code"] == "UNAVAILABLE", none
    assert "empty has no endpoints" in none["details"], none
    samples = settled(h, "meshnode_requests_total", 1, dst="grpc",
                      status_class="DEADLINE_EXCEEDED")
    assert requests_by_class(samples, "grpc") == {"DEADLINE_EXCEEDED": 1}
    assert requests_by_class(samples, "empty") == {"UNAVAILABLE": 1}
    print(f"\nproxy answers: {[c[1:] for c in cases]}; gRPC: {slow['code']} "
          f"({slow['details']}), {none['code']} ({none['details']})")


def test_bad_http2_input_gets_the_rfc_error_and_others_are_served(
        make_host: HostFactory) -> None:
    h = started(make_host)
    h2_service(h, "web", 2)
    address = vip(h, "web")

    def still_served() -> None:
        status, out = curl_h2(h, f"http://{address}/ok")
        assert status == 200 and json.loads(out.splitlines()[0])["path"] == "/ok", out

    # CVE-2023-44487: HEADERS + RST_STREAM as fast as it can
    rapid = probe(h, "rapid-reset", address, "1000")
    assert rapid["goaway"] == "ENHANCE_YOUR_CALM" and rapid["closed"], rapid
    assert "reset within a second" in rapid["debug"], rapid
    still_served()

    # a header block that inflates to 4 MB: refused at MAX_HEADER_LIST_SIZE (64 KiB)
    bomb = probe(h, "hpack-bomb", address)
    assert bomb["goaway"] == "ENHANCE_YOUR_CALM" and bomb["closed"], bomb
    assert bomb["responses"] == 0, bomb
    still_served()

    # a frame longer than SETTINGS_MAX_FRAME_SIZE: refused at its header (RFC 9113 4.2)
    big = probe(h, "big-frame", address)
    assert big["goaway"] == "FRAME_SIZE_ERROR" and big["closed"], big
    still_served()

    # malformed requests (RFC 9113 8.1.1, 8.2.2, 8.3): PROTOCOL_ERROR, never forwarded
    kinds = ["unknown", "missing-path", "after-regular", "uppercase", "connection"]
    for kind in kinds:
        bad = probe(h, "bad-pseudo", address, kind)
        assert bad["goaway"] == "PROTOCOL_ERROR" or "PROTOCOL_ERROR" in bad["resets"], \
            (kind, bad)
        assert bad["responses"] == 0, (kind, bad)
    still_served()

    samples = settled(h, "meshnode_request_failures_total", len(kinds) + 1, dst="web",
                      reason="protocol_error")
    assert value(samples, "meshnode_request_failures_total", dst="web", reason="abuse") == 2
    # only the good requests reached the endpoints
    assert requests_by_class(samples, "web").get("2xx") == 4
    rejected = wait_for("the rapid reset's cancelled requests counted", lambda: value(
        scrape(h), "meshnode_request_failures_total", dst="web", reason="client_gone"))
    print(f"\nrapid reset: {rapid}\nHPACK bomb: {bomb}\nbig frame: {big}\ninvalid "
          f"pseudo-headers: GOAWAY PROTOCOL_ERROR x{len(kinds)}; streams the rapid reset "
          f"cancelled: {rejected:.0f}")
