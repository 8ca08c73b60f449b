"""HTTP/2 proxying (meshnode/proxy/http/h2.py, h2conn.py, h2pool.py, grpc_status.py) driven
without sockets: the client and the endpoints are h2 connections of the test, joined to the
proxy's protocols by in-memory transports (uvicorn's way of testing a protocol). What the
integration tests cannot arrange on demand is checked here: a drain's GOAWAY lets streams in
flight finish and refuses later ones; an endpoint's GOAWAY sends the requests it never took to
another endpoint; flow control holds a client that does not read to the windows, end to end; a
reset travels both ways; a retried request's body is sent again whole; the pool shares one dial
and waits at its connection limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address
from typing import Any, Literal

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes

from meshnode.model import Endpoint, HostPort, OrigDstAddr, Reset, ServiceSpec
from meshnode.policy.resources import (
    BalancerConfig,
    HttpLimits,
    HttpPolicy,
    OutlierConfig,
    RetryPolicy,
    ServicePolicy,
)
from meshnode.proxy.http import grpc_status
from meshnode.proxy.http.dial import DialError
from meshnode.proxy.http.front import HttpFront
from meshnode.proxy.http.h2 import H2Downstream
from meshnode.proxy.http.h2conn import GracefulConnection, H2Upstream, goaway_frame
from meshnode.proxy.http.h2pool import H2Pool
from meshnode.proxy.http.pool import PoolFull
from meshnode.proxy.stats import WorkerStats
from meshnode.proxy.telemetry import ConnInfo
from meshnode.route import ServiceTable

pytestmark = pytest.mark.timeout(20)

VIP = IPv4Address("127.240.0.7")
EPS = ("10.0.0.1:8080", "10.0.0.2:8080")
Headers = list[tuple[bytes, bytes]]


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


async def until(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Let the loop run until `check()` is truthy (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class Pipe(asyncio.Transport):
    """One direction of an in-memory connection: writes arrive at `peer` on the next pass."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.peer: asyncio.Protocol | None = None
        self.twin: Pipe | None = None
        self.own: asyncio.BaseProtocol | None = None
        self.closing = False
        self.dead = False  # connection_lost was called: nothing arrives any more
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.peer is None:
            return
        self.sent += len(data)
        self.loop.call_soon(self._deliver, bytes(data))

    def _deliver(self, data: bytes) -> None:
        # what was written before a close still arrives (the loop runs callbacks in order)
        if self.peer is not None and not self.dead:
            self.peer.data_received(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        twin = self.twin
        if twin is not None:
            twin.closing = True
        self.loop.call_soon(self._lost)

    abort = close

    def _lost(self) -> None:
        self.dead = True
        if self.twin is not None:
            self.twin.dead = True
        for proto in (self.own, self.peer):
            if proto is not None:
                proto.connection_lost(None)

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def connect(loop: asyncio.AbstractEventLoop, a: asyncio.Protocol,
            b: asyncio.Protocol) -> tuple[Pipe, Pipe]:
    ab, ba = Pipe(loop), Pipe(loop)
    ab.peer, ab.own, ab.twin = b, a, ba
    ba.peer, ba.own, ba.twin = a, b, ab
    a.connection_made(ab)
    b.connection_made(ba)
    return ab, ba


class Peer(asyncio.Protocol):
    """An h2 connection of the test (a client, or an endpoint): its events, in order."""

    def __init__(self, client: bool, window: int | None = None) -> None:
        # GracefulConnection: a client that keeps its streams after a GOAWAY, as RFC 9113
        # allows (stock h2 closes the whole connection)
        self.h2: H2Connection = GracefulConnection(
            H2Configuration(client_side=client, header_encoding=None))
        self.events: list[Any] = []
        self.transport: asyncio.Transport | None = None
        self.window = window
        self.on_request: Callable[[Peer, RequestReceived], None] | None = None
        self.on_end: Callable[[Peer, int], None] | None = None
        self.lost = False
        self.auto_ack = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        if self.window is not None:
            self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        self.flush()

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            self.events.append(ev)
            if isinstance(ev, DataReceived) and self.auto_ack:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, RequestReceived) and self.on_request is not None:
                self.on_request(self, ev)
            elif isinstance(ev, StreamEnded) and self.on_end is not None:
                self.on_end(self, ev.stream_id)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def flush(self) -> None:
        if self.transport is not None:
            self.transport.write(self.h2.data_to_send())

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)
                and (sid is None or getattr(e, "stream_id", None) == sid)]

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(DataReceived, sid))

    def request(self, path: str, body: bytes = b"", end: bool = True,
                extra: Headers | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"POST" if body or not end else b"GET"),
                   (b":scheme", b"http"), (b":authority", b"web"),
                   (b":path", path.encode()), *(extra or [])]
        self.h2.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.send(sid, body, end)
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, end: bool) -> None:
        """DATA frames of at most the frame size (within the windows: small bodies only)."""
        for i in range(0, len(data), 16384):
            last = i + 16384 >= len(data)
            self.h2.send_data(sid, data[i:i + 16384], end_stream=end and last)

    def respond(self, sid: int, status: int = 200, body: bytes = b"",
                trailers: Headers | None = None) -> None:
        self.h2.send_headers(sid, [(b":status", b"%d" % status)],
                             end_stream=not body and not trailers)
        if body:
            self.send(sid, body, not trailers)
        if trailers:
            self.h2.send_headers(sid, trailers, end_stream=True)
        self.flush()


