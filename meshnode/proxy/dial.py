"""Dialing an endpoint: how the proxy reaches the address the balancer chose.

`DirectDialer` opens plain TCP (with the proxy's SO_MARK, so capture never loops it back).
`Dialers.for_endpoint` is the one place that decides per endpoint: today every endpoint is
dialed directly; endpoints on another node will go through the mutual-TLS tunnel to that
node's agent (DESIGN flow 4) by returning a tunnel dialer here, leaving the balancing,
failover and relay code untouched. Must not import bcc, pyroute2 or the agent.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from meshnode.model import Endpoint

SO_MARK = getattr(socket, "SO_MARK", 36)


class Dialer(Protocol):
    async def dial(self, ep: Endpoint, timeout: float) -> socket.socket:
        """A connected, non-blocking socket to `ep`; OSError or TimeoutError otherwise."""
        ...


class DirectDialer:
    def __init__(self, mark: int) -> None:
        self.mark = mark

    async def dial(self, ep: Endpoint, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self.mark:
                # Before connect: the capture hooks look at the mark when connect() runs.
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, ep.addr.pair())
        except BaseException:
            sock.close()
            raise
        return sock


class Dialers:
    """Chooses the dialer for each endpoint (local or remote node)."""

    def __init__(self, node: str, mark: int) -> None:
        self.node = node
        self.direct = DirectDialer(mark)

    def for_endpoint(self, ep: Endpoint) -> Dialer:
        # Remote endpoints (ep.node not ours) are plain TCP until the mTLS tunnel lands.
        return self.direct
