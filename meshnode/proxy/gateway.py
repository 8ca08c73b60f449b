"""The worker's ingress gateway listeners: accept clients from outside the mesh, terminate
TLS (the certificate picked by SNI, HTTP/2 or HTTP/1.1 by ALPN), and serve each connection with
the mesh's HTTP handlers (h1.py, h2.py) marked as a gateway's: their requests are routed by
host (the Routes' `hosts`), and call into the mesh as the gateway's Service.

The agent binds the listening sockets and says what each serves (wire.GatewayConfig, with the
certificates as PEM). A worker finds a listener's descriptor among those it holds for the agent
(passed at start), or takes a copy over the agent's GATEWAY_FDS_SOCKET (a listener opened after
it started); it reports them in Hello.held like the others, so they outlive the agent. Each
listener is served by an asyncio server on a duplicate of the held descriptor: a new
configuration (other certificates) starts a new server on a new duplicate and closes the old
one, which ends no connection and loses nothing queued (the kernel queue is the one socket's).

TLS contexts are made once per configuration, never per connection: per certificate two
server contexts (loaded from memory through a memfd: the ssl module loads only from paths),
one offering ALPN h2 and http/1.1, one http/1.1 alone; the first certificate's is the default,
whose sni_callback switches a handshake to the context of the name the client asked for (exact
names first, then "*.rest" wildcards of one label). HTTP/2 is offered only to a name whose
Route sends every request to services that speak it (http2, grpc): the proxy does not
translate between HTTP/1.1 and HTTP/2 (a client's protocol is the endpoint's), so a browser
asking shop.example.com, whose backend speaks HTTP/1.1, is answered http/1.1 by ALPN. A
handshake without SNI gets the default certificate and HTTP/1.1.

uvloop's TLS transport (create_server(ssl=...)) is a plain asyncio.Transport to the handlers:
they never read the socket themselves (no MSG_PEEK, no fileno); the only raw use, h1's reset on
abort (SO_LINGER through get_extra_info("socket")), reaches the TCP socket under the TLS layer.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from meshnode.listen import BACKLOG
from meshnode.model import OrigDstAddr
from meshnode.policy.gateway import host_matches
from meshnode.proxy.http.h1 import H1Downstream
from meshnode.proxy.telemetry import ConnInfo
from meshnode.wire import GatewayCert, GatewayConfig, GatewayListenerConfig

if TYPE_CHECKING:
    from meshnode.proxy.http.front import HttpFront

__all__ = ["ALPN", "GatewayServers", "fetch_listener", "sni_contexts", "speaks_h2"]

log = logging.getLogger("meshnode.proxy.gateway")

ALPN = ["h2", "http/1.1"]
HELD_PREFIX = "gateway:"  # as the agent names them (agent/gateway.py)


def _server_context(cert: GatewayCert, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(alpn)
    # the ssl module loads a chain and key only from a path: an anonymous in-memory file
    fd = os.memfd_create("meshnode-gateway-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, (cert.chain + "\n" + cert.key).encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=lambda: b"")
    finally:
        os.close(fd)
    return ctx


_Pair = tuple[ssl.SSLContext, ssl.SSLContext]  # (HTTP/1.1 only, h2 and HTTP/1.1)


def sni_contexts(certs: tuple[GatewayCert, ...],
                 h2: Callable[[str], bool] = lambda host: True) -> ssl.SSLContext:
    """The listener's default context (the first certificate's, HTTP/1.1), which moves a
    handshake to the context of the certificate serving the name the client's SNI asks for,
    offering h2 when `h2(name)` says the name's backends speak it."""
    made = [((_server_context(c, ALPN[1:]), _server_context(c, ALPN)), c.hosts) for c in certs]
    default = made[0][0][0]
    exact: dict[str, _Pair] = {}
    wild: list[tuple[str, _Pair]] = []
    for pair, hosts in made:
        for h in hosts:
            if h.startswith("*."):
                wild.append((h, pair))
            else:
                exact[h] = pair

    def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if not name:
            return None  # no SNI: the default certificate, HTTP/1.1
        name = name.lower().rstrip(".")
        pair = exact.get(name)
        if pair is None:
            pair = next((p for pattern, p in wild if host_matches(pattern, name)), made[0][0])
        ctx = pair[1] if h2(name) else pair[0]
        if ctx is not default:
            sslobj.context = ctx
        return None

    default.sni_callback = pick
    return default


_H2_PROTOCOLS = frozenset({"http2", "grpc"})


def speaks_h2(front: HttpFront, host: str) -> bool:
    """Whether every service the Route of gateway host `host` sends to speaks HTTP/2 (on its
    `port`, else by its protocol); False without a Route (the 404 is HTTP/1.1's too)."""
    route = front.traffic.host(host)
    if route is None:
        return False
    names = {b.service for r in route.rules for b in r.rule.backends}
    if route.service is not None:  # rules without backends, and what no rule takes
        names.add(route.service)
    if not names:
        return False
    for name in names:
        policy = front.table.policy(name)
        protocol = policy.protocol_for(policy.port) if policy.port else policy.protocol
        if protocol not in _H2_PROTOCOLS:
            return False
    return True


