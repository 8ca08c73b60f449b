"""The inbound side of mTLS between hosts: the listener on host_address:15008 (handed down by
the agent, WorkerConfig.inbound_fd) and what happens to each connection before its relay.

Per accepted connection, driven by the worker's poller with one loop timer (no Task):
1. TLS 1.3 handshake as this host's node identity, a client certificate required (OpenSSL
   verifies the chain to the bundle on a full handshake);
2. `Trust.check` on the client's certificate, full or resumed session alike (trust domain,
   host not revoked, valid at security.clock.now());
3. the preamble (tunnel_wire), read exactly (what follows it stays unread for the relay);
4. the target must be an endpoint of this host in the worker's table, of the service named
   (never an open relay: a VIP, another host's endpoint or any other address is refused);
5. authorization: Security.authz.decide(client identity, service, port);
6. connect to the local endpoint (SO_MARK, the connector's attempt loop), answer ok, relay
   (a tunnel of HTTP requests idles out by the service's HTTP timeouts: `requests_idle`).
Steps 1-3 together must finish within handshake_timeout: a peer that stalls mid-handshake or
before its preamble is cut. Every refusal is counted by cause, logged once per cause, and
access-logged with the identities known by then; a refused preamble gets its answer and a
FIN. A flood of handshakes is bounded (`MAX_HANDSHAKES` per worker: beyond, closed at once).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, cast

from meshnode.errors import MeshnodeError
from meshnode.model import HostPort
from meshnode.policy.identity import service_id
from meshnode.proxy.accesslog import AccessLog
from meshnode.proxy.listener import inherited_listener
from meshnode.proxy.poller import READ, WRITE, Poller
from meshnode.proxy.relay import BufferPool, Pipe, Relay, RelayRegistry, reset_socket
from meshnode.proxy.telemetry import ConnInfo
from meshnode.proxy.tls import Peer, PeerError, handshake_cause, skip_ticket
from meshnode.proxy.tlspipe import INBOUND
from meshnode.proxy.tunnel import MeshSecurity
from meshnode.route.table import ServiceTable, ToEndpoint
from meshnode.tunnel_wire import (
    HEADER,
    Answer,
    FrameError,
    Preamble,
    decode_preamble,
    encode_frame,
    frame_length,
)

if TYPE_CHECKING:
    from meshnode.policy.resources import ServicePolicy
    from meshnode.proxy.connect import Connector

__all__ = ["MAX_HANDSHAKES", "Inbound", "InboundRelay", "open_inbound", "requests_idle"]

log = logging.getLogger("meshnode.proxy")

ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.1  # seconds without accepting after accept() failed (out of descriptors)
MAX_HANDSHAKES = 1024  # per worker, in flight at once
# seconds a tunnel of requests outlives its client's idle timeout: that proxy sweeps once a
# second (proxy/http/front.py), and its close has to arrive
REQUESTS_IDLE_SLACK = 5.0
_OK = encode_frame(Answer(True))


class InboundRelay(Relay):
    """A relay whose client is an accepted tunnel: answers ok when its upstream (the local
    endpoint) connects, and refuses with an answer and a FIN when none does."""

    __slots__ = ()

    def start(self, upstream: _socket.socket,
              pipes: tuple[type[Pipe], type[Pipe]] | None = None) -> None:
        try:
            self.client.send(_OK)  # a few bytes into the socket's first answer: taken whole
        except (OSError, ValueError):
            self.upstream = upstream
            self.connecting = None
            self.reset()
            return
        super().start(upstream, pipes or INBOUND)

    def reset(self) -> None:
        if not self.started and not self.finished:
            # No local endpoint answered: say so, then end cleanly (a RST could overtake it).
            answer(cast(ssl.SSLSocket, self.client), "unreachable")
            if self.outcome == "ok":
                self.outcome = "unreachable"
            self._finish(False)
            return
        super().reset()


def answer(sock: ssl.SSLSocket, reason: str) -> None:
    """Send a refusal; best effort (the peer may be gone)."""
    with contextlib.suppress(OSError, ValueError):
        sock.send(encode_frame(Answer(False, reason)))


class _Refused:
    """What the access log line needs of a relay, for a connection refused before one."""

    __slots__ = ("bytes_down", "bytes_up", "outcome")

    def __init__(self, outcome: str) -> None:
        self.bytes_up = self.bytes_down = 0
        self.outcome = outcome


class Inbound:
    """The inbound listener of one worker."""

    def __init__(self, lsock: socket.socket, loop: asyncio.AbstractEventLoop, poller: Poller,
                 security: MeshSecurity, table: ServiceTable, connector: Connector,
                 pool: BufferPool, registry: RelayRegistry, clock: Callable[[], float],
                 access: AccessLog | None, worker_id: int) -> None:
        self.lsock = lsock
        self.loop = loop
        self.poller = poller
        self.security = security
        self.table = table
        self.connector = connector
        self.pool = pool
        self.registry = registry
        self.clock = clock
        self.access = access
        self.worker_id = worker_id
        self.handshakes: set[_Handshake] = set()
        self.draining = False
        # Targets must be addresses of this host (the listener's, or loopback): the registry
        # says which endpoints are ours, but whoever can write it must not turn this
        # listener into a relay to any address the host can reach.
        self.own_ip = IPv4Address(lsock.getsockname()[0])
        poller.register(lsock.fileno(), READ, self._on_accept)

    def close(self) -> None:
        """Stop accepting and cut the handshakes in flight (relays drain with the worker's)."""
        self.draining = True
        self.poller.unregister(self.lsock.fileno())
        self.lsock.close()
        for hs in list(self.handshakes):
            hs.abort("draining")

    def _on_accept(self, events: int) -> None:
        lsock = self.lsock
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the backlog waits a moment
                self.security.once("accept", "inbound accept failed: %s", exc.strerror)
                self.poller.unregister(lsock.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = self.security.tls.server
            if server is None or len(self.handshakes) >= MAX_HANDSHAKES:
                reason = "no_identity" if server is None else "overload"
                self.security.refused("server", reason, "inbound tunnel refused: %s", reason)
                self._log(ConnInfo(self.clock(), peer), f"tunnel_{reason}")
                reset_socket(sock)
                continue
            _Handshake(self, sock, peer, server)

    def _resume(self) -> None:
        if not self.draining:
            self.poller.register(self.lsock.fileno(), READ, self._on_accept)

    def _log(self, info: ConnInfo, outcome: str) -> None:
        if self.access is not None and self.access.wants():
            self.access.write(info.log_line(_Refused(outcome), self.worker_id,  # type: ignore[arg-type]
                                            self.clock()))

    def serve(self, ssock: ssl.SSLSocket, info: ConnInfo, peer: Peer,
              preamble: Preamble) -> None:
        """Steps 4-6 for a connection whose handshake and preamble are done."""
        sec = self.security
        try:
            target = HostPort.parse(preamble.target)
        except (MeshnodeError, ValueError):
            self._refuse(ssock, info, "bad_preamble", preamble.target)
            return
        info.orig_dst = target  # type: ignore[assignment]
        route = self.table.route(target)
        if not isinstance(route, ToEndpoint) or route.attempts[0].node != sec.node or not (
                target.ip == self.own_ip or target.ip.is_loopback):
            self._refuse(ssock, info, "not_local", preamble.target)
            return
        service = route.service
        info.service = service
        if service != preamble.service:
            self._refuse(ssock, info, "wrong_service", f"{preamble.target} is {service}, "
                         f"not {preamble.service}")
            return
        dst_identity = service_id(sec.tls.trust.trust_domain, service)
        info.dst_identity = dst_identity
        decision = sec.authorize(peer.identity, service, target.port,
                                 opaque=not preamble.requests)
        if not decision.allowed:
            self._refuse(ssock, info, "denied", decision.reason)
            return
        sec.stats.count("tunnels", "in", peer.node)
        stats = sec.stats.inbound_pair(peer.identity, dst_identity)
        stats.connections += 1
        relay = InboundRelay(self.poller, self.pool, self.registry, ssock, stats, info)
        policy = self.table.policy(service)
        relay.idle_limit = requests_idle(policy) if preamble.requests else policy.timeouts.idle
        self.connector.connect(relay, route.attempts, stats, timeout=policy.timeouts.connect)

    def _refuse(self, ssock: ssl.SSLSocket, info: ConnInfo, reason: str, detail: str) -> None:
        self.security.refused("server", reason, "inbound tunnel from %s refused: %s (%s)",
                              info.src_identity, reason, detail)
        answer(ssock, reason)
        ssock.close()  # FIN after the answer
        self._log(info, f"tunnel_{reason}")


class _Handshake:
    """Steps 1-3 for one accepted connection."""

    __slots__ = ("buf", "fd", "inbound", "info", "peer", "quiet", "ssock", "step", "timer",
                 "wants")

    def __init__(self, inbound: Inbound, sock: socket.socket, addr: tuple[str, int],
                 server: ssl.SSLContext) -> None:
        self.inbound = inbound
        self.info = ConnInfo(inbound.clock(), addr)
        self.peer: Peer | None = None
        self.buf = bytearray()
        self.quiet = False  # whether a resumed handshake was told to send no ticket
        try:
            self.ssock = server.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False,
                                            suppress_ragged_eofs=False)  # tlspipe.py: resets
        except (OSError, ValueError) as exc:
            inbound.security.handshake_failed("server", handshake_cause(exc), exc)
            reset_socket(sock)
            return
        self.fd = self.ssock.fileno()
        self.wants = READ
        self.step: Callable[[], None] = self._handshake
        inbound.handshakes.add(self)
        inbound.poller.register(self.fd, READ, self._ready)
        self.timer = inbound.loop.call_later(inbound.security.handshake_timeout, self._expired)
        self._handshake()  # the ClientHello is usually here already

    def _ready(self, events: int) -> None:
        try:
            self.step()
        except Exception as exc:  # a bug must cost this connection, not the worker
            log.exception("inbound handshake")
            if self in self.inbound.handshakes:
                self._fail("error", exc)

    def _watch(self, events: int) -> None:
        if events != self.wants:
            self.inbound.poller.modify(self.fd, events)
            self.wants = events

    def _done(self) -> None:
        """Leave the poller and the timer: the connection is refused or goes to a relay."""
        self.timer.cancel()
        self.inbound.poller.unregister(self.fd)
        self.inbound.handshakes.discard(self)

    def _handshake(self) -> None:
        ssock = self.ssock
        try:
            ssock.do_handshake()
        except ssl.SSLWantReadError:
            if not self.quiet and ssock.session_reused:
                # resumed: its client keeps the ticket it offered, a new one is waste
                self.quiet = True
                skip_ticket(ssock)
            self._watch(READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(WRITE)
            return
        except (OSError, ValueError) as exc:
            self._fail(handshake_cause(exc), exc)
            return
        sec = self.inbound.security
        try:
            peer = self.peer = sec.tls.trust.check(ssock.getpeercert())
        except PeerError as exc:
            self._fail(exc.cause, exc)
            return
        self.info.src_identity = peer.identity
        self.info.src = peer.name if peer.kind == "svc" else f"node/{peer.name}"
        sec.stats.count("tls_handshakes", "server", "resumed" if ssock.session_reused else "full")
        self.step = self._preamble
        self._watch(READ)
        self._preamble()

    def _preamble(self) -> None:
        ssock, buf = self.ssock, self.buf
        while True:
            try:
                need = HEADER - len(buf) if len(buf) < HEADER else \
                    HEADER + frame_length(buf) - len(buf)
            except FrameError as exc:
                self._refuse("bad_preamble", exc)
                return
            if need <= 0:
                break
            try:
                data = ssock.recv(need)  # exactly the frame: app bytes after it stay unread
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (OSError, ValueError) as exc:
                self._fail(handshake_cause(exc), exc, preamble=True)
                return
            if not data:
                self._fail("eof", "closed before its preamble", preamble=True)
                return
            buf += data
        try:
            preamble = decode_preamble(bytes(buf[HEADER:]))
        except FrameError as exc:
            self._refuse("bad_preamble", exc)
            return
        self._done()
        peer = self.peer
        assert peer is not None
        self.inbound.serve(self.ssock, self.info, peer, preamble)

    def _refuse(self, reason: str, detail: object) -> None:
        self._done()
        self.inbound._refuse(self.ssock, self.info, reason, str(detail))

    def _fail(self, cause: str, detail: object, preamble: bool = False) -> None:
        """The handshake (or the wait for the preamble) failed: count, log once, reset."""
        self._done()
        sec = self.inbound.security
        if preamble:
            sec.refused("server", f"preamble_{cause}", "inbound tunnel from %s: no preamble "
                        "(%s)", self.info.src_identity, detail)
        else:
            sec.handshake_failed("server", cause, detail)
        reset_socket(self.ssock)
        self.inbound._log(self.info, f"tls_{cause}")

    def _expired(self) -> None:
        cause = "timeout"
        self._fail(cause, f"no {'preamble' if self.peer else 'handshake'} within "
                   f"{self.inbound.security.handshake_timeout}s", preamble=self.peer is not None)

    def abort(self, reason: str) -> None:
        self._done()
        reset_socket(self.ssock)


def requests_idle(policy: ServicePolicy) -> float:
    """The idle timeout of a tunnel of HTTP requests. It is its client's pooled connection:
    that proxy closes it after http.timeouts.idle without a request, and waits for a quiet
    response up to the request timeout. The service's TCP idle timeout is not for it: cutting
    first would fail a slow response, or a request sent as the close crosses it."""
    http = policy.http
    timeouts = [http.timeouts, *(r.timeouts for r in http.routes if r.timeouts is not None)]
    return max([http.timeouts.idle, *(t.request for t in timeouts if t.request)]) \
        + REQUESTS_IDLE_SLACK


def open_inbound(fd: int, loop: asyncio.AbstractEventLoop, poller: Poller,
                 security: MeshSecurity, table: ServiceTable, connector: Connector,
                 pool: BufferPool, registry: RelayRegistry, clock: Callable[[], float],
                 access: AccessLog | None, worker_id: int) -> Inbound:
    """The inbound listener on the descriptor the agent handed down (ListenError if unusable)."""
    lsock = inherited_listener(fd)
    return Inbound(lsock, loop, poller, security, table, connector, pool, registry, clock,
                   access, worker_id)
