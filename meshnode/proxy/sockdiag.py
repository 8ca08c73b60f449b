"""Which cgroup a local client socket belongs to, by asking the kernel's sock_diag.

Under iptables capture the proxy learns the original destination from conntrack, which knows
nothing of the client process. The client's socket is local (same network namespace), so one
SOCK_DIAG_BY_FAMILY request for exactly that TCP socket returns its INET_DIAG_CGROUP_ID, and
the agent's cgroup → service map names the source. The eBPF capture hands the same id over in
the SO_ORIGINAL_DST answer and never needs this.

A plain AF_NETLINK socket from the standard library: pyroute2 does not work on the workers'
uvloop loop, and this is one blocking request/reply that the kernel answers at once.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from ipaddress import IPv4Address

__all__ = ["SockDiag"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_INET_DIAG_CGROUP_ID = 21
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states; struct inet_diag_sockid }
# inet_diag_sockid: be16 sport, dport; be32 src[4], dst[4]; u32 if; u32 cookie[2]
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_MSG_LEN = 72  # struct inet_diag_msg: 4 + sockid 48 + expires, rqueue, wqueue, uid, inode
_RTA = struct.Struct("=HH")
_U64 = struct.Struct("=Q")


class SockDiag:
    """One netlink socket, reused for every lookup of this worker."""

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

    def cgroup_of(self, local: tuple[IPv4Address, int], remote: tuple[IPv4Address, int]) -> int:
        """The cgroup id of the TCP socket bound to `local` and connected to `remote` (the
        client's own view of its connection), or 0 when the kernel has no such socket or
        cannot say."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = (_REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, _ALL_STATES)
                + _SOCKID.pack(local[1], remote[1], local[0].packed.ljust(16, b"\0"),
                               remote[0].packed.ljust(16, b"\0"))
                + _SOCKID_TAIL.pack(0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE))
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                             self._seq, 0) + body
        try:
            sock = self._socket()
            sock.send(msg)
            while True:
                reply = sock.recv(8192)
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply, 0)
                if seq == self._seq:
                    break  # an answer to an earlier request that timed out is skipped
        except OSError:
            self.close()  # a fresh socket next time, without stale answers queued
            return 0
        if kind == _NLMSG_ERROR or kind != _SOCK_DIAG_BY_FAMILY:
            return 0
        return _find_cgroup(reply[_NLMSGHDR.size + _MSG_LEN:length])

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _find_cgroup(attrs: bytes) -> int:
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
