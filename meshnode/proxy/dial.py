"""Dialing an endpoint: how the proxy reaches the address the balancer chose.

`DirectDialer` opens plain TCP (with the proxy's SO_MARK, so capture never loops it back).
`Dialers.for_endpoint` is the one place that decides per endpoint: today every endpoint is
dialed directly; endpoints on another node will go through the mutual-TLS tunnel to that
node's agent (DESIGN flow 4) by returning a tunnel dialer here, leaving the balancing,
failover and relay code untouched. Must not import bcc, pyroute2 or the agent.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Protocol

from meshnode.model import Endpoint

SO_MARK = getattr(socket, "SO_MARK", 36)


class Dialer(Protocol):
    async def dial(self, ep: Endpoint, timeout: float) -> socket.socket:
        """A connected, non-blocking socket to `ep`; OSError or TimeoutError otherwise."""
        ...


class DirectDialer:
    """A non-blocking connect(2), then, only if the handshake is still under way, a wait for
    the socket to turn writable. Not the loop's `sock_connect`: uvloop's resolves even a
    numeric address in its thread pool first, which tripled the cost of a connect here.
    Toward loopback and nearby hosts the kernel usually completes the handshake inside
    connect() itself, and `getpeername` says so without a trip through the event loop."""

    def __init__(self, mark: int) -> None:
        self.mark = mark

    async def dial(self, ep: Endpoint, timeout: float) -> socket.socket:
        # Non-blocking from birth (no FIONBIO call); uvloop sets TCP_NODELAY when it wraps it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            if self.mark:
                # Before connect: the capture hooks look at the mark when connect() runs.
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            err = sock.connect_ex(ep.addr.pair())
            if err == errno.EINPROGRESS:
                try:
                    sock.getpeername()  # ENOTCONN while the handshake is under way
                except OSError:
                    await _connected(sock, timeout)
            elif err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return sock


async def _connected(sock: socket.socket, timeout: float) -> None:
    """Wait for a connect in progress to finish; OSError with its errno, or TimeoutError."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, done.set_result, None)
    timer = loop.call_later(timeout, _expire, done, timeout)
    try:
        await done
    finally:
        timer.cancel()
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _expire(done: asyncio.Future[None], timeout: float) -> None:
    if not done.done():
        done.set_exception(TimeoutError(f"connect timed out after {timeout}s"))


class Dialers:
    """Chooses the dialer for each endpoint (local or remote node)."""

    def __init__(self, node: str, mark: int) -> None:
        self.node = node
        self.direct = DirectDialer(mark)

    def for_endpoint(self, ep: Endpoint) -> Dialer:
        # Remote endpoints (ep.node not ours) are plain TCP until the mTLS tunnel lands.
        return self.direct
