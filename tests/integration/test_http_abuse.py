"""Bad HTTP/1.1 input through a real agent (eBPF capture, one worker): raw bytes from an
enrolled client (tests/l7/raw_client.py) and an endpoint that records exactly what reached it,
or answers like a broken server (tests/l7/raw_backend.py). What a client sees, and what an
endpoint sees:

- request smuggling (both lengths, duplicate or malformed lengths, odd transfer codings, bad
  chunk sizes, obs-fold, bare LF, two Hosts): 400 and a closed connection, nothing at the
  endpoint; bytes after a request that closes its connection are never a request; two
  clients sharing the one pooled connection to an endpoint each reach it intact, and a client
  cut off mid-body never leaves its half request on a connection another client then uses;
- header blocks, request lines and bodies past the limits: 431 / 413 and a close;
- slowloris: 408 once the head has taken HEAD_TIMEOUT (10 s), while other clients are served
  at their usual latency;
- endpoints answering garbage, a truncated body, both lengths, a 200 KiB header block, or two
  responses to one request: a 502 (a reset once the response had started), the client's next
  request answered, the worker still the same process;
- 200 connections holding partial heads and a client that never reads a 300 MB response: the
  worker's memory grows by less than 50 MB.

Every host has one worker: its pid comes from `status`."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Host, wait_for
from tests.integration.test_http import NO_5XX_EJECTION, REPO, ports, run, started, vip

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

HostFactory = Callable[..., Host]
HEAD_TIMEOUT = 10.0  # meshnode/proxy/http/h1.py


class RawClient:
    """tests/l7/raw_client.py, enrolled as `client`, talking to HOST:80."""

    def __init__(self, h: Host, host: str, port: int = 80) -> None:
        self.proc = h.popen([sys.executable, "-m", "tests.l7.raw_client", host, str(port)],
                            "client", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def do(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "raw_client died"
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def ask(self, data: bytes, timeout: float = 5.0) -> dict[str, Any]:
        return self.do("ask", data=data.decode("latin-1"), timeout=timeout)

    def send(self, conn: str, data: bytes) -> None:
        self.do("send", id=conn, data=data.decode("latin-1"))

    def read(self, conn: str, timeout: float = 5.0) -> dict[str, Any]:
        return self.do("read", id=conn, timeout=timeout)


def error(reply: dict[str, Any]) -> str:
    """The proxy's x-meshnode-error ("": none)."""
    return next((v for n, v in reply["headers"] if n.lower() == "x-meshnode-error"), "")


def raw_service(h: Host, name: str, patch: dict[str, Any] | None = None) -> int:
    """Service `name` (http, VIP:80) with one tests/l7/raw_backend.py endpoint: its port."""
    (port,) = ports(1)
    run(h, "raw_backend", f"{name}-0", str(port), service=name)
    h.call("service.add", name=name, patch={"port": 80, "protocol": "http", **(patch or {})})
    h.wait_endpoints(name, {f"127.0.0.1:{port}"})
    return port


def seen(h: Host, port: int) -> dict[str, Any]:
    """What the endpoint received (asked directly, not through the mesh)."""
    status, body = h.http_get("/_seen", port=port)
    assert status == 200, body
    out: dict[str, Any] = json.loads(body)
    return out


def worker_pid(h: Host) -> int:
    (worker,) = h.status()["workers"]
    assert worker["alive"], worker
    return int(worker["pid"])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


