"""Mirroring (meshnode/proxy/http/mirror.py) against real loopback servers of the test: a copy
arrives whole with its host suffixed "-shadow" and its answer is thrown away; copies reuse
their connection; HTTP/2 copies go to an http2 mirror service; a mirror that refuses, hangs or
is over its bounds costs the caller nothing (`send` returns at once, never raises) and every
copy is counted once, sent or dropped by reason."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Address
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded

from meshnode.model import Endpoint, HostPort, Reset, ServiceSpec
from meshnode.policy.resources import ServicePolicy
from meshnode.proxy.http.mirror import Mirror, shadow_authority
from meshnode.proxy.stats import WorkerStats
from meshnode.route import ServiceTable
from meshnode.route.traffic import Pick
from tests.unit.test_h2 import run, until

pytestmark = pytest.mark.timeout(20)

Headers = list[tuple[bytes, bytes]]




class H1Server:
    """HTTP/1.1 on 127.0.0.1: records each request's head and body; answers 200 with a body
    (or never, when `hang`)."""

    def __init__(self, hang: bool = False, close_delimited: bool = False) -> None:
        self.hang = hang
        self.close_delimited = close_delimited
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, v = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(v)
                body = await reader.readexactly(length) if length else b""
                self.requests.append((head, body))
                if self.hang:
                    await asyncio.sleep(60)
                if self.close_delimited:  # no length: the body ends with the connection
                    writer.write(b"HTTP/1.1 200 OK\r\n\r\nhello")
                    await writer.drain()
                    break
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class H2Server(asyncio.Protocol):
    """HTTP/2 (prior knowledge) on 127.0.0.1: records each stream's headers and body."""

    requests: list[tuple[Headers, bytes]]

    def __init__(self, requests: list[tuple[Headers, bytes]]) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.requests = requests
        self.bodies: dict[int, bytes] = {}
        self.heads: dict[int, Headers] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, RequestReceived):
                self.heads[ev.stream_id] = list(ev.headers)
                self.bodies[ev.stream_id] = b""
            elif isinstance(ev, DataReceived):
                self.bodies[ev.stream_id] += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                sid = ev.stream_id
                self.requests.append((self.heads[sid], self.bodies[sid]))
                self.h2.send_headers(sid, [(b":status", b"200")])
                self.h2.send_data(sid, b"discarded", end_stream=True)
        assert self.transport is not None
        self.transport.write(self.h2.data_to_send())


def mirror_of(port: int, protocol: str = "http", **kw: Any) -> tuple[Mirror, WorkerStats]:
    """A Mirror whose table has `shadow` (endpoint 127.0.0.1:port, VIP port 80)."""
    table = ServiceTable()
    policy = ServicePolicy(port=80, protocol=protocol)  # type: ignore[arg-type]
    table.apply(Reset(ServiceSpec("shadow", 9, IPv4Address("127.240.0.9"), policy),
                      (Endpoint(HostPort.parse(f"127.0.0.1:{port}")),)))
    stats = WorkerStats()
    m = Mirror(asyncio.get_running_loop(), table, stats, None, "n", 0, 1.0, time.monotonic,
               **kw)
    return m, stats


def counted(stats: WorkerStats) -> dict[tuple[str, ...], int]:
    out = {("sent", *k): v for k, v in stats.labelled["mirror_sent"].items()}
    out.update({("dropped", *k): v for k, v in stats.labelled["mirror_dropped"].items()})
    return out


H1_HEAD: Headers = [(b"Host", b"reviews:8080"), (b"x-user", b"ann"),
                    (b"content-length", b"4"), (b"connection", b"keep-alive")]


def test_a_copy_arrives_whole_with_a_shadow_host_and_reuses_its_connection() -> None:
    async def main() -> None:
        server = H1Server()
        port = await server.start()
        m, stats = mirror_of(port)
        t0 = time.perf_counter()
        for i in range(3):
            m.send(Pick("shadow"), "web", "POST", f"/r/{i}?q=1", H1_HEAD, b"body", "http/1.1",
                   80)
            await until("the copy answered", lambda: m.inflight == 0)
        assert time.perf_counter() - t0 < 2
        assert [b for _, b in server.requests] == [b"body"] * 3
        head = server.requests[0][0].decode()
        lines = head.split("\r\n")
        assert lines[0] == "POST /r/0?q=1 HTTP/1.1"
        assert "host: reviews-shadow:8080" in lines
        assert "x-user: ann" in lines
        assert "content-length: 4" in lines
        assert not any(x.lower().startswith("connection") for x in lines), lines
        assert server.connections == 1  # kept alive between copies
        assert counted(stats) == {("sent", "web", "shadow"): 3}
        m.close()
        server.close()

    run(main)


