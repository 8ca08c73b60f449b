"""The proxy's routing input: original destinations as the kernel hands them over
(meshnode.proxy.origdst), read from real sockets and from recorded getsockopt answers."""

from __future__ import annotations

import socket
import struct

import pytest

from meshnode.model import HostPort, OrigDstAddr
from meshnode.proxy.origdst import (
    OrigDstError,
    Origin,
    SockoptOrigDst,
    StaticOrigDst,
    parse_sockaddr_in,
)

pytestmark = pytest.mark.timeout(10)


def dst(text: str) -> OrigDstAddr:
    hp = HostPort.parse(text)
    return OrigDstAddr(hp.ip, hp.port)



def test_parse_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) \
        + socket.inet_aton("127.240.0.7") + bytes(8)
    assert parse_sockaddr_in(raw) == dst("127.240.0.7:8080")
    with pytest.raises(OrigDstError):
        parse_sockaddr_in(struct.pack("=H", socket.AF_INET6) + bytes(14))


def test_sockopt_source_without_capture_is_a_typed_error() -> None:
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        with socket.create_connection(ls.getsockname(), timeout=5):
            conn, _ = ls.accept()
            with conn, pytest.raises(OrigDstError) as info:
                SockoptOrigDst().lookup(conn)
    assert info.value.errno != 0 and info.value.hint


def test_static_source() -> None:
    d = dst("127.0.0.1:9")
    with socket.socket() as s:
        assert StaticOrigDst(d).lookup(s) == Origin(d, 0, 0)


class _Answer:
    """A socket whose SO_ORIGINAL_DST answer is `raw` (as mn_getsockopt.c or conntrack gives)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        return self.raw[:buflen]

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 40000)


def test_sockopt_source_reads_the_client_from_the_padding() -> None:
    addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80) \
        + socket.inet_aton("127.240.0.2")
    ebpf = SockoptOrigDst().lookup(_Answer(addr + struct.pack("=II", 4242, 777)))
    assert ebpf == Origin(dst("127.240.0.2:80"), 4242, 777)
    conntrack = SockoptOrigDst().lookup(_Answer(addr + bytes(8)))
    assert conntrack == Origin(dst("127.240.0.2:80"), 0, 0)