class Mesh:
    """An HttpFront with one service, `web` (http2, round-robin over EPS), whose endpoints are
    Peers of the test; `client()` connects a client to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, http: HttpPolicy | None = None,
                 protocol: Literal["http2", "grpc"] = "http2") -> None:
        self.loop = loop
        table = ServiceTable()
        policy = ServicePolicy(port=80, protocol=protocol, http=http or HttpPolicy(),
                               balancer=BalancerConfig("round-robin"),
                               outlier=OutlierConfig(consecutive_5xx=0))
        table.apply(Reset(ServiceSpec("web", 7, VIP, policy),
                          tuple(Endpoint(HostPort.parse(e)) for e in EPS)))
        self.front = HttpFront(loop, table, WorkerStats(), None, None, 0, "n", 0, 1.0,
                               time.monotonic)
        self.endpoints: dict[str, list[Peer]] = {e: [] for e in EPS}
        self.make_endpoint: Callable[[str], Peer] = lambda addr: Peer(client=False)
        self.dials = 0
        self.refuse: set[str] = set()

        async def dial_h2(ep: Endpoint, src: str, service: str,
                          key: tuple[Any, str]) -> H2Upstream:
            self.dials += 1
            await asyncio.sleep(0)
            if str(ep.addr) in self.refuse:
                raise DialError("connect_refused", f"connect to {ep.addr}: refused")
            server = self.make_endpoint(str(ep.addr))
            self.endpoints[str(ep.addr)].append(server)
            up = H2Upstream(self.front.h2pool, key, time.monotonic, 65536)
            connect(loop, up, server)
            return up

        self.front.dial_h2 = dial_h2  # type: ignore[method-assign]

    def client(self, window: int | None = None, mode: str = "h2") -> tuple[Peer, H2Downstream]:
        info = ConnInfo(time.monotonic(), ("127.0.0.1", 50000))
        info.src, info.service = "client", "web"
        down = H2Downstream(self.front, info, "web", OrigDstAddr(VIP, 80), mode)
        client = Peer(client=True, window=window)
        connect(self.loop, client, down)
        return client, down

    def requests(self) -> dict[tuple[str, ...], int]:
        return dict(self.front.stats.labelled["requests"])


def answer_at_once(peer: Peer, ev: RequestReceived) -> None:
    headers = dict(ev.headers)
    peer.respond(ev.stream_id, 200, b"hi " + headers[b":path"])


# -- relaying ---------------------------------------------------------------------------------

def test_streams_of_one_connection_spread_and_are_counted() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        mesh.make_endpoint = lambda addr: _with(Peer(client=False), answer_at_once)
        client, _ = mesh.client()
        sids = [client.request(f"/r{i}") for i in range(6)]
        await until("6 responses", lambda: len(client.of(StreamEnded)) == 6)
        assert [client.body(s) for s in sids] == [b"hi /r%d" % i for i in range(6)]
        # round-robin per request: both endpoints, one connection each, 3 streams each
        assert {a: len(p) for a, p in mesh.endpoints.items()} == {EPS[0]: 1, EPS[1]: 1}
        assert [len(p[0].of(RequestReceived)) for p in mesh.endpoints.values()] == [3, 3]
        # the proxy's traceparent reached the endpoint
        req = mesh.endpoints[EPS[0]][0].of(RequestReceived)[0]
        assert dict(req.headers)[b"traceparent"].startswith(b"00-")
        assert mesh.requests() == {("client", "web", "default", "GET", "2xx"): 6}
    run(main)


def test_grpc_trailers_and_status_pass_through() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop(), protocol="grpc")

        def grpc_answer(peer: Peer, ev: RequestReceived) -> None:
            peer.respond(ev.stream_id, 200, b"\0\0\0\0\x02ok",
                         trailers=[(b"grpc-status", b"5"), (b"grpc-message", b"nope")])

        mesh.make_endpoint = lambda addr: _with(Peer(client=False), grpc_answer)
        client, _ = mesh.client(mode="grpc")
        sid = client.request("/pkg.Svc/Get", b"\0\0\0\0\x01x",
                             extra=[(b"content-type", b"application/grpc"), (b"te", b"trailers")])
        await until("the call's end", lambda: client.of(StreamEnded, sid))
        (trailers,) = client.of(TrailersReceived, sid)
        assert dict(trailers.headers)[b"grpc-status"] == b"5"
        assert client.body(sid) == b"\0\0\0\0\x02ok"
        assert mesh.requests() == {("client", "web", "default", "POST", "NOT_FOUND"): 1}
    run(main)


def test_retried_request_sends_its_body_again_whole() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop(), HttpPolicy(
            retry=RetryPolicy(backoff=0, methods=("POST",))))

        def first_fails(peer: Peer, sid: int) -> None:
            body = peer.body(sid)
            peer.respond(sid, 503 if peer is mesh.endpoints[EPS[0]][0] else 200, body)

        def make(addr: str) -> Peer:
            p = Peer(client=False)
            p.on_end = first_fails
            return p

        mesh.make_endpoint = make
        client, _ = mesh.client()
        body = bytes(range(256)) * 100
        sid = client.request("/upload", body)
        await until("the response", lambda: client.of(StreamEnded, sid))
        assert client.of(ResponseReceived, sid)[0].headers[0] == (b":status", b"200")
        assert client.body(sid) == body
        assert [p[0].body(1) for p in mesh.endpoints.values()] == [body, body]
        assert mesh.front.stats.labelled["request_retries"] == {("client", "web", "default"): 1}
    run(main)


def test_flow_control_holds_a_client_that_does_not_read() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        big = b"x" * (2 << 20)
        endpoint: list[Peer] = []

        def make(addr: str) -> Peer:
            p = Peer(client=False)
            endpoint.append(p)
            return p

        mesh.make_endpoint = make
        client, _ = mesh.client(window=16384)
        client.auto_ack = False
        sid = client.request("/big")
        server = await until("the endpoint", lambda: endpoint and endpoint[0].of(
            RequestReceived) and endpoint[0])
        up_sid = server.of(RequestReceived)[0].stream_id
        server.h2.send_headers(up_sid, [(b":status", b"200")])
        sent = 0

        def push() -> None:
            nonlocal sent
            while sent < len(big):
                window = min(server.h2.local_flow_control_window(up_sid), 16384)
                if window <= 0:
                    break
                server.h2.send_data(up_sid, big[sent:sent + window])
                sent += window
            server.flush()

        push()
        await until("the client's window full", lambda: len(client.body(sid)) == 16384)
        for _ in range(20):
            await asyncio.sleep(0)
            push()
        # what the client's window took (16 KiB) was passed on and acknowledged; beyond it
        # the proxy holds the endpoint's stream window (256 KiB), no more
        assert sent == 16384 + (256 << 10)
        # the client reads: the rest flows
        received = 0
        while received < len(big):
            got = len(client.body(sid))
            if got > received:
                client.h2.acknowledge_received_data(got - received, sid)
                client.flush()
                received = got
            push()
            await asyncio.sleep(0)
        assert client.body(sid) == big
    run(main)


def test_resets_travel_both_ways() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        endpoint: list[Peer] = []

        def make(addr: str) -> Peer:
            endpoint.append(Peer(client=False))
            return endpoint[-1]

        mesh.make_endpoint = make
        client, _ = mesh.client()
        # the client cancels: the endpoint's stream is reset with its code
        sid = client.request("/hold")
        await until("the request upstream", lambda: endpoint and endpoint[0].of(RequestReceived))
        client.h2.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        (reset,) = await until("the reset upstream", lambda: endpoint[0].of(StreamReset))
        assert reset.error_code == ErrorCodes.CANCEL
        # the endpoint cuts a response off: the client's stream is reset with its code
        sid = client.request("/cut")
        server = await until("the endpoint", lambda: next(
            (p for p in endpoint if p.of(RequestReceived, None) and any(
                dict(e.headers)[b":path"] == b"/cut" for e in p.of(RequestReceived))), None))
        up_sid = next(e.stream_id for e in server.of(RequestReceived)
                      if dict(e.headers)[b":path"] == b"/cut")
        server.h2.send_headers(up_sid, [(b":status", b"200")])
        server.h2.send_data(up_sid, b"part")
        server.h2.reset_stream(up_sid, ErrorCodes.INTERNAL_ERROR)
        server.flush()
        (cut,) = await until("the reset downstream", lambda: client.of(StreamReset, sid))
        assert cut.error_code == ErrorCodes.INTERNAL_ERROR
        assert client.body(sid) == b"part"
        outcomes = mesh.front.stats.labelled["request_failures"]
        assert outcomes == {("client", "web", "default", "client_gone"): 1,
                            ("client", "web", "default", "reset"): 1}
    run(main)


def test_a_body_past_the_limit_is_refused_and_the_client_told_to_stop() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop(), HttpPolicy(limits=HttpLimits(max_body_bytes=1000)))
        endpoint: list[Peer] = []

        def make(addr: str) -> Peer:
            endpoint.append(Peer(client=False))
            return endpoint[-1]

        mesh.make_endpoint = make
        client, _ = mesh.client()
        sid = client.request("/upload", b"x" * 5000, end=False)
        (reset,) = await until("the client told to stop", lambda: client.of(StreamReset, sid))
        (head,) = client.of(ResponseReceived, sid)
        assert dict(head.headers)[b":status"] == b"413"
        assert dict(head.headers)[b"x-meshnode-error"] == b"body_too_large"
        assert b"limits.maxBodyBytes" in client.body(sid)
        # RFC 9113 8.1: a complete response, then RST_STREAM NO_ERROR: stop sending
        assert reset.error_code == ErrorCodes.NO_ERROR
        # refused while the endpoint's connection was being dialed: nothing went to it
        assert all(not p.of(RequestReceived) for p in endpoint)
        # once streaming to an endpoint, the endpoint's stream is reset as well
        sid = client.request("/upload", b"y" * 600, end=False)
        server = await until("the body upstream", lambda: next(
            (p for p in endpoint if p.of(DataReceived)), None))
        client.send(sid, b"y" * 600, False)
        client.flush()
        (up_reset,) = await until("the endpoint's stream reset", lambda: server.of(StreamReset))
        assert up_reset.error_code == ErrorCodes.CANCEL
        assert server.body(up_reset.stream_id) == b"y" * 600
        await until("the second refusal", lambda: client.of(StreamReset, sid))
        assert mesh.requests() == {("client", "web", "default", "POST", "4xx"): 2}
    run(main)


# -- GOAWAY both ways -------------------------------------------------------------------------

def test_drain_lets_streams_in_flight_finish_and_refuses_new_ones() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop())
        held: list[tuple[Peer, int]] = []
        mesh.make_endpoint = lambda addr: _with(
            Peer(client=False), lambda p, ev: held.append((p, ev.stream_id)))
        client, _ = mesh.client()
        first = client.request("/slow")
        await until("the request upstream", lambda: held)
        mesh.front.drain()
        late = client.request("/late")  # crosses the GOAWAY on the wire
        (goaway,) = await until("GOAWAY", lambda: client.of(ConnectionTerminated))
        assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, first)
        (refused,) = await until("the late stream refused", lambda: client.of(
            StreamReset, late))
        assert refused.error_code == ErrorCodes.REFUSED_STREAM
        assert not client.lost
        peer, up_sid = held[0]
        peer.respond(up_sid, 200, b"done")
        await until("the connection closed", lambda: client.lost)
        assert client.body(first) == b"done"
        assert len(held) == 1 and mesh.front.clients == set()
    run(main)


def test_endpoint_goaway_sends_requests_it_never_took_elsewhere() -> None:
    async def main() -> None:
        mesh = Mesh(asyncio.get_running_loop(), HttpPolicy(retry=RetryPolicy(backoff=0)))
        seen: list[RequestReceived] = []

        def ep0(peer: Peer, ev: RequestReceived) -> None:
            seen.append(ev)
            if len(seen) == 2:
                # it takes the first request, not the second: GOAWAY naming the first
                mesh.refuse.clear()
                peer.flush()
                peer.transport.write(goaway_frame(seen[0].stream_id))  # type: ignore[union-attr]
                answer_at_once(peer, seen[0])

        mesh.make_endpoint = lambda addr: _with(Peer(client=False),
                                                ep0 if addr == EPS[0] else answer_at_once)
        # Round-robin: /a goes to EPS[0]; /b to EPS[1] first, which refuses the connection,
        # then to EPS[0], on /a's connection; that one's GOAWAY sends /b to EPS[1] again.
        mesh.refuse.add(EPS[1])
        client, _ = mesh.client()
        a = client.request("/a")
        await until("/a upstream", lambda: seen)
        b = client.request("/b")
        await until("both answered", lambda: client.of(StreamEnded, a) and client.of(
            StreamEnded, b))
        assert (client.body(a), client.body(b)) == (b"hi /a", b"hi /b")
        assert [len(p.of(RequestReceived)) for p in mesh.endpoints[EPS[1]]] == [1]
        assert mesh.front.stats.labelled["request_retries"] == {("client", "web", "default"): 2}
        # the connection that went away closed once its last stream ended
        await until("EPS[0]'s connection closed", lambda: mesh.endpoints[EPS[0]][0].lost)
    run(main)


def _with(peer: Peer, handler: Callable[[Peer, RequestReceived], None]) -> Peer:
    peer.on_request = handler
    return peer


# -- the pool ---------------------------------------------------------------------------------

class FakeConn:
    def __init__(self, key: tuple[Any, str], streams: int = 2) -> None:
        self.key = key
        self.closed = self.retired = False
        self.error = ""
        self.idle_since = 0.0
        self.idle_limit = 300.0
        self.limit = streams
        self.n = 0

    def capacity(self) -> int:
        return 0 if self.closed or self.retired else self.limit - self.n

    def active(self) -> int:
        return self.n

    def close(self) -> None:
        self.closed = True


def test_pool_shares_a_dial_and_waits_at_its_connection_limit() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool: H2Pool[FakeConn] = H2Pool(loop, time.monotonic)
        key = ("ep", "")
        dials = 0

        async def dial() -> FakeConn:
            nonlocal dials
            dials += 1
            await asyncio.sleep(0.01)
            return FakeConn(key)

        async def take() -> FakeConn:
            conn = await pool.get(key, dial, max_connections=1, max_pending=1)
            conn.n += 1
            return conn

        a, b = await asyncio.gather(take(), take())
        assert a is b and dials == 1  # two streams, one dial
        waiting = loop.create_task(take())
        await asyncio.sleep(0.02)
        assert not waiting.done()  # full, at max_connections: it waits
        with pytest.raises(PoolFull):
            await take()  # more than max_pending waiting: refused at once
        a.n -= 1
        pool.stream_done(a)
        assert await waiting is a
        a.close()
        pool.discard(a)
        assert pool.ready(key) is None and pool.open_count("ep") == 0
    run(main)


def test_pool_dial_failure_reaches_every_waiter() -> None:
    async def main() -> None:
        pool: H2Pool[FakeConn] = H2Pool(asyncio.get_running_loop(), time.monotonic)

        async def dial() -> FakeConn:
            await asyncio.sleep(0.01)
            raise DialError("connect_refused", "refused")

        results = await asyncio.gather(*(pool.get(("ep", ""), dial, 10, 10) for _ in range(3)),
                                       return_exceptions=True)
        assert [type(r) for r in results] == [DialError] * 3
    run(main)


# -- gRPC helpers -----------------------------------------------------------------------------

def test_grpc_status_helpers() -> None:
    assert grpc_status.is_grpc(b"application/grpc")
    assert grpc_status.is_grpc(b"application/grpc+proto")
    assert not grpc_status.is_grpc(b"application/grpcx")
    assert not grpc_status.is_grpc(None)
    assert grpc_status.grpc_timeout(b"250m") == pytest.approx(0.25)
    assert grpc_status.grpc_timeout(b"2S") == 2.0
    assert grpc_status.grpc_timeout(b"123456789S") is None  # at most 8 digits
    assert grpc_status.grpc_timeout(b"1x") is None
    assert grpc_status.message("50% ünïcode\n") == b"50%25 %C3%BCn%C3%AFcode%0A"
    assert grpc_status.status_of_http(503) == grpc_status.UNAVAILABLE
    assert grpc_status.status_of_http(200) == grpc_status.UNKNOWN  # ended without a status
    assert grpc_status.status_of_reset(ErrorCodes.CANCEL) == grpc_status.CANCELLED
    assert grpc_status.local_status("timeout") == grpc_status.DEADLINE_EXCEEDED
    assert grpc_status.local_status("no_endpoint") == grpc_status.UNAVAILABLE
    head = dict(grpc_status.trailers_only(14, "no endpoint", "no_endpoint"))
    assert (head[b":status"], head[b"grpc-status"], head[b"x-meshnode-error"]) == \
        (b"200", b"14", b"no_endpoint")
