"""The worker's HTTP side: what the HTTP/1.1 and HTTP/2 handlers share, and the hand-over of
an accepted connection to the handler its port's protocol names.

`HttpFront` (one per worker) owns the per-service HTTP state (exchange.HttpServices), the
upstream keep-alive pools, the tracer, the request finisher, and the client connections the
handlers serve (for the idle sweep and the drain). The worker calls `accept` for a connection
to a service port whose protocol is not tcp: http goes to HTTP/1.1 (h1.py), http2 and grpc to
HTTP/2 (h2.py), auto to detection first (detect.py), which may hand it back to the worker's L4
relay.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshnode.model import Endpoint, OrigDstAddr
from meshnode.policy.authz import Decision
from meshnode.policy.resources import normalize_path
from meshnode.proxy.accesslog import AccessLog
from meshnode.proxy.http.dial import dial
from meshnode.proxy.http.exchange import Finisher, HttpServices, RequestRecord, request_record
from meshnode.proxy.http.h1 import H1Downstream
from meshnode.proxy.http.h1_upstream import H1Upstream
from meshnode.proxy.http.h2pool import H2Pool
from meshnode.proxy.http.mirror import Mirror
from meshnode.proxy.http.pool import UpstreamPool
from meshnode.proxy.http.trace import Tracer
from meshnode.proxy.stats import WorkerStats
from meshnode.proxy.tunnel import MeshSecurity
from meshnode.route.table import ServiceTable
from meshnode.route.traffic import TrafficTable
from meshnode.wire import ConnEvent

if TYPE_CHECKING:
    from meshnode.proxy.http.h2conn import H2Upstream
    from meshnode.proxy.telemetry import ConnInfo

__all__ = ["HttpFront"]

log = logging.getLogger("meshnode.proxy.http")

SWEEP_INTERVAL = 1.0  # seconds between idle sweeps of client and pooled connections


class HttpFront:
    def __init__(self, loop: asyncio.AbstractEventLoop, table: ServiceTable, stats: WorkerStats,
                 security: MeshSecurity | None, access: AccessLog | None, worker_id: int,
                 node: str, mark: int, connect_timeout: float,
                 clock: Callable[[], float]) -> None:
        self.loop = loop
        self.table = table
        self.stats = stats
        self.security = security
        self.node = node
        self.mark = mark
        self.connect_timeout = connect_timeout
        self.clock = clock
        self.services = HttpServices(clock)
        self.finisher = Finisher(stats, access, worker_id)
        self.tracer = Tracer()
        self.traffic = TrafficTable()  # the Route resources (the worker's, kept in step)
        self.pool: UpstreamPool[Any] = UpstreamPool(clock)
        self.h2pool: H2Pool[Any] = H2Pool(loop, clock)  # HTTP/2 endpoint connections (h2.py)
        # copies of requests a Route rule mirrors (mirror.py): connections and bounds of its own
        self.mirror = Mirror(loop, table, stats, security, node, mark, connect_timeout, clock)
        self.clients: set[Any] = set()  # downstream connections open now
        self.tap: frozenset[str] = frozenset()
        self._send_event: Callable[[ConnEvent], None] | None = None
        self._empty: asyncio.Event | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.draining = False
        self.worker_id = worker_id

    # -- connections ---------------------------------------------------------------------------

    def accept(self, client: _socket.socket, info: ConnInfo, service: str, dst: OrigDstAddr,
               protocol: str) -> None:
        """Serve an accepted client connection with the handler `protocol` names (not auto:
        detect.py resolves that first)."""
        if protocol in ("http2", "grpc", "h2"):
            from meshnode.proxy.http.h2 import H2Downstream

            factory: Callable[[], asyncio.Protocol] = lambda: H2Downstream(  # noqa: E731
                self, info, service, dst, "grpc" if protocol == "grpc" else "h2")
        else:
            factory = lambda: H1Downstream(self, info, service, dst)  # noqa: E731
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, client.detach())
        task = self.loop.create_task(self._adopt(factory, sock))
        task.add_done_callback(_log_failure)
        self.ensure_sweeper()

    def ensure_sweeper(self) -> None:
        """The idle sweep runs once connections are served (the gateway's too)."""
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    async def _adopt(self, factory: Callable[[], asyncio.Protocol], sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(factory, sock)
        except OSError:
            sock.close()  # the client is gone already

    def opened(self, conn: Any) -> None:
        self.clients.add(conn)
        pair = self.stats.pair(conn.info.src, conn.service)
        pair.active += 1

    def closed(self, conn: Any) -> None:
        if conn in self.clients:
            self.clients.discard(conn)
            pair = self.stats.pair(conn.info.src, conn.service)
            pair.active -= 1
            pair.closed += 1
            pair.bytes_up += conn.bytes_in
            pair.bytes_down += conn.bytes_out
            pair.duration.observe(self.clock() - conn.info.t0)
        if not self.clients and self._empty is not None:
            self._empty.set()

    # -- per request --------------------------------------------------------------------------

    def pool_key(self, ep: Endpoint, src: str) -> tuple[Any, str]:
        """Connections to a remote endpoint carry their source's identity: one pool each."""
        if ep.node and ep.node != self.node and self.security is not None \
                and self.security.active:
            return (ep.addr, src)
        return (ep.addr, "")

    async def dial_h1(self, ep: Endpoint, src: str, service: str,
                      key: tuple[Any, str]) -> H1Upstream:
        policy = self.table.policy(service)
        timeout = policy.timeouts.connect or self.connect_timeout
        _, proto, identity = await dial(self.loop, ep, src, service, self.security, self.node,
                                        self.mark, timeout, lambda: H1Upstream(self, key))
        proto.identity = identity
        proto.idle_limit = policy.http.timeouts.idle
        return proto

    async def dial_h2(self, ep: Endpoint, src: str, service: str,
                      key: tuple[Any, str]) -> H2Upstream:
        from meshnode.proxy.http.h2conn import H2Upstream

        policy = self.table.policy(service)
        timeout = policy.timeouts.connect or self.connect_timeout
        limit = policy.http.limits.max_header_bytes
        _, proto, identity = await dial(self.loop, ep, src, service, self.security, self.node,
                                        self.mark, timeout,
                                        lambda: H2Upstream(self.h2pool, key, self.clock, limit))
        proto.identity = identity
        proto.idle_limit = policy.http.timeouts.idle
        return proto

    def authorize(self, rec: RequestRecord, ep: Endpoint) -> Decision | str | None:
        """None when the request may go to `ep`; else the denial (authorization at L7: the
        source's identity, the destination, the endpoint's port, method and path), or why
        the request cannot be decided (a string: answered 400)."""
        sec = self.security
        if sec is None or not sec.enforcing:
            return None
        authz = sec.authz
        path = rec.path
        if authz.http_all or rec.dst in authz.http_targets:
            # Rules match the normalized path; forwarding another spelling of it would let a
            # backend that reads it differently be reached past a rule ("/a/../admin").
            bare = path.split("?", 1)[0]
            if normalize_path(bare) != bare:
                return (f"the path {bare[:200]!r} is not in normal form (dot segments, "
                        "escapes or repeated slashes) and authorization rules match paths: "
                        "send it normalized")
        src = sec.identity_of(rec.src)
        d = sec.authorize_request(src, rec.dst, ep.addr.port, rec.method, path)
        if src:
            rec.src_identity, rec.dst_identity = src, sec.dst_identity(rec.dst)
        return None if d.allowed else d

    # -- telemetry ----------------------------------------------------------------------------

    def set_tap(self, services: frozenset[str], send: Callable[[ConnEvent], None]) -> None:
        self.tap = services
        self._send_event = send
        self.finisher.tap = self._tap if services else None

    def _tap(self, rec: RequestRecord) -> None:
        tap = self.tap
        if "*" in tap or rec.src in tap or rec.dst in tap:
            event = request_record(rec, self.worker_id)
            event["event"] = "request"
            if self._send_event is not None:
                self._send_event(ConnEvent(event))

    # -- life -----------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.clock()
            for conn in list(self.clients):
                if not conn.idle:
                    continue
                limit = self.table.policy(conn.service).http.timeouts.idle
                if self.draining or now - conn.last_active >= limit:
                    conn.close()
            self.pool.sweep(lambda c: getattr(c, "idle_limit", 300.0))
            self.h2pool.sweep()

    def drain(self) -> None:
        """Stop taking requests politely: idle connections close now, busy ones after their
        response (HTTP/1.1 `connection: close`; HTTP/2 GOAWAY)."""
        self.draining = True
        for conn in list(self.clients):
            conn.closing = True
            if conn.idle:
                conn.close()
            elif hasattr(conn, "goaway"):
                conn.goaway()

    async def wait_empty(self) -> None:
        if not self.clients:
            return
        self._empty = asyncio.Event()
        await self._empty.wait()

    def close(self) -> None:
        for conn in list(self.clients):
            conn.abort()
        self.pool.close_all()
        self.h2pool.close_all()
        self.mirror.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.tracer.close(0.5)

    def __len__(self) -> int:
        return len(self.clients)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("HTTP connection setup failed: %s", exc, exc_info=exc)
