"""The agent's DNS server: `<service>.<suffix>` answers with the service's VIP,
`_<service>._tcp.<suffix>` with SRV records of its healthy endpoints, every other name is
forwarded to upstream resolvers.

Two parts, kept apart like a protocol and its transport:
  `MeshZone`  decides what one query gets (pure: bytes in, an outcome out; no sockets), from a
              `resolve(service) -> IPv4Address | None` callable the agent backs with its
              registry snapshot, and an `instances(service) -> [SrvTarget]` callable backed by
              the registry and the health checks (agent/names.py);
  `MeshDns`   serves it over UDP and TCP on the agent's loop (stdlib asyncio) and forwards
              through `dns_upstream.Forwarder`.
Answers under the suffix: A -> the VIP (short TTL); ANY -> the same; AAAA and other types of a
known service -> NOERROR without answers; an unknown service -> NXDOMAIN.
SRV, for clients that balance themselves (Consul's and Kubernetes' shape): one record per
healthy endpoint with its port, its weight and a priority by locality (0 this node, 1 this
zone, 2 elsewhere, as the proxy's balancers prefer them); the target is
`<ip-with-dashes>.<node>.ep.<suffix>`, whose A record travels in the additional section. No
healthy endpoint: NOERROR without answers (NODATA), so a client tells "down" from "no such
service". An answer too long for the client's UDP limit drops the additional records first
(the targets still resolve on their own), and only then sets TC.
Malformed queries get FORMERR when their header can be read and are dropped otherwise;
responses are never answered (no reflection loops). Nothing a client sends can end the server.

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
from ipaddress import AddressValueError, IPv4Address
from typing import NoReturn, cast

from dnslib import (
    CLASS,
    EDNS0,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    A,
    DNSBuffer,
    DNSError,
    DNSHeader,
    DNSRecord,
)

from meshnode import constants
from meshnode.discovery.dns_upstream import Forwarder, ForwardError, Upstream
from meshnode.errors import ConflictError, KernelError, UsageError
from meshnode.model import HostPort

log = logging.getLogger(__name__)

Resolve = Callable[[str], IPv4Address | None]


@dataclass(frozen=True, order=True, slots=True)
class SrvTarget:
    """One healthy endpoint as an SRV record lists it (`priority` first: lower is preferred;
    `weight` shares traffic within a priority, RFC 2782)."""

    priority: int
    addr: HostPort
    weight: int = 1
    node: str = ""


# A known service's healthy endpoints (empty for an unknown service or none healthy).
Instances = Callable[[str], Sequence[SrvTarget]]


def no_instances(service: str) -> Sequence[SrvTarget]:
    """No SRV data for any service (a zone built without a health view)."""
    return ()

UDP_PLAIN_LIMIT = 512  # a UDP answer without EDNS may not be longer (RFC 1035)
UDP_EDNS_LIMIT = 1232  # what we advertise and cap EDNS clients at (DNS flag day 2020)
TCP_LIMIT = 65535  # a DNS message over TCP has a 16-bit length
SRV_PROTOCOL = "_tcp"  # the mesh carries TCP only: _<service>._udp is no name here
EP_LABEL = "ep"  # SRV targets: <ip-with-dashes>.<node>.ep.<suffix>
MAX_INFLIGHT = 512  # forwards at once; beyond that, SERVFAIL at once instead of queueing
MAX_TCP_CONNECTIONS = 128
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent between queries
_PORT_ATTEMPTS = 20  # port 0: tries to find a port free for both UDP and TCP
_LENGTH = struct.Struct("!H")
_CLASS_ANY = 255  # dnslib names it "*", which is no attribute
_SUFFIX_RE = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                        r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NOT_LABEL = re.compile(r"[^a-z0-9-]+")
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


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


def node_label(node: str) -> str:
    """A node name as one DNS label ("" when nothing of it is left): node names are host
    names or free text (--node), so what a label may not hold becomes '-'."""
    return _NOT_LABEL.sub("-", node.lower()).strip("-")[:63].strip("-")


class MeshZone:
    """What one query gets. Pure: no sockets, no clock; `resolve` and `instances` are the only
    outside calls."""

    def __init__(self, resolve: Resolve, suffix: str = "mesh",
                 ttl: int = constants.DNS_TTL, instances: Instances = no_instances) -> None:
        self.resolve = resolve
        self.instances = instances
        self.suffix = check_suffix(suffix)
        self.ttl = ttl

    def target(self, t: SrvTarget) -> str:
        """The name an SRV record points at for `t`; `endpoint_of` reads it back."""
        label = node_label(t.node)
        return ".".join((str(t.addr.ip).replace(".", "-"), *((label,) if label else ()),
                         EP_LABEL, self.suffix)) + "."

    @staticmethod
    def endpoint_of(name: str) -> IPv4Address | None:
        """The address an SRV target name under the suffix stands for (`name` without the
        suffix), or None if it is no such name.

        The name carries its address, so it resolves without a lookup and even after the
        endpoint left (a client may still hold an SRV answer for a TTL). That answers nothing
        a client could not write down itself: the zone is only served on 127.0.0.1."""
        labels = name.split(".")
        if labels[-1] != EP_LABEL or len(labels) not in (2, 3):
            return None
        if len(labels) == 3 and not _LABEL_RE.match(labels[1]):
            return None
        text = labels[0].replace("-", ".")
        if text.count(".") != 3:
            return None
        try:
            return IPv4Address(text)
        except AddressValueError:
            return None

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

    def _answer(self, query: DNSRecord, name: str) -> Reply:
        q = query.q
        reply = query.reply()  # id, rd, question; qr, aa, ra set
        if q.qclass not in (CLASS.IN, _CLASS_ANY):
            reply.header.rcode = RCODE.REFUSED
            return Reply(_with_edns(reply, query).pack(), RCODE.REFUSED)
        records = self._records(q.qname, q.qtype, name)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
        answers, additional = records or ([], [])
        if answers:
            reply.add_answer(*answers)
            reply.add_ar(*additional)
        else:
            # NXDOMAIN or no data of this type (AAAA: VIPs are IPv4 only; SRV of a service
            # with no healthy endpoint): the SOA tells resolvers how long they may remember
            # that (RFC 2308).
            reply.add_auth(self._soa())
        return Reply(_with_edns(reply, query).pack(), reply.header.rcode)

    def _records(self, qname: object, qtype: int,
                 name: str) -> tuple[list[RR], list[RR]] | None:
        """(answers, additional records) for `name` under the suffix; None: no such name.
        An empty result is a name that exists without data of this type."""
        if name == "":
            return [], []  # the suffix itself
        if name.startswith("_"):
            return self._srv(qname, qtype, name)
        if (ip := self.endpoint_of(name)) is not None:
            return ([RR(qname, QTYPE.A, CLASS.IN, self.ttl, A(str(ip)))]
                    if qtype in (QTYPE.A, QTYPE.ANY) else []), []
        vip = self.resolve(name)
        if vip is None:
            return None
        return ([RR(qname, QTYPE.A, CLASS.IN, self.ttl, A(str(vip)))]
                if qtype in (QTYPE.A, QTYPE.ANY) else []), []

    def _srv(self, qname: object, qtype: int,
             name: str) -> tuple[list[RR], list[RR]] | None:
        service, _, proto = name[1:].partition(".")
        if proto != SRV_PROTOCOL or not service or self.resolve(service) is None:
            return None
        if qtype not in (QTYPE.SRV, QTYPE.ANY):
            return [], []
        answers, additional = [], []
        for t in sorted(self.instances(service)):
            target = self.target(t)
            answers.append(RR(qname, QTYPE.SRV, CLASS.IN, self.ttl,
                              SRV(t.priority, max(0, min(t.weight, 65535)), t.addr.port,
                                  target)))
            additional.append(RR(target, QTYPE.A, CLASS.IN, self.ttl, A(str(t.addr.ip))))
        # two endpoints of one address (ports differ) share a target: its A record once
        return answers, list({str(rr.rname): rr for rr in additional}.values())

    def _soa(self) -> RR:
        zone = self.suffix + "."
        return RR(zone, QTYPE.SOA, CLASS.IN, self.ttl,
                  SOA("ns." + zone, "hostmaster." + zone, (1, 60, 60, 60, self.ttl)))


def _with_edns(reply: DNSRecord, query: DNSRecord) -> DNSRecord:
    """An EDNS query gets an EDNS answer (its OPT record last, after any additional records)."""
    if _edns(query) is not None:
        reply.add_ar(EDNS0(udp_len=UDP_EDNS_LIMIT))
    return reply


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


def fit(answer: bytes, limit: int) -> tuple[bytes, bool]:
    """`answer` within `limit` bytes, and whether it had to be truncated (TC). Additional
    records go first (RFC 2181 9: leaving them out needs no TC; an SRV target still resolves
    by itself), then the answers (TC: the client asks again over TCP)."""
    if len(answer) <= limit:
        return answer, False
    record = DNSRecord.parse(answer)
    record.ar = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    lean = bytes(record.pack())
    if len(lean) <= limit:
        return lean, False
    return truncate(answer), True


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
