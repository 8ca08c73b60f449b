"""A fake upstream DNS resolver for the DNS tests (unit and integration): UDP and TCP on
127.0.0.1 (port 0: any free one), answering A queries from a fixed table, so no test ever asks
a real resolver. Runs on whatever asyncio loop starts it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from meshnode.discovery.dns_upstream import Upstream

LOCAL = "127.0.0.1"


@dataclass
class FakeUpstream:
    """Answers A queries from `names` (name -> addresses); unknown names get NXDOMAIN, other
    types of known names no data. `udp_mode`: "answer", "truncate" (TC and no records over
    UDP: the answer only over TCP) or "silent" (never answers over UDP)."""

    names: dict[str, list[str]]
    udp_mode: str = "answer"
    udp_queries: int = 0
    tcp_queries: int = 0
    port: int = 0
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def answer(self, data: bytes) -> DNSRecord:
        q = DNSRecord.parse(data)
        reply = q.reply(aa=0)
        name = str(q.q.qname).rstrip(".").lower()
        if name not in self.names:
            reply.header.rcode = RCODE.NXDOMAIN
        elif q.q.qtype == QTYPE.A:
            for ip in self.names[name]:
                reply.add_answer(RR(q.q.qname, QTYPE.A, ttl=60, rdata=A(ip)))
        return reply

    def _on_datagram(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.udp_queries += 1
        if self.udp_mode == "silent" or self._udp is None:
            return
        reply = self.answer(data)
        if self.udp_mode == "truncate":
            reply = DNSRecord(header=reply.header, questions=reply.questions)
            reply.header.tc = 1
        self._udp.sendto(reply.pack(), addr)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        on_datagram = self._on_datagram

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                on_datagram(data, addr)

        for _ in range(20):  # a port free for UDP may be taken for TCP: try another
            self._udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=(LOCAL, 0))
            self.port = int(self._udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, LOCAL, self.port)
                return
            except OSError:
                self._udp.close()
        raise OSError("no port free for both UDP and TCP")

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(n)
                self.tcp_queries += 1
                out = self.answer(data).pack()
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for w in self._writers:
                w.close()
            await self._tcp.wait_closed()

    @property
    def upstream(self) -> Upstream:
        return Upstream(IPv4Address(LOCAL), self.port)


@asynccontextmanager
async def fake_upstream(**kw: Any) -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(**kw)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
