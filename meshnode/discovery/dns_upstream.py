"""Forwarding DNS queries for non-mesh names to upstream resolvers.

Owns the upstream list (`Upstream`, from configuration or /etc/resolv.conf) and one query's
exchange with it (`Forwarder`): UDP first, TCP when the answer comes back truncated, the next
upstream on a timeout or an error. Queries travel unchanged (same id, same EDNS options), so
the upstream's answer goes back to the client as it is. Wire format through dnslib only.

Imports nothing of meshnode's but errors and constants (no agent, capture or proxy).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from pathlib import Path

from dnslib import DNSBuffer, DNSError, DNSHeader

from meshnode import constants
from meshnode.errors import TemporaryError, UsageError

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
_LENGTH = struct.Struct("!H")  # DNS over TCP: each message is preceded by its length


@dataclass(frozen=True, slots=True, order=True)
class Upstream:
    """One upstream resolver (IPv4: the agent forwards from the host's IPv4 stack)."""

    host: IPv4Address
    port: int = constants.DNS_SERVICE_PORT

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """`IPv4[:PORT]`, as --dns-upstream takes it."""
        host, sep, port_text = text.strip().partition(":")
        try:
            addr = IPv4Address(host)
            port = int(port_text) if sep else constants.DNS_SERVICE_PORT
        except ValueError:
            raise UsageError(f"invalid DNS upstream {text!r}",
                             "use IPv4[:PORT], e.g. --dns-upstream 192.0.2.53:53") from None
        if not 0 < port < 65536:
            raise UsageError(f"invalid port in DNS upstream {text!r}", "use a port 1..65535")
        return cls(addr, port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def resolv_conf_upstreams(path: Path = RESOLV_CONF,
                          exclude: Iterable[Upstream] = ()) -> tuple[Upstream, ...]:
    """The IPv4 nameservers of a resolv.conf, in order, without `exclude` (the agent's own
    address: forwarding to itself would loop). A missing file gives none."""
    skip = set(exclude)
    found: list[Upstream] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ()
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc.strerror)
        return ()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = ip_address(fields[1].split("%", 1)[0])
        except ValueError:
            continue
        if not isinstance(addr, IPv4Address):
            log.debug("skipping IPv6 nameserver %s (forwarding is IPv4 only)", addr)
            continue
        up = Upstream(addr)
        if up not in skip and up not in found:
            found.append(up)
    return tuple(found)


def is_truncated(message: bytes) -> bool:
    return bool(DNSHeader.parse(DNSBuffer(message)).tc)


class ForwardError(TemporaryError):
    """No upstream answered a query (the client gets SERVFAIL)."""


class _Exchange(asyncio.DatagramProtocol):
    """One query over a connected UDP socket: the first datagram with the query's id wins.
    Connected, so the kernel drops datagrams from anyone but the upstream; a fresh socket (and
    source port) per query makes spoofed answers hard to land."""

    def __init__(self, query_id: int) -> None:
        self.query_id = query_id
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.answer.done():
            return
        try:
            header = DNSHeader.parse(DNSBuffer(data))
        except DNSError:
            return  # garbage: keep waiting for the real answer
        if header.id == self.query_id and header.qr:
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected socket: nobody serves DNS there.
        if not self.answer.done():
            self.answer.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("socket closed"))


class Forwarder:
    """Sends a query to each upstream in turn until one answers."""

    def __init__(self, upstreams: Sequence[Upstream],
                 timeout: float = constants.DNS_FORWARD_TIMEOUT) -> None:
        self.upstreams = tuple(upstreams)
        self.timeout = timeout  # per upstream attempt
        self.attempt_errors = 0  # failed attempts (a query may still succeed on the next one)

    async def forward(self, query: bytes, tcp: bool = False) -> bytes:
        """The first upstream answer to `query` (UDP, then TCP if truncated; TCP only when
        `tcp`). ForwardError when every upstream failed."""
        query_id = DNSHeader.parse(DNSBuffer(query)).id
        failures: list[str] = []
        for up in self.upstreams:
            try:
                if not tcp:
                    answer = await self._udp(up, query, query_id)
                    if not is_truncated(answer):
                        return answer
                    log.debug("truncated answer from %s: asking again over TCP", up)
                return await self._tcp(up, query, query_id)
            except (OSError, TimeoutError, DNSError, asyncio.IncompleteReadError) as exc:
                self.attempt_errors += 1
                failures.append(f"{up}: {exc or type(exc).__name__}")
        raise ForwardError("no upstream resolver answered: " + ("; ".join(failures) or "none"),
                           "check --dns-upstream (or the nameservers in /etc/resolv.conf)")

    async def _udp(self, up: Upstream, query: bytes, query_id: int) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Exchange(query_id), remote_addr=(str(up.host), up.port))
        try:
            transport.sendto(query)
            async with asyncio.timeout(self.timeout):
                return await proto.answer
        finally:
            transport.close()

    async def _tcp(self, up: Upstream, query: bytes, query_id: int) -> bytes:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(str(up.host), up.port)
            try:
                writer.write(_LENGTH.pack(len(query)) + query)
                await writer.drain()
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                answer = await reader.readexactly(length)
            finally:
                writer.close()
        header = DNSHeader.parse(DNSBuffer(answer))
        if header.id != query_id or not header.qr:
            raise DNSError(f"answer from {up} does not match the query")
        return answer
