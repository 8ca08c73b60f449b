"""HTTP/1.1 proxying (meshnode/proxy/http/h1.py) fed hostile bytes, without sockets.

The client and the endpoints are in-memory transports joined to a real `HttpFront` (its pool,
balancer, limits and counters; only the dial is the test's), the way tests/unit/test_h2.py
drives HTTP/2. Named cases pin each bug found (request smuggling by trailers and by a retry,
header blocks buffered past their limit, a second response from an endpoint written to the
client); hypothesis then drives arbitrary byte streams, split at arbitrary points, into both
sides and checks what must hold whatever comes: nothing raises out of the protocol callbacks,
the client gets well-formed HTTP/1.1 responses (httptools' response parser reads them), a
client error closes the connection, and whatever reaches an endpoint is a well-formed request
whose body framing matches its headers, carrying only bytes of the one request it stands for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.model import Endpoint, HostPort, OrigDstAddr, Reset, ServiceSpec
from meshnode.policy.resources import (
    BalancerConfig,
    HttpLimits,
    HttpPolicy,
    HttpTimeouts,
    OutlierConfig,
    RetryPolicy,
    ServicePolicy,
)
from meshnode.proxy.http.front import HttpFront
from meshnode.proxy.http.h1 import H1Downstream
from meshnode.proxy.http.h1_upstream import H1Upstream
from meshnode.proxy.stats import WorkerStats
from meshnode.proxy.telemetry import ConnInfo
from meshnode.route import ServiceTable

pytestmark = pytest.mark.timeout(120)

VIP = IPv4Address("127.240.0.9")
EPS = ("10.0.0.1:8080", "10.0.0.2:8080")
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# -- the rig ----------------------------------------------------------------------------------

class Wire(asyncio.Transport):
    """The proxy's end of an in-memory connection: what the proxy writes is kept (and handed
    to `sink` on the next loop pass); close and abort end it (connection_lost next pass)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proto: asyncio.BaseProtocol,
                 sink: Callable[[bytes], None] | None = None) -> None:
        super().__init__()
        self.loop = loop
        self.proto = proto
        self.sink = sink
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.lost = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return
        self.written += data
        if self.sink is not None:
            self.loop.call_soon(self.sink, bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def lose(self) -> None:
        """The connection is gone (closed by either side)."""
        self.closing = True
        if not self.lost:
            self.lost = True
            self.proto.connection_lost(None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0


Reply = Callable[["Server", int], list[bytes | None]]  # None in the list: close after


def answer_ok(server: Server, n: int) -> list[bytes | None]:
    return [OK]


class Server:
    """An endpoint: every byte the proxy sent it, and the requests its own parser read from
    them (also appended to `log`, shared by the endpoints, in the order they completed)."""

    def __init__(self, addr: str, reply: Reply, log: list[Message]) -> None:
        self.addr = addr
        self.reply = reply
        self.log = log
        self.raw = bytearray()
        self.wire: Wire | None = None
        self.up: H1Upstream | None = None
        self.requests = 0
        self.broken = ""  # why its parser gave up on what the proxy sent ("": it did not)
        self.reader = _Reader()
        self.reader.on_message_complete = self.on_message_complete  # type: ignore[method-assign]
        self.parser = httptools.HttpRequestParser(self.reader)

    def received(self, data: bytes) -> None:
        self.raw += data
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.broken = "upgraded"  # what follows is not HTTP/1.1
        except httptools.HttpParserError as exc:
            self.broken = repr(exc)

    def on_message_complete(self) -> None:
        msg = self.reader.messages[-1]
        msg.complete = True
        msg.method = self.parser.get_method().decode()
        self.log.append(msg)
        self.requests += 1
        loop = asyncio.get_running_loop()
        for part in self.reply(self, self.requests):
            if part is None:
                loop.call_soon(self.hang_up)
                break
            loop.call_soon(self.send, part)

    def send(self, data: bytes) -> None:
        if self.up is not None and self.wire is not None and not self.wire.lost:
            self.up.data_received(data)

    def hang_up(self) -> None:
        if self.wire is not None:
            self.wire.lose()


class Mesh:
    """An HttpFront with one `http` service, `web`, over EPS (round-robin); its endpoints are
    Servers answering with `reply`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, http: HttpPolicy | None = None,
                 reply: Reply = answer_ok) -> None:
        self.loop = loop
        table = ServiceTable()
        policy = ServicePolicy(port=80, protocol="http", http=http or HttpPolicy(),
                               balancer=BalancerConfig("round-robin"),
                               outlier=OutlierConfig(consecutive_5xx=0))
        table.apply(Reset(ServiceSpec("web", 7, VIP, policy),
                          tuple(Endpoint(HostPort.parse(e)) for e in EPS)))
        self.front = HttpFront(loop, table, WorkerStats(), None, None, 0, "n", 0, 1.0,
                               time.monotonic)
        self.reply = reply
        self.servers: list[Server] = []
        self.log: list[Message] = []  # the requests the endpoints read, in order

        async def dial_h1(ep: Endpoint, src: str, service: str,
                          key: tuple[Any, str]) -> H1Upstream:
            await asyncio.sleep(0)
            up = H1Upstream(self.front, key)
            server = Server(str(ep.addr), self.reply, self.log)
            server.wire = Wire(loop, up, server.received)
            server.up = up
            up.connection_made(server.wire)
            self.servers.append(server)
            return up

        self.front.dial_h1 = dial_h1  # type: ignore[method-assign]

    def client(self) -> Client:
        info = ConnInfo(time.monotonic(), ("127.0.0.1", 50000))
        info.src, info.service = "client", "web"
        down = H1Downstream(self.front, info, "web", OrigDstAddr(VIP, 80))
        wire = Wire(self.loop, down)
        down.connection_made(wire)
        return Client(down, wire)

    def upstream_bytes(self) -> bytes:
        return b"".join(bytes(s.raw) for s in self.servers)


@dataclass
class Client:
    down: H1Downstream
    wire: Wire

    async def send(self, *chunks: bytes, settle: int = 20) -> None:
        """Each chunk as a read would deliver it: not while the proxy paused reading (a
        socket's bytes wait in the kernel), nothing once the connection closed."""
        for chunk in chunks:
            for _ in range(200):
                if self.wire.closing or self.wire.reading:
                    break
                await asyncio.sleep(0)
            if self.wire.closing or not self.wire.reading:
                return
            self.down.data_received(chunk)
            await passes(2)
        await passes(settle)

    @property
    def got(self) -> bytes:
        return bytes(self.wire.written)


async def passes(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def until(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


# -- reading what came out --------------------------------------------------------------------

@dataclass
class Message:
    head: str  # the status or request line (the URL, for a request)
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    method: str = ""
    status: int = 0
    version: str = ""


class _Reader:
    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None  # set to read statuses
        self.messages: list[Message] = []
        self._line = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False

    def on_message_begin(self) -> None:
        self._line = b""
        self._headers = []
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._line += url

    def on_status(self, status: bytes) -> None:
        self._line += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # not a trailer
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        msg = Message(self._line.decode("latin-1"), self._headers)
        if self.parser is not None:
            msg.status = self.parser.get_status_code()
            msg.version = self.parser.get_http_version()
        self.messages.append(msg)

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def responses(data: bytes, version: str = "1.1") -> list[tuple[int, Message]]:
    """The responses in `data` ((status, message)), read by httptools' response parser; raises
    when they are not well-formed HTTP/`version` ("": any). A last response cut short (an
    aborted stream) is returned incomplete."""
    reader = _Reader()
    parser = httptools.HttpResponseParser(reader)
    reader.parser = parser
    try:
        parser.feed_data(data)
    except (httptools.HttpParserUpgrade, httptools.HttpParserError):
        # after a 101 the bytes are the new protocol's
        if not reader.messages or reader.messages[-1].status != 101:
            raise
    for msg in reader.messages:
        assert msg.version == version or not version, msg
        assert 100 <= msg.status <= 599, msg
    return [(m.status, m) for m in reader.messages]


def header(msg: Message, name: bytes) -> list[bytes]:
    return [v for n, v in msg.headers if n.lower() == name]


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_upstream(raw: bytes, codings: bool = False,
                   partial: bool = False) -> list[Message]:
    """The requests an endpoint received, read strictly and independently of llhttp: each
    head's syntax, one framing (a content-length of digits, or chunked alone), and a body that
    is exactly what the framing says; no byte left over. `partial`: the last request may be
    cut short (its connection closed mid-body)."""
    out: list[Message] = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"a request head without its end: {head[:200]!r}"
        line, *fields = head.split(b"\r\n")
        m = re.fullmatch(rb"([A-Z]+) (\S+) HTTP/1\.1", line)
        assert m, f"bad request line {line!r}"
        headers = []
        for f in fields:
            name, colon, value = f.partition(b":")
            assert colon and _TOKEN.fullmatch(name), f"bad header line {f!r}"
            assert b"\r" not in value and b"\n" not in value and b"\0" not in value, f
            headers.append((name, value.strip(b" \t")))
        msg = Message(line.decode("latin-1"), headers)
        lengths = header(msg, b"content-length")
        te = header(msg, b"transfer-encoding")
        assert not (lengths and te), f"both framings: {headers}"
        assert len(lengths) <= 1 and len(te) <= 1, headers
        if te:
            assert te[0] == b"chunked" or (codings and te[0].endswith(b", chunked")), te
            body = b""
            while True:
                size_line, sep, after = rest.partition(b"\r\n")
                if partial and (not sep or len(after) < int(size_line, 16) + 2):
                    assert re.fullmatch(rb"[0-9a-f]*", size_line), size_line[:100]
                    rest = b""
                    break
                rest = after
                assert sep and re.fullmatch(rb"[0-9a-f]+", size_line), size_line[:100]
                size = int(size_line, 16)
                if size == 0:
                    assert rest.startswith(b"\r\n"), rest[:100]  # no trailers forwarded
                    rest = rest[2:]
                    msg.complete = True
                    break
                assert len(rest) >= size + 2 and rest[size:size + 2] == b"\r\n"
                body += rest[:size]
                rest = rest[size + 2:]
            msg.body = body
        else:
            n = int(lengths[0]) if lengths else 0
            assert not lengths or re.fullmatch(rb"[0-9]+", lengths[0]), lengths
            msg.body = rest[:n]
            msg.complete = len(rest) >= n
            assert msg.complete or partial, (n, rest[:100])
            rest = rest[n:]
        out.append(msg)
    return out


def run(main: Callable[[], Any]) -> None:
    asyncio.run(main())


def proxy_error(msg: Message) -> str:
    """The proxy's x-meshnode-error reason ("": the endpoint's own response)."""
    found = header(msg, b"x-meshnode-error")
    return found[0].decode() if found else ""


# -- request smuggling ------------------------------------------------------------------------

REQ = b"POST /a HTTP/1.1\r\nHost: web\r\n"
SMUGGLING = {
    "cl-and-te": REQ + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                       b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
    "te-and-cl": REQ + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "two-equal-cl": REQ + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "two-cl": REQ + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    "cl-list": REQ + b"Content-Length: 3, 3\r\n\r\nabc",
    "cl-plus": REQ + b"Content-Length: +3\r\n\r\nabc",
    "cl-minus": REQ + b"Content-Length: -3\r\n\r\nabc",
    "cl-inner-space": REQ + b"Content-Length: 1 2\r\n\r\nabc",
    "cl-hex": REQ + b"Content-Length: 0x3\r\n\r\nabc",
    "cl-overflow": REQ + b"Content-Length: 99999999999999999999999\r\n\r\nabc",
    "te-gzip": REQ + b"Transfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-gzip": REQ + b"Transfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-chunked-twice": REQ + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"3\r\nabc\r\n0\r\n\r\n",
    "te-chunked-chunked": REQ + b"Transfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-xchunked": REQ + b"Transfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-identity": REQ + b"Transfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc",
    "te-empty-then-chunked": REQ + b"Transfer-Encoding: \r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"3\r\nabc\r\n0\r\n\r\n",
    "te-space-before-colon": REQ + b"Transfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "chunk-not-hex": REQ + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk-past-2^64": REQ + b"Transfer-Encoding: chunked\r\n\r\n10000000000000003\r\nabc\r\n"
                             b"0\r\n\r\n",
    "chunk-size-space": REQ + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
    "chunk-ext-bare-lf": REQ + b"Transfer-Encoding: chunked\r\n\r\n3;a=b\nabc\r\n0\r\n\r\n",
    "chunk-ext-quoted-crlf": REQ + b"Transfer-Encoding: chunked\r\n\r\n3;a=\"x\r\n\"\r\nabc\r\n"
                                   b"0\r\n\r\n",
    "chunk-no-crlf": REQ + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
    "trailer-content-length": REQ + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                                    b"Content-Length: 5\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: web\r\nX-A: b\r\n c\r\n\r\n",
    "obs-fold-te": REQ + b"Transfer-Encoding: gzip,\r\n chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: web\n\n",
    "bare-lf-one-line": b"GET / HTTP/1.1\r\nHost: web\nX: y\r\n\r\n",
    "bare-cr": b"GET / HTTP/1.1\r\nHost: web\rX: y\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: web\r\nX: a\0b\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: web\r\nHost: evil\r\n\r\n",
    "space-in-url": b"GET /a b HTTP/1.1\r\nHost: web\r\n\r\n",
    "http/1.2": b"GET / HTTP/1.1\r\nHost: web\r\n\r\n".replace(b"1.1", b"1.2"),
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_ambiguous_framing_gets_400_and_reaches_no_endpoint(name: str) -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        # a keep-alive connection to the endpoint is idle in the pool first: a request
        # started at once would be written to it in the same pass
        warm = mesh.client()
        await warm.send(b"GET /warm HTTP/1.1\r\nHost: web\r\n\r\n")
        mesh.servers[0].raw.clear()
        c = mesh.client()
        data = SMUGGLING[name]
        await c.send(data)
        (status, msg), = responses(c.got)
        assert (status, proxy_error(msg)) == (400, "bad_request"), (status, msg)
        assert header(msg, b"connection") == [b"close"] and c.wire.closing
        assert not c.wire.aborted
        # whether the bad part is in the head or in the body: nothing was forwarded
        assert mesh.upstream_bytes() == b"", mesh.upstream_bytes()
        # split in two reads anywhere: a 400, or (the bad part in a later read than a head
        # that went to an endpoint already) a reset; never a complete request upstream
        for cut in range(1, len(data)):
            c = mesh.client()
            await c.send(data[:cut], data[cut:])
            got = responses(c.got)
            if got:
                assert [(s, proxy_error(m)) for s, m in got] == [(400, "bad_request")], got
            else:
                assert c.wire.aborted, cut
            assert c.wire.closing
        assert [m.head for m in mesh.log] == ["/warm"], mesh.log
    run(main)


def test_trailers_never_become_headers() -> None:
    """Before: trailers were appended to the request's headers, so a head written after the
    body was read (a new connection's, or a retry's) carried `Host: evil`, `X-Admin: yes`."""
    async def main() -> None:
        def first_unavailable(server: Server, n: int) -> list[bytes | None]:
            if server.addr == EPS[0]:
                return [b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"]
            return [OK]

        mesh = Mesh(asyncio.get_running_loop(), HttpPolicy(retry=RetryPolicy(backoff=0)),
                    reply=first_unavailable)
        c = mesh.client()
        await c.send(b"PUT /t HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nHost: evil\r\nX-Admin: yes\r\n\r\n", settle=60)
        assert responses(c.got)[0][0] == 200
        assert len(mesh.log) == 2  # tried on EPS[0] (503), retried on EPS[1]
        for msg in mesh.log:
            assert header(msg, b"host") == [b"web"] and not header(msg, b"x-admin"), msg
            assert msg.body == b"abc"
    run(main)


def test_data_after_a_closing_request_is_never_a_request() -> None:
    """Before: llhttp's "Data after Connection: close" aborted the first request's response
    (a reset) although that request had been forwarded."""
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        c = mesh.client()
        await c.send(b"GET /1 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
                     b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n")
        (status, msg), = responses(c.got)
        assert status == 200 and msg.body == b"ok" and header(msg, b"connection") == [b"close"]
        assert c.wire.closing and not c.wire.aborted
        assert [m.head for m in mesh.log] == ["/1"]
    run(main)


def test_a_request_refused_after_its_head_never_reaches_an_endpoint() -> None:
    """Before: llhttp refuses a Transfer-Encoding that does not end in chunked only after the
    head's callback, which had already written the head to a pooled connection."""
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        c = mesh.client()
        await c.send(b"GET /warm HTTP/1.1\r\nHost: web\r\n\r\n")
        assert responses(c.got)[0][0] == 200
        before = mesh.upstream_bytes()
        c = mesh.client()
        await c.send(b"POST /x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\n\r\nabc")
        assert responses(c.got)[0][0] == 400
        assert mesh.upstream_bytes() == before
    run(main)


def test_a_pipelined_request_is_forwarded_whole_and_alone() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        c = mesh.client()
        first = b"POST /1 HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
        second = b"GET /2 HTTP/1.1\r\nHost: web\r\n\r\n"
        await c.send(first + second, settle=60)
        assert [s for s, _ in responses(c.got)] == [200, 200]
        assert [(m.method, m.head, m.body) for m in mesh.log] == [("POST", "/1", b"hello"),
                                                                  ("GET", "/2", b"")]
        for server in mesh.servers:
            parse_upstream(bytes(server.raw))
    run(main)


# -- oversized and slow -----------------------------------------------------------------------

def test_a_header_block_is_refused_while_it_arrives() -> None:
    """Before: httptools holds a header value until it ends, so one endless header grew the
    worker without limit (25 MB here) and was never refused."""
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        c = mesh.client()
        c.down.data_received(b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: ")
        fed = 0
        while not c.wire.closing and fed < 25 << 20:
            c.down.data_received(b"a" * 65536)
            fed += 65536
        assert fed <= (64 << 10) + 65536  # refused within a read of the limit
        (status, msg), = responses(c.got)
        assert (status, proxy_error(msg)) == (431, "header_too_large")
        assert mesh.upstream_bytes() == b""
    run(main)


def test_an_endless_response_header_is_a_502() -> None:
    async def main() -> None:
        def endless(server: Server, n: int) -> list[bytes | None]:
            return [b"HTTP/1.1 200 OK\r\nX-Big: ", *([b"a" * 65536] * 400)]

        mesh = Mesh(asyncio.get_running_loop(), HttpPolicy(retry=RetryPolicy(attempts=0)),
                    reply=endless)
        c = mesh.client()
        await c.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n", settle=500)
        (status, msg), = responses(c.got)
        assert (status, proxy_error(msg)) == (502, "upstream_error")
        assert mesh.servers[0].wire is not None and mesh.servers[0].wire.closing
        assert not c.wire.closing  # the client's connection goes on
    run(main)


def test_a_body_past_the_limit_gets_413_and_a_close() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop(), HttpPolicy(limits=HttpLimits(max_body_bytes=10)))
        c = mesh.client()
        await c.send(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 20\r\n\r\n", b"x" * 20)
        (status, msg), = responses(c.got)
        assert (status, proxy_error(msg)) == (413, "body_too_large")
        assert c.wire.closing
    run(main)


def test_a_slow_head_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        monkeypatch.setattr("meshnode.proxy.http.h1.HEAD_TIMEOUT", 0.05)
        mesh = Mesh(asyncio.get_running_loop())
        c = mesh.client()
        c.down.data_received(b"GET / HTTP/1.1\r\nHo")
        await until("the 408", lambda: c.wire.closing)
        (status, msg), = responses(c.got)
        assert (status, proxy_error(msg)) == (408, "header_timeout")
    run(main)


# -- what endpoints answer --------------------------------------------------------------------

def test_an_endpoints_second_response_never_reaches_the_client() -> None:
    """Before: a response after the requested one, in the same read, had its head written to
    the client (which then reads the next response as its body), and the connection went
    back to the pool."""
    async def main() -> None:
        def twice(server: Server, n: int) -> list[bytes | None]:
            return [OK + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL"]

        mesh = Mesh(asyncio.get_running_loop(), reply=twice)
        c = mesh.client()
        await c.send(b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\n")
        await c.send(b"GET /2 HTTP/1.1\r\nHost: web\r\n\r\n")
        assert [(s, m.body) for s, m in responses(c.got)] == [(200, b"ok"), (200, b"ok")]
        assert b"EVIL" not in c.got
        # neither connection was used twice
        assert [s.requests for s in mesh.servers] == [1, 1]
        assert all(s.wire is not None and s.wire.closing for s in mesh.servers)
    run(main)


def test_transfer_codings_are_kept_and_close_delimited_bodies_end_cleanly() -> None:
    """Before: `gzip, chunked` was forwarded as `chunked` (the endpoint read gzip bytes as
    the body); a response body delimited by the close under `Transfer-Encoding: gzip` was
    cut off with a reset at its end."""
    async def main() -> None:
        def gzip_close(server: Server, n: int) -> list[bytes | None]:
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzipped", None]

        mesh = Mesh(asyncio.get_running_loop(), reply=gzip_close)
        c = mesh.client()
        await c.send(b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n\r\n")
        (msg,) = parse_upstream(bytes(mesh.servers[0].raw), codings=True)
        assert header(msg, b"transfer-encoding") == [b"gzip, chunked"] and msg.body == b"abc"
        (status, got), = responses(c.got)
        assert status == 200 and got.complete and got.body == b"zipped"
        assert header(got, b"transfer-encoding") == [b"gzip, chunked"]
        assert not c.wire.aborted
    run(main)


@pytest.mark.parametrize("early", [b"", b"new protocol"])
def test_a_declined_upgrade_goes_on_as_http(early: bytes) -> None:
    """Before: the client's connection stayed paused for good after a declined upgrade."""
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        c = mesh.client()
        await c.send(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n" + early)
        assert responses(c.got)[0][0] == 200
        if early:  # the new protocol's bytes were sent already: no way back to HTTP
            assert c.wire.closing
            return
        await c.send(b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n")
        assert [s for s, _ in responses(c.got)] == [200, 200]
        assert [m.head for m in mesh.log] == ["/ws", "/next"]
    run(main)


# -- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Header lines that framing, routing and hop-by-hop handling hinge on, right and wrong.
NASTY = [b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: -1",
         b"Content-Length: 1e3", b"Content-Length: 3 ", b"Content-Length: 18446744073709551617",
         b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
         b"Transfer-Encoding: chunked, identity", b"Transfer-Encoding : chunked",
         b"Transfer-Encoding:\tchunked", b"Transfer-Encoding: chunked\r\n x",
         b"Host: other", b"Host:", b"Connection: close", b"Connection: keep-alive",
         b"Connection: upgrade", b"Upgrade: websocket", b"Expect: 100-continue",
         b"X-Fold: a\r\n b", b"X-Nul: a\0b", b"X-Lf: a\nb", b"Trailer: X-T", b"TE: trailers",
         b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
         b"tracestate: a=b", b"Proxy-Connection: keep-alive", b"X-Long: " + b"v" * 2000]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
# Never forwarded as the client sent them (the proxy drops or sets them itself).
HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
       b"trailer", b"upgrade", b"traceparent", b"tracestate"}


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` chunked: random chunk sizes, sometimes upper-case hex, extensions, trailers."""
    out = b""
    i = 0
    while i < len(body):
        n = draw(st.integers(1, max(1, len(body) - i)))
        size = b"%x" % n
        if draw(st.booleans()):
            size = size.upper()
        ext = draw(st.sampled_from([b"", b"", b";a=b", b';q="x y"', b" ;x"]))
        out += size + ext + b"\r\n" + body[i:i + n] + b"\r\n"
        i += n
    trailers = draw(st.sampled_from([b"", b"", b"X-T: 1\r\n", b"Host: evil\r\n"]))
    return out + b"0\r\n" + trailers + b"\r\n"


@st.composite
def request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS)).encode()
    path = b"/" + draw(st.binary(max_size=12)).hex().encode()
    if draw(st.integers(0, 9)) == 0:
        path += b"?q=" + draw(st.sampled_from([b"%00", b"a%20b", b"../x", b"\x7f", b"a b"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0", b"HTTP/1.2"]))
    lines = [] if draw(st.integers(0, 15)) == 0 else [b"Host: web"]
    lines += draw(st.lists(st.sampled_from(NASTY), max_size=3))
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = draw(chunked(body))
    else:
        body = b""
    draw(st.randoms()).shuffle(lines)
    eol = b"\n" if draw(st.integers(0, 20)) == 0 else b"\r\n"
    return method + b" " + path + b" " + version + eol + eol.join(lines) + eol + eol + body


@st.composite
def mangled(draw: st.DrawFn, of: st.SearchStrategy[bytes]) -> bytes:
    """`of`'s bytes with a few byte-level edits: flips, deletions, insertions."""
    data = bytearray(draw(of))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["flip", "delete", "insert"]))
        if edit == "flip":
            data[i] = draw(st.sampled_from(b"\r\n\0 \t:;,0Fz\x80"))
        elif edit == "delete":
            del data[i]
        else:
            data[i:i] = draw(st.sampled_from([b"\r\n", b"\n", b" ", b"0\r\n\r\n", b"\r\n\r\n",
                                              b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"]))
    return bytes(data)


STREAM = st.lists(st.one_of(request(), request(), mangled(request()), st.binary(max_size=40)),
                  min_size=1, max_size=4).map(b"".join)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut anywhere into reads."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))))
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)]) if b > a]


class Errors(logging.Handler):
    """ERROR records of the proxy's loggers, and exceptions the loop reports."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.seen.append(repr(context.get("exception") or context.get("message")))


def reference(data: bytes) -> list[Message]:
    """The requests llhttp reads from the client's bytes, up to the first it refuses."""
    reader = _Reader()

    def complete() -> None:
        reader.messages[-1].complete = True
        reader.messages[-1].method = parser.get_method().decode()

    reader.on_message_complete = complete  # type: ignore[method-assign]
    parser = httptools.HttpRequestParser(reader)
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        parser.feed_data(data)
    return [m for m in reader.messages if m.complete]


def answer_by_method(server: Server, n: int) -> list[bytes | None]:
    # a HEAD response has no body whatever its length says: one with none keeps the reading
    # of the client's byte stream independent of which request each response answers
    if server.log[-1].method == "HEAD":
        return [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]
    return [OK]


def kept(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n.lower(), v) for n, v in headers if n.lower() not in HOP]


def check_client(c: Client) -> list[tuple[int, Message]]:
    """What must hold of any client's bytes: well-formed responses; one cut short only on a
    reset; a client error the last response, on a closing connection."""
    got = responses(c.got)
    for i, (status, msg) in enumerate(got):
        if not msg.complete:
            assert i == len(got) - 1 and c.wire.aborted, (i, msg, c.wire.aborted)
        reason = proxy_error(msg)
        assert reason != "proxy_error", msg.body  # a callback raised: a bug in the glue
        if reason and 400 <= status < 500:
            assert i == len(got) - 1 and c.wire.closing, got
    return got


@pytest.mark.parametrize("limits", ["default", "small"])
def test_fuzz_client_bytes(limits: str) -> None:
    """Any client bytes, split anywhere: the properties of check_client, and upstream only
    well-formed requests, each exactly one the client sent (llhttp's reading of its bytes),
    in order, with its own body and headers."""
    http = HttpPolicy(limits=HttpLimits(max_header_bytes=1024, max_body_bytes=100),
                      buffer_bytes=50) if limits == "small" else HttpPolicy()

    @settings(FUZZ)
    @given(st.data(), STREAM)
    def one(data: st.DataObject, stream: bytes) -> None:
        chunks = data.draw(split(stream))
        errors = Errors()
        logging.getLogger("meshnode.proxy.http").addHandler(errors)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(errors.loop_error)
            mesh = Mesh(loop, http, reply=answer_by_method)
            c = mesh.client()
            await c.send(*chunks, settle=40)
            got = check_client(c)
            sent = reference(stream)
            assert len(mesh.log) <= len(sent)
            for fwd, orig in zip(mesh.log, sent, strict=False):
                assert (fwd.method, fwd.head, fwd.body) == (orig.method, orig.head, orig.body)
                assert kept(fwd.headers) == kept(orig.headers), (fwd.headers, orig.headers)
            for server in mesh.servers:
                assert not server.broken or server.broken == "upgraded", server.broken
                msgs = parse_upstream(bytes(server.raw), codings=True, partial=True)
                assert all(m.complete for m in msgs[:-1])
            answered = [m for _, m in got if not proxy_error(m)]
            assert len(answered) <= len(mesh.log)
            assert all(m.body in (b"ok", b"") for m in answered), answered

        try:
            asyncio.run(main())
        finally:
            logging.getLogger("meshnode.proxy.http").removeHandler(errors)
        assert not errors.seen, errors.seen

    one()


@st.composite
def response(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([b"200", b"204", b"304", b"404", b"502", b"503", b"100",
                                   b"101", b"999", b"20"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2", b"ICY"]))
    lines = draw(st.lists(st.sampled_from(NASTY), max_size=3))
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "chunked", "close", "wrong-length"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "wrong-length":
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.integers(-5, 50))))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = draw(chunked(body))
    head = version + b" " + status + b" " + draw(st.sampled_from([b"OK", b"", b"x\x7fy"]))
    return head + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n" + body


ANSWER = st.lists(st.one_of(response(), mangled(response()), st.binary(max_size=60)),
                  min_size=1, max_size=3).map(b"".join)


def test_fuzz_endpoint_bytes() -> None:
    """Any bytes from an endpoint, split anywhere, maybe closed after: the properties of
    check_client; the client gets the endpoint's response or a 502/504 of the proxy's; a
    connection left in the pool carried nothing but whole responses; and the client's next
    request is answered."""

    @settings(FUZZ)
    @given(st.data(), ANSWER, st.booleans(), st.sampled_from([0, 1]))
    def one(data: st.DataObject, answer: bytes, hang_up: bool, attempts: int) -> None:
        parts: list[bytes | None] = list(data.draw(split(answer)))
        if hang_up:
            parts.append(None)
        first = [True]
        sent: dict[str, bytearray] = {}

        def reply(server: Server, n: int) -> list[bytes | None]:
            out: list[bytes | None] = list(parts) if first[0] else [OK]
            first[0] = False
            sent.setdefault(server.addr, bytearray()).extend(
                b"".join(x for x in out if x is not None))
            return out

        errors = Errors()
        logging.getLogger("meshnode.proxy.http").addHandler(errors)
        http = HttpPolicy(retry=RetryPolicy(attempts=attempts, backoff=0),
                          timeouts=HttpTimeouts(request=0.05))

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(errors.loop_error)
            mesh = Mesh(loop, http, reply=reply)
            c = mesh.client()
            await c.send(b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\n")
            await until("an answer", lambda: c.wire.closing or any(
                m.complete and m.status >= 200 for _, m in responses(c.got)), timeout=2)
            got = check_client(c)
            assert all(s != 101 for s, _ in got), got  # the client asked for no upgrade
            finals = [(s, m) for s, m in got if s >= 200]
            if finals:
                status, msg = finals[0]
                if proxy_error(msg):
                    assert (status, proxy_error(msg)) in (
                        (502, "upstream_error"), (502, "reset"), (504, "timeout")), msg
            if not c.wire.closing and finals:
                await c.send(b"GET /2 HTTP/1.1\r\nHost: web\r\n\r\n")
                await until("the second answer", lambda: c.wire.closing or sum(
                    m.complete and m.status >= 200 for _, m in responses(c.got)) >= 2,
                    timeout=2)
                check_client(c)
            for server in mesh.servers:
                if server.wire is not None and not server.wire.closing:
                    # pooled: what it sent was whole responses, one per request
                    out = responses(bytes(sent.get(server.addr, b"")), version="")
                    assert all(m.complete for _, m in out), out
                    assert len([s for s, _ in out if s >= 200]) == server.requests

        try:
            asyncio.run(main())
        finally:
            logging.getLogger("meshnode.proxy.http").removeHandler(errors)
        assert not errors.seen, errors.seen

    one()


def test_a_bodiless_response_that_closes_does_not_return_its_connection() -> None:
    """Before: a 204/304 (or a HEAD's) response went back to the pool even when it said
    `connection: close` (or was HTTP/1.0): the next request met a closed connection."""
    async def main() -> None:
        def no_content_then_close(server: Server, n: int) -> list[bytes | None]:
            return [b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"]

        mesh = Mesh(asyncio.get_running_loop(), reply=no_content_then_close)
        c = mesh.client()
        await c.send(b"DELETE /1 HTTP/1.1\r\nHost: web\r\n\r\n")
        assert responses(c.got)[0][0] == 204
        assert mesh.servers[0].wire is not None and mesh.servers[0].wire.closing
        assert mesh.front.pool.open_count(HostPort.parse(EPS[0])) == 0
    run(main)


@pytest.mark.parametrize("head", [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n",
                                  b"HTTP/1.1 999 Whatever\r\ncontent-length: 0\r\n"])
def test_an_unasked_switch_or_a_status_past_599_is_a_502(head: bytes) -> None:
    """Before: a 101 to a request without Upgrade turned the client's connection into an
    opaque tunnel to that endpoint (its next requests unrouted, unauthorized, uncounted); a
    status past 599 (RFC 9110 15) was passed on."""
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop(), HttpPolicy(retry=RetryPolicy(attempts=0)),
                    reply=lambda server, n: [head + b"\r\n"] if len(server.log) == 1 else [OK])
        c = mesh.client()
        await c.send(b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\n")
        (status, msg), = responses(c.got)
        assert (status, proxy_error(msg)) == (502, "upstream_error"), msg
        await c.send(b"GET /2 HTTP/1.1\r\nHost: web\r\n\r\n")
        assert [s for s, _ in responses(c.got)] == [502, 200]
        assert [m.head for m in mesh.log] == ["/1", "/2"]
    run(main)


def test_a_pipelined_head_is_not_timed_out_while_the_proxy_does_not_read_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the next request's head timer ran while the proxy itself had stopped reading
    the connection (one request answered at a time): a first response slower than
    HEAD_TIMEOUT aborted the connection, that response with it."""
    async def main() -> None:
        monkeypatch.setattr("meshnode.proxy.http.h1.HEAD_TIMEOUT", 0.05)
        mesh = Mesh(asyncio.get_running_loop(),
                    reply=lambda server, n: [] if server.log[-1].head == "/1" else [OK])
        c = mesh.client()
        c.down.data_received(b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\nGET /2 HTTP/1.1\r\nHo")
        await until("/1 at the endpoint", lambda: mesh.log)
        await asyncio.sleep(0.2)  # the first response takes longer than HEAD_TIMEOUT
        assert not c.wire.closing
        mesh.servers[0].send(OK)
        await c.send(b"st: web\r\n\r\n")
        assert [s for s, _ in responses(c.got)] == [200, 200]
        assert [m.head for m in mesh.log] == ["/1", "/2"]
    run(main)
