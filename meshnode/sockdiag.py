"""The kernel's sock_diag (NETLINK_SOCK_DIAG), asked with a plain AF_NETLINK socket from the
standard library: pyroute2 does not work on the workers' uvloop loop, and both questions here
are one request that the kernel answers at once.

- `cgroup_of`: which cgroup a local client socket belongs to. Under iptables capture the proxy
  learns the original destination from conntrack, which knows nothing of the client process; the
  client's socket is local, so one request for exactly that socket returns its
  INET_DIAG_CGROUP_ID, and the agent's cgroup → service map names the source. The eBPF capture
  hands the same id over in the SO_ORIGINAL_DST answer and never needs this.
- `destroy`: close (SOCK_DESTROY: the app sees ECONNABORTED, the peer a reset) the TCP
  connections to given addresses that a filter picks by socket cookie; the kernel path closes
  its connections to an endpoint that left this way when the service asks for it.
- `tcp_listeners`: every listening TCP socket of this network namespace, by inode. Asking for
  the LISTEN state alone makes the kernel walk only its listening hash. /proc/net/tcp (psutil's
  `net_connections`) walks the established hash too, every TIME_WAIT socket of every namespace:
  on a host making thousands of connections a second that read cost the agent's port scan 28 %
  of a CPU.

Used by the proxy and the agent alike: imports nothing of either.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address

__all__ = ["SockDiag"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_SOCK_DESTROY = 21
_NLM_F_ACK = 4
_NLM_F_REQUEST = 1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_INET_DIAG_CGROUP_ID = 21
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
_TCP_LISTEN = 10
# Connected states worth closing: all but LISTEN, TIME_WAIT (6) and CLOSE (7).
_CONNECTED_STATES = _ALL_STATES & ~((1 << _TCP_LISTEN) | (1 << 6) | (1 << 7))
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"

_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states; struct inet_diag_sockid }
# inet_diag_sockid: be16 sport, dport; be32 src[4], dst[4]; u32 if; u32 cookie[2]
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size
# struct inet_diag_msg: u8 family, state, timer, retrans; sockid (48); u32 expires, rqueue,
# wqueue, uid, inode
_MSG_LEN = 72
_MSG_FAMILY = struct.Struct("=B")
_MSG_INODE = struct.Struct("=I")
_MSG_INODE_AT = 68
_RTA = struct.Struct("=HH")
_U64 = struct.Struct("=Q")

Address = IPv4Address | IPv6Address


class SockDiag:
    """One netlink socket, reused for every request of its owner."""

    __slots__ = ("_seq", "_sock")

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
            sock.settimeout(0.05)  # the kernel answers inline; never stall the loop for long
            self._sock = sock
        return self._sock

    def _send(self, body: bytes, flags: int) -> int:
        return self._send_as(_SOCK_DIAG_BY_FAMILY, body, flags)

    def _replies(self, seq: int) -> Iterator[tuple[int, memoryview]]:
        """(type, message) of the answer to request `seq`, until its last part. An answer to
        an earlier request that timed out is skipped."""
        assert self._sock is not None
        while True:
            data = memoryview(self._sock.recv(65536))
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    return
                if mseq == seq:
                    if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                        yield kind, data[off:off + length]
                        return
                    yield kind, data[off:off + length]
                off += (length + 3) & ~3

    def cgroup_of(self, local: tuple[IPv4Address, int], remote: tuple[IPv4Address, int]) -> int:
        """The cgroup id of the TCP socket bound to `local` and connected to `remote` (the
        client's own view of its connection), or 0 when the kernel has no such socket or
        cannot say."""
        body = (_REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, _ALL_STATES)
                + _SOCKID.pack(local[1], remote[1], local[0].packed.ljust(16, b"\0"),
                               remote[0].packed.ljust(16, b"\0"))
                + _SOCKID_TAIL.pack(0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE))
        try:
            for kind, msg in self._replies(self._send(body, 0)):
                if kind != _SOCK_DIAG_BY_FAMILY:
                    return 0
                return _find_cgroup(msg[_NLMSGHDR.size + _MSG_LEN:])
        except OSError:
            self.close()  # a fresh socket next time, without stale answers queued
        return 0

    def tcp_listeners(self) -> dict[int, tuple[Address, int]]:
        """Listening TCP sockets (IPv4 and IPv6) of this network namespace: inode → address.
        OSError when the kernel cannot answer (no sock_diag)."""
        found: dict[int, tuple[Address, int]] = {}
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                body = (_REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
                        + bytes(_SOCKID.size)
                        + _SOCKID_TAIL.pack(0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE))
                for kind, msg in self._replies(self._send(body, _NLM_F_DUMP)):
                    if kind == _NLMSG_ERROR:
                        raise OSError(f"sock_diag refused the {family.name} dump")
                    if kind == _SOCK_DIAG_BY_FAMILY:
                        inode, addr = _listener(msg[_NLMSGHDR.size:])
                        found[inode] = addr
        except OSError:
            self.close()
            raise
        return found

    def destroy(self, targets: set[tuple[IPv4Address, int]],
                pick: Callable[[int], bool]) -> int:
        """Close every connected TCP socket (IPv4, or IPv6 to a v4-mapped address) whose peer
        is in `targets` and whose cookie `pick` accepts. Returns how many the kernel closed.
        OSError when it cannot (no sock_diag, or SOCK_DESTROY not built in)."""
        found: list[tuple[int, bytes]] = []
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                body = (_REQ.pack(family, socket.IPPROTO_TCP, 0, _CONNECTED_STATES)
                        + bytes(_SOCKID.size)
                        + _SOCKID_TAIL.pack(0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE))
                for kind, msg in self._replies(self._send(body, _NLM_F_DUMP)):
                    if kind == _NLMSG_ERROR:
                        raise OSError(f"sock_diag refused the {family.name} dump")
                    if kind != _SOCK_DIAG_BY_FAMILY:
                        continue
                    sockid = bytes(msg[_NLMSGHDR.size + 4:_NLMSGHDR.size + 4 + _SOCKID_LEN])
                    _sport, dport, _src, dst = _SOCKID.unpack_from(sockid, 0)
                    ip = dst[:4] if family == socket.AF_INET else (
                        dst[12:] if dst[:12] == _V4_MAPPED else None)
                    if ip is None or (IPv4Address(ip), dport) not in targets:
                        continue
                    _ifindex, lo, hi = _SOCKID_TAIL.unpack_from(sockid, _SOCKID.size)
                    if pick(lo | hi << 32):
                        found.append((family, sockid))
            closed = 0
            for fam, sockid in found:
                body = _REQ.pack(fam, socket.IPPROTO_TCP, 0, _ALL_STATES) + sockid
                seq = self._send_as(_SOCK_DESTROY, body, _NLM_F_ACK)
                for kind, msg in self._replies(seq):
                    if kind == _NLMSG_ERROR:
                        err = struct.unpack_from("=i", msg, _NLMSGHDR.size)[0]
                        if err == 0:
                            closed += 1
                        elif err != -2:  # ENOENT: it closed meanwhile
                            raise OSError(-err, "SOCK_DESTROY failed")
        except OSError:
            self.close()
            raise
        return closed

    def _send_as(self, kind: int, body: bytes, flags: int) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._socket().send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                           _NLM_F_REQUEST | flags, self._seq, 0) + body)
        return self._seq

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _listener(msg: memoryview) -> tuple[int, tuple[Address, int]]:
    family = _MSG_FAMILY.unpack_from(msg, 0)[0]
    port, _dport, src, _dst = _SOCKID.unpack_from(msg, 4)
    ip: Address = IPv4Address(src[:4]) if family == socket.AF_INET else IPv6Address(src)
    return _MSG_INODE.unpack_from(msg, _MSG_INODE_AT)[0], (ip, port)


def _find_cgroup(attrs: memoryview) -> int:
    """INET_DIAG_CGROUP_ID among a reply's attributes (4-byte aligned TLVs), 0 if absent."""
    off = 0
    while off + _RTA.size <= len(attrs):
        rta_len, rta_type = _RTA.unpack_from(attrs, off)
        if rta_len < _RTA.size:
            break
        if rta_type == _INET_DIAG_CGROUP_ID and rta_len >= _RTA.size + _U64.size:
            return int(_U64.unpack_from(attrs, off + _RTA.size)[0])
        off += (rta_len + 3) & ~3
    return 0