def fetch_listener(path: str, name: str, timeout: float = 2.0) -> int | None:
    """A copy of the agent's held descriptor `name`, over its descriptors socket (blocking:
    run it off the loop); None when the agent has none by that name."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(name.encode() + b"\n")
        _, fds, _, _ = socket.recv_fds(s, 1, 1)
    return fds[0] if fds else None


class _TlsStart(asyncio.Protocol):
    """A gateway connection until its TLS handshake is done: then the handler ALPN chose
    takes the transport over (set_protocol) and this object is gone."""

    __slots__ = ("listener",)

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        handler = self.listener.handler(transport, "h2" if alpn == "h2" else "http/1.1")
        transport.set_protocol(handler)
        handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover: replaced first
        raise RuntimeError("gateway connection read before its handler took over")

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _Listener:
    """One listener as this worker serves it: the held descriptor, its server."""

    def __init__(self, servers: GatewayServers, config: GatewayListenerConfig,
                 fd: int) -> None:
        self.servers = servers
        self.config = config
        self.fd = fd
        self.dst = OrigDstAddr(IPv4Address(config.address), config.port)
        self.server: asyncio.AbstractServer | None = None

    def handler(self, transport: asyncio.BaseTransport, protocol: str) -> asyncio.Protocol:
        """The HTTP handler of an accepted client connection (after TLS, when https)."""
        front, cfg = self.servers.front, self.config
        info = ConnInfo(front.clock(), transport.get_extra_info("peername"))
        info.src = info.service = cfg.service  # the gateway calls into the mesh as it
        info.orig_dst = self.dst
        down: Any
        if protocol == "h2":
            from meshnode.proxy.http.h2 import H2Downstream

            down = H2Downstream(front, info, cfg.service, self.dst, "h2")
        else:
            down = H1Downstream(front, info, cfg.service, self.dst)
        down.gateway = cfg.gateway
        return down  # type: ignore[no-any-return]

    def _plain(self) -> asyncio.Protocol:
        return _PlainStart(self)

    async def serve(self) -> None:
        """Start accepting with this configuration (on a new duplicate of the descriptor)."""
        cfg, loop = self.config, self.servers.loop
        front = self.servers.front
        ctx = (sni_contexts(cfg.certificates, lambda host: speaks_h2(front, host))
               if cfg.protocol == "https" else None)
        sock = socket.socket(fileno=os.dup(self.fd))
        sock.setblocking(False)
        factory: Callable[[], asyncio.Protocol] = (
            (lambda: _TlsStart(self)) if ctx is not None else self._plain)
        kwargs: dict[str, Any] = {}
        if ctx is not None:
            kwargs["ssl_handshake_timeout"] = self.servers.handshake_timeout
        try:
            self.server = await loop.create_server(factory, sock=sock, ssl=ctx,
                                                   backlog=BACKLOG, **kwargs)
        except BaseException:
            sock.close()
            raise
        self.servers.front.ensure_sweeper()

    def stop(self) -> None:
        """Stop accepting here (the descriptor stays, the connections go on)."""
        if self.server is not None:
            self.server.close()
            self.server = None


class _PlainStart(asyncio.Protocol):
    """A plaintext (http) gateway listener's connection: HTTP/1.1 at once."""

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self.listener.handler(transport, "http/1.1")
        transport.set_protocol(handler)
        handler.connection_made(transport)


class GatewayServers:
    """Every gateway listener of this worker, kept as the agent's last GatewayConfig says."""

    def __init__(self, loop: asyncio.AbstractEventLoop, front: HttpFront, held: dict[str, int],
                 fds_socket: str, handshake_timeout: float) -> None:
        self.loop = loop
        self.front = front
        self.held = held  # the worker's held descriptors (reported in Hello.held)
        self.fds_socket = fds_socket
        self.handshake_timeout = handshake_timeout
        self.listeners: dict[str, _Listener] = {}
        self._latest: GatewayConfig | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def configure(self, msg: GatewayConfig) -> None:
        """Take a new configuration; applied in order, the latest winning."""
        self._latest = msg
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._apply_latest())

    async def _apply_latest(self) -> None:
        while self._latest is not None and not self.closed:
            msg, self._latest = self._latest, None
            try:
                await self._apply(msg)
            except Exception:
                log.exception("gateway configuration not applied")

    async def _apply(self, msg: GatewayConfig) -> None:
        want = {li.held: li for li in msg.listeners}
        for name in [n for n in self.listeners if n not in want]:
            self._drop(name)
        for name in [n for n in self.held if n.startswith(HELD_PREFIX) and n not in want]:
            self._drop(name)  # handed down at start, no longer configured
        for name, cfg in want.items():
            if self.closed:
                return
            cur = self.listeners.get(name)
            if cur is not None and cur.config == cfg and cur.server is not None:
                continue
            fd = self.held.get(name)
            if fd is None:
                try:
                    fd = await self.loop.run_in_executor(None, fetch_listener,
                                                         self.fds_socket, name)
                except OSError as exc:
                    log.error("gateway %s: cannot take listener %s:%d from the agent: %s",
                              cfg.gateway, cfg.address, cfg.port, exc)
                    continue
                if fd is None:
                    log.error("gateway %s: the agent holds no listener %s:%d", cfg.gateway,
                              cfg.address, cfg.port)
                    continue
                if self.closed:
                    os.close(fd)
                    return
                self.held[name] = fd
            new = _Listener(self, cfg, fd)
            try:
                await new.serve()
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("gateway %s: listener %s:%d not served: %s", cfg.gateway,
                          cfg.address, cfg.port, exc)
                continue
            if cur is not None:
                cur.stop()  # after the new one accepts: no gap
            self.listeners[name] = new

    def _drop(self, name: str) -> None:
        cur = self.listeners.pop(name, None)
        if cur is not None:
            cur.stop()
        fd = self.held.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Stop accepting on every gateway listener (the drain; connections finish)."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        for name in list(self.listeners):
            self._drop(name)
        for name in [n for n in self.held if n.startswith(HELD_PREFIX)]:
            self._drop(name)
