"""Where an accepted connection was going: the `OrigDstSource` interface and its sources.

`SockoptOrigDst` asks the kernel with `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: iptables REDIRECT
answers it from conntrack, and the eBPF capture answers the same call from its map through a
`cgroup/getsockopt` program, so the proxy has one code path for both captures.
`StaticOrigDst` returns one fixed address: unit and worker tests run without capture, and it is
the explicit (non-transparent) listener mode, where every client of the listener means the same
destination.

The eBPF answer also names the client (its cgroup id and process id, in sockaddr_in's padding);
conntrack's answer leaves them 0, and the worker asks sock_diag instead (meshnode/sockdiag.py).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import IPv4Address
from typing import Any, NamedTuple, Protocol

from meshnode import constants as C
from meshnode.errors import KernelError
from meshnode.model import HostPort, OrigDstAddr

__all__ = [
    "OrigDstError",
    "OrigDstSource",
    "Origin",
    "SocketLike",
    "SockoptOrigDst",
    "StaticOrigDst",
    "origdst_source",
    "parse_sockaddr_in",
]

_SOCKADDR_IN_LEN = 16  # struct sockaddr_in: family, port, addr, 8 bytes of padding
# sin_family is in host byte order, sin_port in network byte order.
_FAMILY = struct.Struct("=H")
_PORT = struct.Struct("!H")
_CLIENT = struct.Struct("=II")  # mn_getsockopt.c: cgroup id (low 32 bits), pid; host order


class Origin(NamedTuple):
    """An accepted connection's original destination, and who dialed it where the capture
    knows (0: unknown)."""

    dst: OrigDstAddr
    cgroup: int = 0
    pid: int = 0


class OrigDstError(KernelError):
    """The original destination of an accepted connection could not be read (keeps the errno)."""

    default_hint = "the connection did not come through meshnode's capture; it is refused"


class SocketLike(Protocol):
    """What a source may ask of an accepted socket (the worker's are `_socket.socket`)."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> Any: ...

    def getpeername(self) -> Any: ...


class OrigDstSource(Protocol):
    """Recovers the destination a captured client meant to reach."""

    def lookup(self, sock: SocketLike) -> Origin:
        """The original destination of `sock`; raises OrigDstError when there is none."""
        ...


def parse_sockaddr_in(raw: bytes) -> OrigDstAddr:
    """Decode a `struct sockaddr_in` as the kernel returns it."""
    if len(raw) < 8 or _FAMILY.unpack_from(raw, 0)[0] != socket.AF_INET:
        raise OrigDstError(f"original destination is not an IPv4 address ({raw[:2].hex()})",
                           errno=errno.EAFNOSUPPORT)
    port = _PORT.unpack_from(raw, 2)[0]
    if port == 0:
        raise OrigDstError("original destination has port 0", errno=errno.EINVAL)
    return OrigDstAddr(IPv4Address(raw[4:8]), port)


class SockoptOrigDst:
    """`getsockopt(SOL_IP, SO_ORIGINAL_DST)`: iptables REDIRECT, or eBPF via cgroup/getsockopt.

    Destinations are few (VIPs and endpoints), so each is parsed once and the same OrigDstAddr
    returned for its next connections: building an IPv4Address per connection costs more than
    the getsockopt, and a reused object hits the routing dicts by identity."""

    __slots__ = ("_parsed",)

    CACHE_MAX = 4096  # distinct destinations kept (passthrough ones can be many)

    def __init__(self) -> None:
        self._parsed: dict[bytes, OrigDstAddr] = {}

    def lookup(self, sock: SocketLike) -> Origin:
        try:
            raw = sock.getsockopt(socket.SOL_IP, C.SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
        except OSError as exc:
            # ENOENT: the kernel has no NAT record for this connection (it reached the listener
            # directly, or the capture's map entry is gone).
            raise OrigDstError(f"SO_ORIGINAL_DST failed: {exc.strerror}",
                               errno=exc.errno or 0) from exc
        key = raw[:8]  # family, port, address
        dst = self._parsed.get(key)
        if dst is None:
            dst = parse_sockaddr_in(raw)
            if len(self._parsed) >= self.CACHE_MAX:
                self._parsed.clear()
            self._parsed[key] = dst
        if len(raw) < _SOCKADDR_IN_LEN:
            return Origin(dst)
        cgroup, pid = _CLIENT.unpack_from(raw, 8)
        return Origin(dst, cgroup, pid)


class StaticOrigDst:
    """Every connection's original destination is `dst` (tests; explicit listener mode)."""

    __slots__ = ("dst",)

    def __init__(self, dst: OrigDstAddr) -> None:
        self.dst = dst

    def lookup(self, sock: SocketLike) -> Origin:
        return Origin(self.dst)


def origdst_source(explicit_target: str | None) -> OrigDstSource:
    """The kernel's answer (SO_ORIGINAL_DST), or, for an explicit listener, its one target
    ("IPv4:PORT"; UsageError when it is not one)."""
    if explicit_target is None:
        return SockoptOrigDst()
    target = HostPort.parse(explicit_target)
    return StaticOrigDst(OrigDstAddr(target.ip, target.port))
