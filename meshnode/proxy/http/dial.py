"""Opening an upstream connection for the HTTP handlers: an asyncio transport to one endpoint.

An endpoint of this host (or one whose service's mode lets plaintext through) is dialed
directly, with the proxy's SO_MARK so capture never loops it back. An endpoint of another
host goes through that host's inbound listener the way the L4 tunnel does (proxy/tunnel.py:
MeshSecurity.plan decides): TLS 1.3 presenting the source service's certificate, the server
checked to be spiffe://<td>/node/<host>, the preamble naming the endpoint, one answer; only
then does the HTTP protocol get the transport (`transport.set_protocol`). The connection is
pooled afterwards (proxy/http/pool.py), so its handshake is paid once per many requests.

Failures raise `DialError` with a bounded reason (the connect failure labels of
proxy/telemetry.failure_reason, or the tunnel's refusal reason).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

from meshnode import __version__
from meshnode.model import Endpoint
from meshnode.proxy.dial import SO_MARK
from meshnode.proxy.telemetry import ConnInfo, failure_reason
from meshnode.proxy.tls import PeerError
from meshnode.proxy.tunnel import MeshSecurity, TunnelPlan
from meshnode.tunnel_wire import (
    HEADER,
    FrameError,
    Preamble,
    decode_answer,
    encode_frame,
    frame_length,
)

__all__ = ["DialError", "dial"]

P = TypeVar("P", bound=asyncio.BaseProtocol)


class DialError(Exception):
    """No connection to the endpoint; `reason` is a bounded label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


async def dial(loop: asyncio.AbstractEventLoop, ep: Endpoint, src: str, service: str,
               security: MeshSecurity | None, local_node: str, mark: int, timeout: float,
               factory: Callable[[], P]) -> tuple[asyncio.Transport, P, str]:
    """A connected transport to `ep` with `factory()`'s protocol on it, and the source
    identity the connection was made with ("" when plaintext)."""
    plan: TunnelPlan | None = None
    if security is not None and security.active and ep.node and ep.node != local_node:
        info = ConnInfo(0.0, None)
        info.service, info.src = service, src
        planned = security.plan(ep, info, requests=True)
        if isinstance(planned, str):
            raise DialError(planned, f"{service}: {ep.node} cannot be reached ({planned})")
        plan = planned
    target = plan.peer if plan is not None else ep
    sock = _socket(mark)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target.addr.pair())
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise DialError(failure_reason(exc), f"connect to {target.addr}: {exc}") from None
    except asyncio.CancelledError:  # the request went away meanwhile: no socket left behind
        sock.close()
        raise
    if plan is None:
        transport, proto = await loop.create_connection(factory, sock=sock)
        return transport, proto, ""
    return await _tunnel(loop, sock, plan, security, timeout, factory)


def _socket(mark: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)  # before connect: capture skips it
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Answer(asyncio.Protocol):
    """Reads the inbound listener's one answer, then hands the transport on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.buf = bytearray()
        self.done: asyncio.Future[bytes] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done.done() or len(self.buf) < HEADER:
            return
        try:
            n = frame_length(self.buf)
        except FrameError as exc:
            self.done.set_exception(exc)
            return
        if len(self.buf) >= HEADER + n:
            self.done.set_result(bytes(self.buf))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionResetError("the peer closed before answering"))


async def _tunnel(loop: asyncio.AbstractEventLoop, sock: socket.socket, plan: TunnelPlan,
                  security: MeshSecurity | None, timeout: float,
                  factory: Callable[[], P]) -> tuple[asyncio.Transport, P, str]:
    assert security is not None
    answer = _Answer(loop)
    try:
        transport, _ = await loop.create_connection(
            lambda: answer, sock=sock, ssl=plan.client.context, server_hostname="",
            ssl_handshake_timeout=security.handshake_timeout)
    except asyncio.CancelledError:
        sock.close()
        raise
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        sock.close()
        from meshnode.proxy.tls import handshake_cause
        cause = handshake_cause(exc)
        security.handshake_failed("client", cause, exc)
        raise DialError(f"tls_{cause}", f"TLS to {plan.node}: {exc}") from None
    try:
        ssl_object = transport.get_extra_info("ssl_object")
        security.tls.trust.check(ssl_object.getpeercert() if ssl_object else None, plan.expect)
        transport.write(encode_frame(Preamble(str(plan.target), plan.service,
                                              software=__version__, requests=True)))
        async with asyncio.timeout(timeout):
            frame = await answer.done
        reply = decode_answer(frame[HEADER:HEADER + frame_length(frame)])
    except PeerError as exc:
        transport.abort()
        security.handshake_failed("client", exc.cause, exc)
        raise DialError(f"tls_{exc.cause}", str(exc)) from None
    except (OSError, FrameError, TimeoutError) as exc:
        transport.abort()
        raise DialError("tunnel_error", f"tunnel to {plan.node}: {exc}") from None
    except asyncio.CancelledError:
        transport.abort()
        raise
    resumed = bool(ssl_object is not None and ssl_object.session_reused)
    security.stats.count("tls_handshakes", "client", "resumed" if resumed else "full")
    if not reply.ok:
        transport.abort()
        reason = reply.reason if reply.reason.isidentifier() else "unknown"
        security.refused("client", f"peer_{reason}", "%s refused a tunnel to %s (%s): %s",
                         plan.node, plan.target, plan.service, reason)
        raise DialError(f"tunnel_{reason}", f"{plan.node} refused: {reason}")
    security.stats.count("tunnels", "out", plan.node)
    proto = factory()
    rest = bytes(answer.buf[HEADER + frame_length(answer.buf):])
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if rest and isinstance(proto, asyncio.Protocol):
        proto.data_received(rest)
    return transport, proto, plan.client.identity