GET = b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n"
POST = b"POST /a HTTP/1.1\r\nHost: web\r\n"
SMUGGLING = [
    ("Content-Length and Transfer-Encoding", POST + b"Content-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"),
    ("Transfer-Encoding and Content-Length", POST + b"Transfer-Encoding: chunked\r\n"
     b"Content-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"),
    ("two equal Content-Lengths", POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    ("two Content-Lengths", POST + b"Content-Length: 3\r\nContent-Length: 33\r\n\r\n"
     b"abcGET /smuggled HTTP/1.1\r\n\r\n"),
    ("a Content-Length list", POST + b"Content-Length: 3, 3\r\n\r\nabc"),
    ("a signed Content-Length", POST + b"Content-Length: +3\r\n\r\nabc"),
    ("a negative Content-Length", POST + b"Content-Length: -1\r\n\r\nabc"),
    ("a space inside Content-Length", POST + b"Content-Length: 1 0\r\n\r\nabc"),
    ("Transfer-Encoding: gzip, then a request", POST + b"Transfer-Encoding: gzip\r\n\r\n"
     b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"),
    ("Transfer-Encoding: chunked, gzip", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding twice", POST + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding: xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n"),
    ("Transfer-Encoding with a space before the colon", POST + b"Transfer-Encoding : chunked"
     b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("a chunk size not in hex", POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
     b"0\r\n\r\n"),
    ("a chunk size past 2^64", POST + b"Transfer-Encoding: chunked\r\n\r\n"
     b"10000000000000003\r\nabc\r\n0\r\n\r\n"),
    ("a chunk extension ended by a bare LF", POST + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3;x=y\nabc\r\n0\r\n\r\n"),
    ("a quoted chunk extension with CRLF inside", POST + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3;x=\"a\r\nb\"\r\nabc\r\n0\r\n\r\n"),
    ("a chunk without its CRLF", POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX"
     b"0\r\n\r\n"),
    ("obs-fold", b"GET /a HTTP/1.1\r\nHost: web\r\nX-A: b\r\n c\r\n\r\n"),
    ("obs-fold in Transfer-Encoding", POST + b"Transfer-Encoding: gzip,\r\n chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n"),
    ("bare LF line endings", b"GET /a HTTP/1.1\nHost: web\n\n"),
    ("a bare LF in the head", b"GET /a HTTP/1.1\r\nHost: web\nX: y\r\n\r\n"),
    ("two Hosts", b"GET /a HTTP/1.1\r\nHost: web\r\nHost: evil\r\n\r\n"),
    ("no Host", b"GET /a HTTP/1.1\r\n\r\n"),
]


def test_smuggling_attempts_get_400_and_never_reach_the_endpoint(
        make_host: HostFactory) -> None:
    h = started(make_host)
    port = raw_service(h, "web")
    client = RawClient(h, vip(h, "web"))
    # a keep-alive connection to the endpoint waits in the pool: a request the proxy took
    # would be written to it at once
    assert client.ask(GET)["status"] == 200
    for what, data in SMUGGLING:
        reply = client.ask(data)
        assert (reply["status"], error(reply)) == (400, "bad_request"), (what, reply)
        assert reply["closed"] and not reply["reset"], (what, reply)
    got = seen(h, port)
    assert [r["path"] for r in got["requests"]] == ["/ok"], got["requests"]
    assert not any("smuggled" in c["raw"] for c in got["connections"])

    # bytes after a request that closes the connection are not a request
    reply = client.ask(b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
                       b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n")
    assert reply["status"] == 200 and reply["closed"] and not reply["reset"], reply
    # a request inside a body is the body, framed as such
    inner = b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"
    reply = client.ask(POST + b"Content-Length: %d\r\n\r\n%b" % (len(inner), inner) + GET)
    assert reply["status"] == 200 and json.loads(reply["body"])["len"] == len(inner), reply
    got = seen(h, port)
    assert [(r["path"], r["body"]) for r in got["requests"]] == [
        ("/ok", ""), ("/last", ""), ("/a", inner.decode()), ("/ok", "")], got["requests"]
    print(f"\n{len(SMUGGLING)} smuggling attempts: 400 bad_request and a close each; the "
          f"endpoint got {[r['path'] for r in got['requests']]}")


def test_clients_sharing_a_pooled_connection_reach_the_endpoint_intact(
        make_host: HostFactory) -> None:
    h = started(make_host)
    # one connection to the endpoint: every request takes turns on it
    port = raw_service(h, "web", {"http": {"limits": {"maxConnections": 1}}})
    client = RawClient(h, vip(h, "web"))
    chunked = POST.replace(b"/a", b"/A") + b"Transfer-Encoding: chunked\r\n\r\n"
    b_request = b"POST /B HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nBBBBB"

    # A streams a body; B waits for the connection meanwhile, and takes it after A
    for conn in ("a", "b"):
        client.do("open", id=conn)
    client.send("a", chunked + b"5\r\nAAAAA\r\n")
    wait_for("A's body at the endpoint", lambda: "AAAAA" in "".join(
        c["raw"] for c in seen(h, port)["connections"]), timeout=5)
    client.send("b", b_request)
    client.send("a", b"3\r\nAAA\r\n0\r\n\r\n")
    for conn, path, n in (("a", "/A", 8), ("b", "/B", 5)):
        reply = client.read(conn)
        assert reply["status"] == 200 and json.loads(reply["body"]) == {
            "name": "web-0", "path": path, "len": n}, reply
    got = seen(h, port)
    assert [(r["path"], r["body"]) for r in got["requests"]] == [
        ("/A", "AAAAAAAA"), ("/B", "BBBBB")], got["requests"]
    pooled = got["requests"][0]["conn"]
    assert got["requests"][1]["conn"] == pooled  # B's request went on A's connection, after it

    # A is cut off mid-body (a bad chunk): its half request must not stay on the connection
    # B then uses (B's request would be read as the rest of A's body)
    client.send("a", chunked + b"5\r\nAAAAA\r\n")
    wait_for("A's second body at the endpoint", lambda: seen(h, port)["connections"][pooled][
        "raw"].count("AAAAA") == 2, timeout=5)
    client.send("b", b_request)
    client.send("a", b"zz\r\nnot a chunk\r\n")
    cut = client.read("a")
    assert cut["reset"] or cut["closed"], cut
    reply = client.read("b")
    assert reply["status"] == 200 and json.loads(reply["body"])["len"] == 5, reply
    got = seen(h, port)
    assert [(r["path"], r["body"]) for r in got["requests"]] == [
        ("/A", "AAAAAAAA"), ("/B", "BBBBB"), ("/B", "BBBBB")], got["requests"]
    assert got["requests"][2]["conn"] != pooled  # a new connection: A's half request's closed
    for r in got["requests"]:
        assert [v for n, v in r["headers"] if n.lower() == "host"] == ["web"], r
    assert "BBBBB" not in got["connections"][pooled]["raw"].split("AAAAA")[-1]
    print("\nat the endpoint, through one pooled connection: "
          f"{[(r['conn'], r['path'], r['body']) for r in got['requests']]}")


def test_oversized_heads_and_bodies_are_refused(make_host: HostFactory) -> None:
    h = started(make_host)
    port = raw_service(h, "web", {"http": {"limits": {"maxBodyBytes": 1000}}})
    client = RawClient(h, vip(h, "web"))
    many = b"".join(b"X-H%d: %b\r\n" % (i, b"v" * 1000) for i in range(70))
    cases = [
        ("70 KB of headers", b"GET /h HTTP/1.1\r\nHost: web\r\n" + many + b"\r\n", 431),
        ("one endless header", b"GET /h HTTP/1.1\r\nHost: web\r\nX-Big: " + b"v" * (1 << 20),
         431),
        ("a 70 KB request line", b"GET /" + b"u" * 70_000 + b" HTTP/1.1\r\nHost: web\r\n\r\n",
         431),
        ("a 5000-byte body", POST + b"Content-Length: 5000\r\n\r\n" + b"x" * 5000, 413),
        ("a 5000-byte chunked body", POST + b"Transfer-Encoding: chunked\r\n\r\n" +
         b"3e8\r\n" + b"x" * 1000 + b"\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n", 413),
    ]
    for what, data, status in cases:
        reply = client.ask(data)
        reason = {431: "header_too_large", 413: "body_too_large"}[status]
        assert (reply["status"], error(reply)) == (status, reason), (what, reply)
        assert reply["closed"] or reply["reset"], (what, reply)
    assert client.ask(GET)["status"] == 200
    assert [r["path"] for r in seen(h, port)["requests"]] == ["/ok"]
    print(f"\n{[(c[0], c[2]) for c in cases]}")


def test_slowloris_gets_408_and_other_clients_are_served(make_host: HostFactory) -> None:
    h = started(make_host)
    raw_service(h, "web")
    address = vip(h, "web")
    slow, other = RawClient(h, address), RawClient(h, address)
    baseline = [other.ask(GET)["seconds"] for _ in range(10)]
    slow.do("open", id="s")
    t0 = time.monotonic()
    slow.do("drip", id="s", data=(GET[:-2] + b"X-Slow: " + b"s" * 40 + b"\r\n\r\n").decode(),
            interval=1.0)
    during = []
    while time.monotonic() - t0 < HEAD_TIMEOUT + 1.0:
        reply = other.ask(GET)
        assert reply["status"] == 200, reply
        during.append(reply["seconds"])
        time.sleep(0.25)  # pacing the other client, not a sync
    result = slow.do("dripped", id="s")
    print(f"\nslowloris (a header byte a second): {result['status']} "
          f"{error(result)} after {result['seconds']:.1f}s, {result['sent']} bytes; "
          f"other client meanwhile: {len(during)} requests, median "
          f"{statistics.median(during) * 1000:.1f} ms, max {max(during) * 1000:.1f} ms "
          f"(before: median {statistics.median(baseline) * 1000:.1f} ms)")
    assert (result["status"], error(result)) == (408, "header_timeout"), result
    assert result["closed"], result
    assert HEAD_TIMEOUT <= result["seconds"] < HEAD_TIMEOUT + 1.5, result
    assert max(during) < 0.25, during


def test_broken_endpoints_get_502_and_the_worker_lives(make_host: HostFactory) -> None:
    h = started(make_host)
    raw_service(h, "web", {**NO_5XX_EJECTION, "http": {"retry": {"attempts": 0}}})
    pid = worker_pid(h)
    client = RawClient(h, vip(h, "web"))
    client.do("open", id="c")
    for path in ("/garbage", "/both-lengths", "/big-head"):
        client.send("c", b"GET %b HTTP/1.1\r\nHost: web\r\n\r\n" % path.encode())
        reply = client.read("c")
        assert (reply["status"], error(reply)) == (502, "upstream_error"), (path, reply)
        assert not reply["closed"], (path, reply)
        client.send("c", GET)  # the same connection goes on
        assert client.read("c")["status"] == 200

    # two responses to one request: the client gets the first, its next request its own
    client.send("c", b"GET /twice HTTP/1.1\r\nHost: web\r\n\r\n")
    reply = client.read("c")
    assert (reply["status"], reply["body"]) == (200, "first"), reply
    client.send("c", GET)
    reply = client.read("c")
    assert reply["status"] == 200 and json.loads(reply["body"])["path"] == "/ok", reply

    # a body cut short after its head went out: the client sees a broken stream (a reset)
    client.send("c", b"GET /truncated HTTP/1.1\r\nHost: web\r\n\r\n")
    cut = client.read("c")
    assert cut["status"] == 200 and not cut["complete"], cut
    assert cut["reset"] and cut["body"] == "0123456789", cut
    # to an HTTP/1.0 client the body is delimited by the close: only a reset says it is cut
    cut10 = client.ask(b"GET /truncated-chunked HTTP/1.0\r\nHost: web\r\n\r\n")
    assert cut10["status"] == 200 and cut10["reset"], cut10
    assert client.ask(GET)["status"] == 200  # a new connection is served
    assert worker_pid(h) == pid
    print(f"\n502 for garbage, both lengths, a 200 KiB header block; truncated bodies reset "
          f"(HTTP/1.1 after {cut['body']!r}, HTTP/1.0 after {cut10['body']!r}); worker {pid} "
          "alive throughout")


def test_memory_stays_bounded_under_held_heads_and_a_client_that_never_reads(
        make_host: HostFactory) -> None:
    h = started(make_host)
    port = raw_service(h, "web")
    pid = worker_pid(h)
    client = RawClient(h, vip(h, "web"))
    assert client.ask(GET)["status"] == 200
    before = rss_mb(pid)
    # 200 heads of 60 KB each, never finished (under the 64 KiB limit: all held)
    held = client.do("hold", n=200, data=(GET[:-2] + b"X-Pad: " + b"p" * 60_000).decode())
    assert held["open"] == 200, held
    client.do("open", id="big")
    client.send("big", b"GET /big/300000000 HTTP/1.1\r\nHost: web\r\n\r\n")

    # the endpoint's writes stop: the proxy stopped reading it (backpressure)
    wait_for("the endpoint's writes to stall", lambda: _endpoint_stalled(h, port), timeout=20)
    after = rss_mb(pid)
    reply = client.ask(GET)
    print(f"\nworker RSS {before:.1f} MB -> {after:.1f} MB with 200 held 60 KB heads and a "
          f"300 MB response nobody reads; a request meanwhile: {reply['status']} in "
          f"{reply['seconds'] * 1000:.1f} ms")
    assert reply["status"] == 200
    assert after - before < 50, (before, after)


def _endpoint_stalled(h: Host, port: int) -> bool:
    status, body = h.http_get("/_stalled", port=port)
    return status == 200 and json.loads(body)["stalled"] > 0
