"""Connections queued for a proxy that no longer serves.

When every worker is dead, capture falls back: new connects of services allowed the kernel path
are balanced in the kernel (and, while a replacement is about to start, the other services'
connects queue for it in the listening socket, which the agent keeps a copy of). Connects
redirected in the instant before that flip are already established in that queue; left there
they would wait for the replacement, seconds in a crash loop. So once no service waits for a
replacement, the agent takes them: each one whose original destination belongs to a service
balanced in the kernel is relayed to an endpoint of that service's table, as the kernel would
have sent it; any other is reset at once (a reset lets the client retry now rather than time
out).

A bridge for a handful of connections, not a data plane: plain asyncio socket calls, one task
pair per connection, ending when both directions have. Runs in the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address

from meshnode.model import HostPort

__all__ = ["Stragglers"]

log = logging.getLogger(__name__)

Resolve = Callable[[IPv4Address, int], HostPort | None]
_CHUNK = 1 << 16
_CONNECT_TIMEOUT = 2.0


class Stragglers:
    """Takes what a listening socket has queued and relays or resets each connection."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.relayed = 0
        self.reset = 0

    def drain(self, listener: int, resolve: Resolve) -> int:
        """Accept every connection queued on `listener` (a descriptor this process holds a
        copy of; it is left open) and start relaying each to `resolve(client ip, port)` (None:
        reset it). Returns how many were taken."""
        sock = socket.socket(fileno=os.dup(listener))
        taken = 0
        try:
            sock.setblocking(False)  # the shared description: the workers' is non-blocking too
            while True:
                try:
                    conn, peer = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("taking a queued connection failed: %s", exc)
                    break
                taken += 1
                conn.setblocking(False)
                target = resolve(IPv4Address(peer[0]), peer[1])
                if target is None:
                    _reset(conn)
                    self.reset += 1
                    continue
                task = asyncio.ensure_future(self._relay(conn, target))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            sock.close()  # the duplicate only: `listener` stays open
        return taken

    async def _relay(self, client: socket.socket, target: HostPort) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    await loop.sock_connect(upstream, (str(target.ip), target.port))
            except (OSError, TimeoutError) as exc:
                log.info("queued connection: %s unreachable (%s): reset", target, exc)
                _reset(client)
                self.reset += 1
                return
            self.relayed += 1
            await asyncio.gather(_pump(loop, client, upstream), _pump(loop, upstream, client))
        finally:
            upstream.close()
            client.close()

    async def close(self) -> None:
        """Cut what is still being relayed (the agent is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _pump(loop: asyncio.AbstractEventLoop, src: socket.socket,
                dst: socket.socket) -> None:
    """Copy src to dst until src's EOF, then half-close dst's sending side."""
    try:
        while data := await loop.sock_recv(src, _CHUNK):
            await loop.sock_sendall(dst, data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _reset(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), not a FIN: the client must not take it for a reply."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
