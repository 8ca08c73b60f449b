"""The agent's DNS server: `<service>.<suffix>` answers with the service's VIP, every other
name is forwarded to upstream resolvers.

Two parts, kept apart like a protocol and its transport:
  `MeshZone`  decides what one query gets (pure: bytes in, an outcome out; no sockets), from a
              `resolve(service) -> IPv4Address | None` callable the agent backs with its
              registry snapshot;
  `MeshDns`   serves it over UDP and TCP on the agent's loop (stdlib asyncio) and forwards
              through `dns_upstream.Forwarder`.
Answers under the suffix: A -> the VIP (short TTL); ANY -> the same; AAAA and other types of a
known service -> NOERROR without answers; an unknown service -> NXDOMAIN. Malformed queries get
FORMERR when their header can be read and are dropped otherwise; responses are never answered
(no reflection loops). Nothing a client sends can end the server.

Enrolled processes reach it without knowing: capture redirects their port-53 queries here
(CaptureBackend.set_dns). Imports no agent, capture or proxy code; wire format through dnslib.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address
from typing import NoReturn, cast

from dnslib import (
    CLASS,
    EDNS0,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSBuffer,
    DNSError,
    DNSHeader,
    DNSRecord,
)

from meshnode import constants
from meshnode.discovery.dns_upstream import Forwarder, ForwardError, Upstream
from meshnode.errors import ConflictError, KernelError, UsageError

log = logging.getLogger(__name__)

Resolve = Callable[[str], IPv4Address | None]

UDP_PLAIN_LIMIT = 512  # a UDP answer without EDNS may not be longer (RFC 1035)
UDP_EDNS_LIMIT = 1232  # what we advertise and cap EDNS clients at (DNS flag day 2020)
MAX_INFLIGHT = 512  # forwards at once; beyond that, SERVFAIL at once instead of queueing
MAX_TCP_CONNECTIONS = 128
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent between queries
_PORT_ATTEMPTS = 20  # port 0: tries to find a port free for both UDP and TCP
_LENGTH = struct.Struct("!H")
_CLASS_ANY = 255  # dnslib names it "*", which is no attribute
_SUFFIX_RE = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                        r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def check_suffix(suffix: str) -> str:
    """The suffix normalised (lowercase, no outer dots), or UsageError."""
    norm = suffix.strip().strip(".").lower()
    if not _SUFFIX_RE.match(norm):
        raise UsageError(f"invalid DNS suffix {suffix!r}",
                         "use a domain name such as mesh or svc.example")
    return norm


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to send back; `rcode` is what it says (for the counters)."""

    data: bytes
    rcode: int


@dataclass(frozen=True, slots=True)
class Forward:
    """Not a mesh name: the query goes to the upstreams unchanged."""

    query: bytes


Outcome = Reply | Forward | None  # None: drop (not even a header, or not a query)


class MeshZone:
    """What one query gets. Pure: no sockets, no clock; `resolve` is the only outside call."""

    def __init__(self, resolve: Resolve, suffix: str = "mesh",
                 ttl: int = constants.DNS_TTL) -> None:
        self.resolve = resolve
        self.suffix = check_suffix(suffix)
        self.ttl = ttl

    def service_of(self, qname: str) -> str | None:
        """The service a name asks for: "" for the suffix itself, None outside it."""
        name = qname.rstrip(".").lower()
        if name == self.suffix:
            return ""
        if name.endswith("." + self.suffix):
            return name[: -len(self.suffix) - 1]
        return None

    def respond(self, data: bytes) -> Outcome:
        try:
            header = DNSHeader.parse(DNSBuffer(data))
        except DNSError:
            return None  # shorter than a header: nothing to address an error to
        if header.qr:
            return None  # a response: answering it could start a loop between two servers
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError, but any parse failure is FORMERR
            return error_reply(header, RCODE.FORMERR)
        if header.opcode != OPCODE.QUERY:
            return error_reply(header, RCODE.NOTIMP)
        if len(query.questions) != 1:
            return error_reply(header, RCODE.FORMERR)
        service = self.service_of(str(query.q.qname))
        if service is None:
            return Forward(data)
        return self._answer(query, service)

    def _answer(self, query: DNSRecord, service: str) -> Reply:
        q = query.q
        reply = query.reply()  # id, rd, question; qr, aa, ra set
        if _edns(query) is not None:
            reply.add_ar(EDNS0(udp_len=UDP_EDNS_LIMIT))
        if q.qclass not in (CLASS.IN, _CLASS_ANY):
            reply.header.rcode = RCODE.REFUSED
            return Reply(reply.pack(), RCODE.REFUSED)
        vip = self.resolve(service) if service else None
        if service and vip is None:
            reply.header.rcode = RCODE.NXDOMAIN
        if vip is not None and q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(q.qname, QTYPE.A, CLASS.IN, self.ttl, A(str(vip))))
        else:
            # NXDOMAIN or no data of this type (AAAA: VIPs are IPv4 only): the SOA tells
            # resolvers how long they may remember that (RFC 2308).
            reply.add_auth(self._soa())
        return Reply(reply.pack(), reply.header.rcode)

    def _soa(self) -> RR:
        zone = self.suffix + "."
        return RR(zone, QTYPE.SOA, CLASS.IN, self.ttl,
                  SOA("ns." + zone, "hostmaster." + zone, (1, 60, 60, 60, self.ttl)))


def error_reply(header: DNSHeader, rcode: int) -> Reply:
    """A bare answer with `rcode` to the query with this header (no question: it may not have
    parsed)."""
    reply = DNSRecord(DNSHeader(id=header.id, qr=1, opcode=header.opcode, rd=header.rd, ra=1,
                                rcode=rcode))
    return Reply(reply.pack(), rcode)


def _edns(query: DNSRecord) -> int | None:
    """The client's EDNS UDP payload size, or None without EDNS."""
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            return int(rr.rclass)
    return None


def udp_limit(query: bytes) -> int:
    """How long a UDP answer to `query` may be."""
    try:
        size = _edns(DNSRecord.parse(query))
    except Exception:  # only ever called for queries that parsed once already
        return UDP_PLAIN_LIMIT
    return UDP_PLAIN_LIMIT if size is None else max(UDP_PLAIN_LIMIT, min(size, 4096))


def truncate(answer: bytes) -> bytes:
    """`answer` cut to its header and question with TC set: the client asks again over TCP."""
    record = DNSRecord.parse(answer)
    cut = DNSRecord(header=record.header, questions=record.questions)
    cut.header.tc = 1
    return bytes(cut.pack())


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
                 timeout: float = constants.DNS_FORWARD_TIMEOUT) -> None:
        self.zone = MeshZone(resolve, suffix, ttl)
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

    async def start(self) -> None:
        """Bind UDP, then TCP on the same port. All or nothing. Port 0 (tests): the kernel
        picks a UDP port whose TCP twin may be taken; then another is tried."""
        loop = asyncio.get_running_loop()
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
            self._send(outcome.data, addr)  # mesh names: answered inline, no task
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
            return outcome.data
        return await self._forward(outcome.query, tcp=True)
