"""Dialing an endpoint: how the proxy reaches the address the balancer chose.

`DirectDialer` opens plain TCP (with the proxy's SO_MARK, so capture never loops it back).
Whether an endpoint is dialed directly or through the mTLS tunnel to its host's inbound
listener is decided per connect attempt by proxy/tunnel.py (MeshSecurity.plan, asked by the
connector); the tunnel dials that listener with the same DirectDialer. Must not import bcc,
pyroute2 or the agent.
"""

from __future__ import annotations

import _socket
import errno
import socket
from typing import Protocol

from meshnode.model import Endpoint

__all__ = ["SO_MARK", "Dialer", "Dialers", "DirectDialer"]

SO_MARK = getattr(socket, "SO_MARK", 36)
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Dialer(Protocol):
    def start(self, ep: Endpoint) -> tuple[_socket.socket, int]:
        """A non-blocking socket with a connect to `ep` under way, and where it stands: 0
        connected, EINPROGRESS still handshaking (wait until writable, then read SO_ERROR), or
        the errno it failed with (the caller closes the socket)."""
        ...


class DirectDialer:
    """A non-blocking connect(2). Toward loopback and nearby hosts the kernel usually completes
    the handshake inside connect() itself, and `getpeername` says so without a trip through
    the event loop; a refused loopback connect is known at once the same way (SO_ERROR)."""

    __slots__ = ("_addrs", "mark")

    def __init__(self, mark: int) -> None:
        self.mark = mark
        # Endpoint -> (ip string, port), by identity: formatting an IPv4Address costs more
        # than the connect syscall's own setup. Entries are checked against the endpoint
        # object they were made for, so a reused id() never maps to a stale address.
        self._addrs: dict[int, tuple[Endpoint, tuple[str, int]]] = {}

    def _addr(self, ep: Endpoint) -> tuple[str, int]:
        hit = self._addrs.get(id(ep))
        if hit is not None and hit[0] is ep:
            return hit[1]
        if len(self._addrs) >= 4096:
            self._addrs.clear()
        pair = ep.addr.pair()
        self._addrs[id(ep)] = (ep, pair)
        return pair

    def start(self, ep: Endpoint) -> tuple[_socket.socket, int]:
        # Non-blocking from birth (no FIONBIO call); the C-level class, as for accepted sockets.
        sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            if self.mark:
                # Before connect: the capture hooks look at the mark when connect() runs.
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            sock.setsockopt(*_NODELAY)  # relayed small writes must not wait for ACKs
            err = sock.connect_ex(self._addr(ep))
            if err == errno.EINPROGRESS:
                try:
                    sock.getpeername()  # ENOTCONN while the handshake is under way
                    err = 0
                except OSError:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or err
        except BaseException:
            sock.close()
            raise
        return sock, err


class Dialers:
    """Chooses the dialer for each endpoint (local or remote node)."""

    def __init__(self, node: str, mark: int) -> None:
        self.node = node
        self.direct = DirectDialer(mark)

    def for_endpoint(self, ep: Endpoint) -> Dialer:
        return self.direct  # the tunnel, when wanted, was chosen before (connect.py)
