"""The agent's DNS server: serves `dns_zone.MeshZone` over UDP and TCP on the agent's loop
(stdlib asyncio) and forwards every name outside the suffix to upstream resolvers through
`dns_upstream.Forwarder`. Nothing a client sends can end the server.

Enrolled processes reach it without knowing: capture redirects their port-53 queries here
(CaptureBackend.set_dns). Imports no agent, capture or proxy code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import NoReturn, cast

from dnslib import (
    RCODE,
    DNSBuffer,
    DNSHeader,
)

from meshnode import constants
from meshnode.discovery.dns_upstream import Forwarder, ForwardError, Upstream
from meshnode.discovery.dns_zone import (
    TCP_LIMIT,
    UDP_PLAIN_LIMIT,
    Instances,
    MeshZone,
    Reply,
    Resolve,
    error_reply,
    fit,
    no_instances,
    truncate,
    udp_limit,
)
from meshnode.errors import ConflictError, KernelError

log = logging.getLogger(__name__)

MAX_INFLIGHT = 512  # forwards at once; beyond that, SERVFAIL at once instead of queueing
MAX_TCP_CONNECTIONS = 128
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent between queries
# Names of the DNS sockets the proxy workers hold for the agent (wire.Hello.held).
HELD_UDP, HELD_TCP = "dns_udp", "dns_tcp"
_PORT_ATTEMPTS = 20  # port 0: tries to find a port free for both UDP and TCP
_LENGTH = struct.Struct("!H")


@dataclass
class DnsStats:
    queries: int = 0
    answers: int = 0  # mesh names answered NOERROR (with or without data)
    nxdomain: int = 0
    forwarded: int = 0  # other names answered by an upstream
    forward_errors: int = 0  # other names no upstream answered (SERVFAIL)
    truncated: int = 0  # UDP answers cut short (TC) because they did not fit
    formerr: int = 0  # malformed or unsupported queries answered with an error
    dropped: int = 0  # not answered at all: garbage, responses, overload
    upstream_attempt_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, server: MeshDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        # close() only schedules the socket's closing: stop() waits for it, so the port is
        # free again when stop() returns.
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.server.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (a client gone): nothing to do, keep serving.
        log.debug("DNS UDP socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class _Tasks:
    """Forwards and TCP connections in progress: `stop` cancels them all."""

    running: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        self.track(asyncio.ensure_future(coro))

    def track(self, task: asyncio.Task[None]) -> None:
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def cancel_all(self) -> None:
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)


class MeshDns:
    """The DNS server on host:port, UDP and TCP. `start` -> ... -> `stop`."""

    def __init__(self, resolve: Resolve, suffix: str = "mesh",
                 upstreams: Sequence[Upstream] = (), host: str = constants.PROXY_ADDR,
                 port: int = constants.DNS_PORT, ttl: int = constants.DNS_TTL,
                 timeout: float = constants.DNS_FORWARD_TIMEOUT,
                 instances: Instances = no_instances) -> None:
        self.zone = MeshZone(resolve, suffix, ttl, instances)
        self.forwarder = Forwarder(upstreams, timeout)
        self.host = host
        self.port = port  # the bound port after start() (port 0 asks for any free one)
        self._stats = DnsStats()
        self._udp: _UdpServer | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks = _Tasks()
        self._tcp_clients: set[asyncio.StreamWriter] = set()

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self.forwarder.upstreams

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, held: Mapping[str, int] | None = None) -> None:
        """Bind UDP, then TCP on the same port. All or nothing. Port 0 (tests): the kernel
        picks a UDP port whose TCP twin may be taken; then another is tried. `held`: the
        sockets an earlier agent served on (HELD_UDP/HELD_TCP descriptors, kept open by the
        proxy workers meanwhile, so queries waited in them instead of failing): served on
        copies of them, the descriptors stay the caller's."""
        loop = asyncio.get_running_loop()
        if held and {HELD_UDP, HELD_TCP} <= set(held):
            udp = socket.socket(fileno=os.dup(held[HELD_UDP]))
            tcp = socket.socket(fileno=os.dup(held[HELD_TCP]))
            udp.setblocking(False)
            tcp.setblocking(False)
            _, proto = await loop.create_datagram_endpoint(lambda: _UdpServer(self), sock=udp)
            self._udp = proto
            self.port = int(udp.getsockname()[1])
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
            log.info("DNS on %s:%d for .%s (sockets taken over from the last agent)",
                     self.host, self.port, self.zone.suffix)
            return
        any_port = self.port == 0
        for attempt in range(_PORT_ATTEMPTS if any_port else 1):
            try:
                transport, proto = await loop.create_datagram_endpoint(
                    lambda: _UdpServer(self), local_addr=(self.host, 0 if any_port else self.port))
                self._udp = proto
                self.port = int(transport.get_extra_info("sockname")[1])
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port,
                                                       reuse_address=True)
                break
            except OSError as exc:
                await self.stop()
                if any_port and exc.errno == errno.EADDRINUSE and attempt + 1 < _PORT_ATTEMPTS:
                    continue
                self._start_failed(exc)
        if not self.upstreams:
            log.warning("no DNS upstreams: names outside .%s get SERVFAIL", self.zone.suffix)
        log.info("DNS on %s:%d for .%s, upstreams %s", self.host, self.port, self.zone.suffix,
                 ", ".join(map(str, self.upstreams)) or "none")

    def _start_failed(self, exc: OSError) -> NoReturn:
        where = f"{self.host}:{self.port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConflictError(f"DNS address {where} is in use",
                                "stop what listens there, or choose --dns-port") from exc
        raise KernelError(f"cannot serve DNS on {where}: {exc.strerror}",
                          "check the address and --dns-port", errno=exc.errno) from exc

    def held(self) -> dict[str, int]:
        """Copies of the listening sockets, for the proxy workers to hold across a restart
        of the agent (the caller owns and closes them)."""
        if self._udp is None or self._udp.transport is None or self._tcp is None:
            return {}
        udp = self._udp.transport.get_extra_info("socket")
        return {HELD_UDP: os.dup(udp.fileno()), HELD_TCP: os.dup(self._tcp.sockets[0].fileno())}

    async def stop(self) -> None:
        """Stop listening, end TCP clients and in-flight forwards."""
        udp, self._udp = self._udp, None
        if udp is not None and udp.transport is not None:
            udp.transport.close()
            await udp.closed
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_clients):
            writer.close()
        await self._tasks.cancel_all()
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None

    def stats(self) -> dict[str, int]:
        self._stats.upstream_attempt_errors = self.forwarder.attempt_errors
        return self._stats.as_dict()

    # -- one query -------------------------------------------------------------------------

    def _count(self, reply: Reply) -> None:
        if reply.rcode == RCODE.NOERROR:
            self._stats.answers += 1
        elif reply.rcode == RCODE.NXDOMAIN:
            self._stats.nxdomain += 1
        else:
            self._stats.formerr += 1

    def _fit(self, answer: bytes, limit: int) -> bytes:
        """A mesh answer within `limit` (SRV answers of a large service can outgrow it)."""
        answer, cut = fit(answer, limit)
        if cut:
            self._stats.truncated += 1
        return answer

    async def _forward(self, query: bytes, tcp: bool) -> bytes:
        try:
            answer = await self.forwarder.forward(query, tcp)
        except ForwardError as exc:
            log.debug("%s", exc.message)
            self._stats.forward_errors += 1
            return error_reply(DNSHeader.parse(DNSBuffer(query)), RCODE.SERVFAIL).data
        self._stats.forwarded += 1
        return answer

    def on_datagram(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._stats.queries += 1
        outcome = self.zone.respond(data)
        if outcome is None:
            self._stats.dropped += 1
        elif isinstance(outcome, Reply):
            self._count(outcome)
            answer = outcome.data
            if len(answer) > UDP_PLAIN_LIMIT:  # only then is the client's own limit needed
                answer = self._fit(answer, udp_limit(data))
            self._send(answer, addr)  # mesh names: answered inline, no task
        elif len(self._tasks.running) >= MAX_INFLIGHT:
            self._stats.dropped += 1  # overloaded: the client retries (maybe elsewhere)
        else:
            self._tasks.spawn(self._forward_udp(outcome.query, addr))

    async def _forward_udp(self, query: bytes, addr: tuple[str | int, ...]) -> None:
        answer = await self._forward(query, tcp=False)
        if len(answer) > udp_limit(query):
            # Only an answer fetched over TCP can be this long (upstreams honour the client's
            # own limit over UDP); the client must ask over TCP itself.
            try:
                answer = truncate(answer)
            except Exception:  # an upstream answer dnslib cannot read back: not ours to fix
                answer = error_reply(DNSHeader.parse(DNSBuffer(query)), RCODE.SERVFAIL).data
            self._stats.truncated += 1
        self._send(answer, addr)

    def _send(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.sendto(data, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._tcp_clients.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.track(task)  # the handler task start_server made: stop cancels it
        try:
            while True:
                # Queries on one connection are answered in order (pipelining is allowed, and
                # ordered answers are valid).
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                    data = await reader.readexactly(length)
                answer = await self._answer_tcp(data)
                if answer is None:
                    continue
                writer.write(_LENGTH.pack(len(answer)) + answer)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # idle, gone, or reset: the connection just ends
        finally:
            self._tcp_clients.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer_tcp(self, data: bytes) -> bytes | None:
        self._stats.queries += 1
        outcome = self.zone.respond(data)
        if outcome is None:
            self._stats.dropped += 1
            return None
        if isinstance(outcome, Reply):
            self._count(outcome)
            return self._fit(outcome.data, TCP_LIMIT)
        return await self._forward(outcome.query, tcp=True)
