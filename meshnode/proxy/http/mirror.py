"""Mirroring (a Route rule's `mirror`): a copy of a request sent to another service,
fire-and-forget. `Mirror` (one per worker, `HttpFront.mirror`) takes a request the exchange
has whole (head and held body) and sends the copy on a task of its own, over connections of
its own, so a slow, failing or absent mirror never touches the real request: `send` does no
I/O, never awaits and never raises; the copy's answer is read and thrown away.

What a copy looks like: the request as the client sent it, its Host (HTTP/1.1) or :authority
(HTTP/2) suffixed "-shadow" before any port, as Istio does, so the mirror's logs tell copies
from real traffic. It goes to an endpoint of the mirror service (or the rule's subset of it)
as the routing table picks one, as HTTP/2 when the mirror service's port protocol is http2 or
grpc (or auto, for a gRPC call), else as HTTP/1.1; to an endpoint of another host through
the mTLS tunnel with the source's identity, like the real request (proxy/http/dial.py), and
only when authorization lets the source call the mirror service.

Bounds, per worker: at most `max_inflight` copies in flight and `max_bytes` of copies held
(heads and bodies); a copy past either is dropped, as is one whose body the exchange did not
hold whole. A copy has `timeout` seconds, dial to last response byte. Every copy asked for is
counted once, in `mirror_sent` (the mirror answered, whatever the status) or in
`mirror_dropped` by reason: overload, too_large, no_endpoint, denied, protocol (a gRPC call
to a mirror port that is HTTP/1.1), connect, timeout, reset, error (counters.REQUEST_FIELDS).

Connections: HTTP/1.1 ones idle between copies in a small pool of this module's (at most
`MAX_IDLE` per endpoint); HTTP/2 ones in an H2Pool of its own. Neither touches the pools of
real requests, whose circuit breakers (maxConnections, maxPending) count real traffic only.
Idle connections close after the mirror service's http idle timeout.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httptools
from h2.exceptions import ProtocolError

from meshnode.model import Endpoint
from meshnode.proxy.http.dial import DialError, dial
from meshnode.proxy.http.h2conn import H2Upstream, pump
from meshnode.proxy.http.h2pool import H2Pool
from meshnode.proxy.http.pool import PoolFull
from meshnode.route.table import ServiceTable, ToService

if TYPE_CHECKING:
    from meshnode.proxy.stats import WorkerStats
    from meshnode.proxy.tunnel import MeshSecurity
    from meshnode.route.traffic import Pick

__all__ = ["MAX_BYTES", "MAX_INFLIGHT", "MIRROR_TIMEOUT", "Mirror", "shadow_authority"]

log = logging.getLogger("meshnode.proxy.http")

Headers = list[tuple[bytes, bytes]]
Key = tuple[Any, str]

MAX_INFLIGHT = 128  # copies in flight per worker (HTTP/1.1: a connection each)
MAX_BYTES = 4 << 20  # bytes of copies (heads and bodies) held per worker
MIRROR_TIMEOUT = 2.0  # seconds a copy may take, dial to the last byte of its answer
MAX_IDLE = 32  # idle HTTP/1.1 connections kept per mirror endpoint
SWEEP_INTERVAL = 5.0  # seconds between closes of connections idle past their limit

# Not copied: hop-by-hop fields (RFC 9110 7.6.1), the ones rebuilt for the copy (its framing
# and its host), and HTTP/2's pseudo-headers (rebuilt for either protocol).
_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                   b"te", b"trailer", b"upgrade", b"host", b"content-length"})
_BODILESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class _Failed(Exception):
    """A copy that got no answer; `reason` is its mirror_dropped label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def shadow_authority(authority: bytes) -> bytes:
    """`host[:port]` -> `host-shadow[:port]` (IPv6 literals keep their brackets)."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end >= 0:
            return authority[:end + 1] + b"-shadow" + authority[end + 1:]
    host, colon, port = authority.rpartition(b":")
    if colon and port.isdigit() and host:
        return host + b"-shadow:" + port
    return authority + b"-shadow"


class Mirror:
    """A worker's mirrored copies: their bounds, connections and counters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: ServiceTable,
                 stats: WorkerStats, security: MeshSecurity | None, node: str, mark: int,
                 connect_timeout: float, clock: Callable[[], float],
                 max_inflight: int = MAX_INFLIGHT, max_bytes: int = MAX_BYTES,
                 timeout: float = MIRROR_TIMEOUT) -> None:
        self.loop = loop
        self.table = table
        self.stats = stats
        self.security = security
        self.node = node
        self.mark = mark
        self.connect_timeout = connect_timeout
        self.clock = clock
        self.max_inflight = max_inflight
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.inflight = 0
        self.held = 0
        self._idle: dict[Key, list[_H1Copy]] = {}
        self.h2pool: H2Pool[Any] = H2Pool(loop, clock)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._h2_used = False  # the HTTP/2 pool may hold connections: keep sweeping it

    # -- the request path: no I/O, no await, no exception ---------------------------------------

    def send(self, pick: Pick, source: str, method: str, target: str,
             headers: Sequence[tuple[bytes, bytes]], body: bytes | None, protocol: str,
             dst_port: int = 0) -> None:
        """Copy a request to `pick`'s service (its subset, its port). `headers`: the request's
        as forwarded (HTTP/1.1 with Host, or HTTP/2 with its pseudo-headers); `body`: the whole
        body, or None when the exchange did not hold it (the copy is dropped); `protocol`: the
        request's (http/1.1, h2, grpc); `dst_port`: the port the client dialled, which picks
        the mirror's endpoints when neither `pick.port` nor the mirror service's port does."""
        try:
            reason = self._start(pick, source, method, target, headers, body, protocol,
                                 dst_port)
        except Exception:  # a bug here must not fail the real request
            log.exception("mirroring a request to %s failed", pick.service)
            reason = "error"
        if reason:
            self.stats.count("mirror_dropped", source, pick.service, reason)

    def _start(self, pick: Pick, source: str, method: str, target: str,
               headers: Sequence[tuple[bytes, bytes]], body: bytes | None, protocol: str,
               dst_port: int) -> str:
        """Start the copy's task; "" when started, else why it was dropped."""
        if body is None:
            return "too_large"
        size = len(body) + len(target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if self.inflight >= self.max_inflight or self.held + size > self.max_bytes:
            return "overload"
        service = pick.service
        spec = self.table.spec(service)
        # the mirror service's port whose protocol the copy speaks
        port = pick.port or (spec.port if spec is not None and spec.port else dst_port)
        found = self.table.route_backend(service, dst_port or port, pick.subset, pick.port)
        if not isinstance(found, ToService) or not found.attempts:
            return "no_endpoint"
        ep = found.attempts[0]
        sec = self.security
        if sec is not None and sec.enforcing:
            d = sec.authorize_request(sec.identity_of(source), service, ep.addr.port, method,
                                      target.split("?", 1)[0])
            if not d.allowed:
                return "denied"
        speaks = self.table.policy(service).protocol_for(port)
        grpc = protocol == "grpc"
        # gRPC needs HTTP/2: to an auto port (detection takes the preface) it goes as HTTP/2,
        # to an http (HTTP/1.1) port not at all
        h2 = speaks in ("http2", "grpc") or (grpc and speaks == "auto")
        if grpc and not h2:
            return "protocol"
        authority, fields = _split(headers)
        shadow = shadow_authority(authority or service.encode())
        if h2:
            head: Headers = [(b":method", method.encode("latin-1")), (b":scheme", b"http"),
                             (b":path", target.encode("latin-1")), (b":authority", shadow)]
            head += [(n.lower(), v) for n, v in fields]
            if body:
                head.append((b"content-length", b"%d" % len(body)))
            if any(n == b"content-type" and v.startswith(b"application/grpc")
                   for n, v in head):
                head.append((b"te", b"trailers"))
            copy: Any = self._h2_copy(ep, source, service, head, body)
        else:
            parts = [method.encode("latin-1"), b" ", target.encode("latin-1"),
                     b" HTTP/1.1\r\nhost: ", shadow, b"\r\n"]
            for n, v in fields:
                parts += (n, b": ", v, b"\r\n")
            if body or method not in _BODILESS_METHODS:
                parts.append(b"content-length: %d\r\n" % len(body))
            parts += (b"\r\n", body)
            copy = self._h1_copy(ep, source, service, b"".join(parts), method == "HEAD")
        self.inflight += 1
        self.held += size
        task = self.loop.create_task(self._run(copy, source, service, size))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ""

    # -- the copy's task -------------------------------------------------------------------------

    async def _run(self, copy: Any, source: str, service: str, size: int) -> None:
        reason = ""
        try:
            async with asyncio.timeout(self.timeout):
                await copy
        except _Failed as exc:
            reason = exc.reason
        except TimeoutError:
            reason = "timeout"
        except asyncio.CancelledError:
            reason = "error"  # the worker is closing
            raise
        except Exception:
            log.exception("a mirrored request to %s failed", service)
            reason = "error"
        finally:
            self.inflight -= 1
            self.held -= size
            if reason:
                self.stats.count("mirror_dropped", source, service, reason)
            else:
                self.stats.count("mirror_sent", source, service)

    def _key(self, ep: Endpoint, src: str) -> Key:
        """Connections through the mTLS tunnel present their source's certificate: one pool
        each (as HttpFront.pool_key)."""
        sec = self.security
        if ep.node and ep.node != self.node and sec is not None and sec.active:
            return (ep.addr, src)
        return (ep.addr, "")

    async def _dial(self, ep: Endpoint, src: str, service: str, factory: Callable[[], Any],
                    ) -> Any:
        timeout = self.table.policy(service).timeouts.connect or self.connect_timeout
        try:
            _, proto, _ = await dial(self.loop, ep, src, service, self.security, self.node,
                                     self.mark, timeout, factory)
        except DialError as exc:
            raise _Failed("connect") from exc
        return proto

    async def _h1_copy(self, ep: Endpoint, src: str, service: str, data: bytes,
                       head_only: bool) -> None:
        key = self._key(ep, src)
        conn = self._take_idle(key)
        reused = conn is not None
        if conn is None:
            conn = await self._h1_dial(ep, src, service, key)
        try:
            reuse = await conn.exchange(data, head_only)
        except _Failed as exc:
            conn.close()
            if not (reused and exc.reason == "reset" and not conn.answered):
                raise
            # a kept-alive connection the endpoint closed meanwhile: once more, on a new one
            conn = await self._h1_dial(ep, src, service, key)
            try:
                reuse = await conn.exchange(data, head_only)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        if reuse:
            self._give_back(key, conn)
        else:
            conn.close()

    async def _h1_dial(self, ep: Endpoint, src: str, service: str, key: Key) -> _H1Copy:
        conn: _H1Copy = await self._dial(ep, src, service,
                                         lambda: _H1Copy(self.loop, key))
        conn.idle_limit = self.table.policy(service).http.timeouts.idle
        return conn

    async def _h2_copy(self, ep: Endpoint, src: str, service: str, head: Headers,
                       body: bytes) -> None:
        key = self._key(ep, src)
        policy = self.table.policy(service)
        limit = policy.http.limits.max_header_bytes

        async def connect() -> H2Upstream:
            conn: H2Upstream = await self._dial(
                ep, src, service, lambda: H2Upstream(self.h2pool, key, self.clock, limit))
            conn.idle_limit = policy.http.timeouts.idle
            return conn

        try:
            conn = self.h2pool.ready(key) or await self.h2pool.get(key, connect, 0, 0)
        except (DialError, PoolFull) as exc:
            raise _Failed("connect") from exc
        self._h2_used = True
        self._schedule_sweep()
        stream = _H2Copy(self.loop, conn, body)
        try:
            stream.open(head)
        except ProtocolError as exc:
            raise _Failed("reset") from exc
        try:
            await stream.done
        finally:
            stream.finish()

    # -- idle HTTP/1.1 connections --------------------------------------------------------------

    def _take_idle(self, key: Key) -> _H1Copy | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _give_back(self, key: Key, conn: _H1Copy) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = self.clock()
        idle.append(conn)
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.clock()
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and now - c.idle_since < c.idle_limit]
            for c in idle:
                if c not in keep:
                    c.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self.h2pool.sweep()
        if self._idle or self.inflight or self._h2_used:
            self._schedule_sweep()

    def close(self) -> None:
        """The worker stops: copies in flight are abandoned, connections closed."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for idle in self._idle.values():
            for c in idle:
                c.close()
        self._idle.clear()
        self.h2pool.close_all()


def _split(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, Headers]:
    """The request's authority (Host or :authority) and the fields a copy carries."""
    authority = b""
    fields: Headers = []
    for h in headers:
        n = h[0]
        low = n.lower()
        if low == b"host" or low == b":authority":
            if not authority:
                authority = h[1]
            continue
        if low in _DROP or low.startswith(b":"):
            continue
        fields.append((n, h[1]))
    return authority, fields


