"""What one DNS query gets from the agent, decided without sockets (bytes in, an outcome
out): `MeshZone` and the wire helpers (EDNS limits, truncation) the server uses.

`<service>.<suffix>` answers with the service's VIP, from a `resolve(service) -> IPv4Address |
None` callable the agent backs with its registry snapshot. Under the suffix: A -> the VIP
(short TTL); ANY -> the same; AAAA and other types of a known service -> NOERROR without
answers; an unknown service -> NXDOMAIN.
SRV, for clients that balance themselves (Consul's and Kubernetes' shape), from an
`instances(service) -> [SrvTarget]` callable backed by the registry and the health checks
(agent/names.py): one record per healthy endpoint with its port, its weight and a priority by
locality (0 this node, 1 this zone, 2 elsewhere, as the proxy's balancers prefer them); the
target is `<ip-with-dashes>.<node>.ep.<suffix>`, whose A record travels in the additional
section. No healthy endpoint: NOERROR without answers (NODATA), so a client tells "down" from
"no such service". An answer too long for the client's UDP limit drops the additional records
first (the targets still resolve on their own), and only then sets TC.
Malformed queries get FORMERR when their header can be read and are dropped otherwise;
responses are never answered (no reflection loops).

Pure: imports no agent, capture or proxy code, and no sockets; wire format through dnslib.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address

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
    DNSLabel,
    DNSRecord,
)

from meshnode import constants
from meshnode.errors import UsageError
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
        if len(query.questions) != 1 or not _packable(query.q.qname):
            return error_reply(header, RCODE.FORMERR)
        service = self.service_of(str(query.q.qname))
        if service is None:
            return Forward(data)
        return self._answer(query, service)

    def _answer(self, query: DNSRecord, name: str) -> Reply:
        q = query.q
        reply = query.reply()  # id, rd, question; qr, aa, ra set
        # reply() copies the query's flag bits whole: a query with RCODE or TC set would get
        # an answer saying NOTAUTH, or truncated, with the full answer in it
        reply.header.rcode, reply.header.tc = RCODE.NOERROR, 0
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


def _packable(name: DNSLabel) -> bool:
    """Whether `name` fits DNS's limits. dnslib parses a label of 64-191 bytes (a length byte
    with the reserved 01/10 top bits) and names over 253 bytes, then refuses to pack them in
    the answer: a query the answer could not repeat is malformed."""
    return len(name) <= 253 and all(len(label) <= 63 for label in name.label)


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