def test_an_h2_request_goes_as_http2_to_an_http2_mirror() -> None:
    async def main() -> None:
        got: list[tuple[Headers, bytes]] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: H2Server(got), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        m, stats = mirror_of(port, "grpc")
        head: Headers = [(b":method", b"POST"), (b":scheme", b"http"),
                         (b":path", b"/pkg.Svc/Get"), (b":authority", b"reviews"),
                         (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        for _ in range(2):
            m.send(Pick("shadow"), "web", "POST", "/pkg.Svc/Get", head, b"\0\0\0\0\0", "grpc",
                   80)
        await until("both copies answered", lambda: m.inflight == 0 and len(got) == 2)
        headers, body = got[0]
        fields = dict(headers)
        assert fields[b":authority"] == b"reviews-shadow"
        assert (fields[b":path"], fields[b":method"]) == (b"/pkg.Svc/Get", b"POST")
        assert fields[b"te"] == b"trailers" and body == b"\0\0\0\0\0"
        await until("counted", lambda: counted(stats) == {("sent", "web", "shadow"): 2})
        m.close()
        server.close()

    run(main)


def test_a_mirror_that_refuses_or_hangs_costs_the_caller_nothing() -> None:
    async def main() -> None:
        # refused: nothing listens there
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        m, stats = mirror_of(dead)
        t0 = time.perf_counter()
        m.send(Pick("shadow"), "web", "GET", "/", [(b"host", b"r")], b"", "http/1.1", 80)
        assert time.perf_counter() - t0 < 0.01  # no I/O on the caller's path
        await until("dropped", lambda: m.inflight == 0)
        assert counted(stats) == {("dropped", "web", "shadow", "connect"): 1}

        # hangs: two copies in flight at most, the third dropped at once; the two time out
        server = H1Server(hang=True)
        port = await server.start()
        m, stats = mirror_of(port, max_inflight=2, timeout=0.3)
        for _ in range(3):
            m.send(Pick("shadow"), "web", "GET", "/", [(b"host", b"r")], b"", "http/1.1", 80)
        assert counted(stats) == {("dropped", "web", "shadow", "overload"): 1}
        await until("timed out", lambda: m.inflight == 0)
        assert counted(stats) == {("dropped", "web", "shadow", "overload"): 1,
                                  ("dropped", "web", "shadow", "timeout"): 2}
        assert m.held == 0
        m.close()
        server.close()

    run(main)


def test_bytes_held_are_bounded_and_odd_copies_are_dropped_not_raised() -> None:
    async def main() -> None:
        server = H1Server(hang=True)
        port = await server.start()
        m, stats = mirror_of(port, max_bytes=10_000, timeout=0.3)
        m.send(Pick("shadow"), "web", "POST", "/", [(b"host", b"r")], b"x" * 6000, "h2", 80)
        m.send(Pick("shadow"), "web", "POST", "/", [(b"host", b"r")], b"x" * 6000, "h2", 80)
        m.send(Pick("shadow"), "web", "POST", "/", [(b"host", b"r")], None, "h2", 80)
        m.send(Pick("nowhere"), "web", "GET", "/", [], b"", "h2", 80)
        m.send(Pick("shadow", (("version", "v9"),)), "web", "GET", "/", [], b"", "h2", 80)
        assert counted(stats) == {("dropped", "web", "shadow", "overload"): 1,
                                  ("dropped", "web", "shadow", "too_large"): 1,
                                  ("dropped", "web", "nowhere", "no_endpoint"): 1,
                                  ("dropped", "web", "shadow", "no_endpoint"): 1}
        assert m.inflight == 1 and 6000 < m.held < 10_000
        await until("timed out", lambda: m.inflight == 0)
        assert m.held == 0
        m.close()
        server.close()

    run(main)


def test_shadow_authority_keeps_the_port() -> None:
    assert shadow_authority(b"reviews") == b"reviews-shadow"
    assert shadow_authority(b"reviews.mesh:8080") == b"reviews.mesh-shadow:8080"
    assert shadow_authority(b"[::1]:80") == b"[::1]-shadow:80"
    assert shadow_authority(b"10.0.0.1") == b"10.0.0.1-shadow"


def test_odd_answers_and_a_grpc_call_to_an_http1_mirror() -> None:
    async def main() -> None:
        server = H1Server(close_delimited=True)
        port = await server.start()
        m, stats = mirror_of(port)
        for _ in range(2):  # the second on a new connection: the first one closed
            m.send(Pick("shadow"), "web", "GET", "/", [(b"host", b"r")], b"", "http/1.1", 80)
            await until("answered", lambda: m.inflight == 0)
        # gRPC cannot go over HTTP/1.1: not sent at all
        m.send(Pick("shadow"), "web", "POST", "/pkg.Svc/Get",
               [(b":authority", b"r"), (b"content-type", b"application/grpc")], b"", "grpc",
               80)
        assert counted(stats) == {("sent", "web", "shadow"): 2,
                                  ("dropped", "web", "shadow", "protocol"): 1}
        assert server.connections == 2
        m.close()
        server.close()

    run(main)