class _H1Copy(asyncio.Protocol):
    """One HTTP/1.1 connection to a mirror endpoint: one copy at a time, its answer parsed
    only to know where it ends (and whether the connection can take the next copy)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.idle_limit = 300.0
        self.parser: httptools.HttpResponseParser | None = None
        self.done: asyncio.Future[bool] | None = None
        self.head_only = False
        self.answered = False  # bytes of an answer arrived on the current exchange
        self.headed = False  # the answer's head is in

    async def exchange(self, data: bytes, head_only: bool) -> bool:
        """Send one request, read its answer; whether the connection is reusable."""
        if self.transport is None or self.closed:
            raise _Failed("reset")
        self.done = self.loop.create_future()
        self.head_only = head_only
        self.answered = self.headed = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(data)
        try:
            return await self.done
        finally:
            self.done = None
            self.parser = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            self.close()  # bytes nobody asked for
            return
        self.answered = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            self._end(_Failed("reset"))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # informational: the answer follows
        self.headed = True
        if self.head_only or status in (101, 204, 304):
            self._end(False)  # no body to wait for: not reused (where it ends is unsure)

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser is not None and 100 <= parser.get_status_code() < 200:
            return
        self._end(parser is not None and parser.should_keep_alive())

    def _end(self, result: bool | Exception) -> None:
        done = self.done
        if done is None or done.done():
            return
        if isinstance(result, Exception):
            done.set_exception(result)
        else:
            done.set_result(result)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # an answer that had its head (a close-delimited body ends here) counts as answered
        self._end(False if self.headed else _Failed("reset"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class _H2Copy:
    """One copy on a stream of an HTTP/2 connection to a mirror endpoint (an
    h2conn.StreamOwner): the body sent as the windows allow, the answer acknowledged and
    dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: H2Upstream, body: bytes) -> None:
        self.conn = conn
        self.out: deque[bytes] = deque([body] if body else [])
        self.sid = 0
        self.sent_end = False  # END_STREAM sent
        self.got_end = False  # the answer ended
        self.open_ = False  # the stream is ours to release or reset
        self.done: asyncio.Future[None] = loop.create_future()

    def open(self, head: Headers) -> None:
        conn = self.conn
        self.sid = conn.open(self, head, not self.out)
        self.open_ = True
        self.sent_end = not self.out
        self._pump()

    def _pump(self) -> None:
        conn = self.conn
        if self.sent_end or self.got_end or conn.closed or conn.paused:
            return
        pump(conn.h2, self.sid, self.out)
        if not self.out:
            conn.h2.end_stream(self.sid)
            self.sent_end = True
        conn.pool.writes.mark(conn)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.got_end and not self.done.done():
            self.done.set_result(None)

    def _fail(self, reason: str) -> None:
        self.open_ = False  # the connection forgot the stream already
        if not self.done.done():
            self.done.set_exception(_Failed(reason))

    def finish(self) -> None:
        """The copy ended (answered, failed or timed out): its stream is given up."""
        if not self.open_:
            return
        self.open_ = False
        if self.sent_end and self.got_end:
            self.conn.release(self.sid)
        else:
            self.conn.reset(self.sid, 8)  # CANCEL

    # -- StreamOwner ---------------------------------------------------------------------

    def up_response(self, headers: Headers, ended: bool) -> None:
        if ended:
            self.up_end()

    def up_data(self, data: bytes, flow: int) -> None:
        self.conn.ack(self.sid, flow)

    def up_trailers(self, headers: Headers) -> None:
        pass  # StreamEnded follows

    def up_end(self) -> None:
        # answered, maybe before the whole body went: nothing more is wanted of it (finish
        # resets a stream still open our way)
        self.got_end = True
        self._maybe_done()

    def up_reset(self, code: int) -> None:
        self._fail("reset")

    def up_refused(self) -> None:
        self._fail("reset")

    def up_lost(self, garbage: bool, detail: str) -> None:
        self._fail("reset")

    def up_writable(self) -> None:
        self._pump()
