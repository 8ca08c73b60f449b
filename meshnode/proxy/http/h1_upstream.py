"""HTTP/1.1 to an endpoint: `H1Upstream` is one keep-alive connection, pooled by
proxy/http/pool.py, that carries one h1_exchange.Exchange at a time and hands it what the
endpoint sends.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshnode.proxy.http.front import HttpFront
    from meshnode.proxy.http.h1_exchange import Exchange

__all__ = ["H1Upstream"]


class H1Upstream(asyncio.Protocol):
    """One keep-alive connection to an endpoint; it serves one Exchange at a time."""

    __slots__ = ("closed", "exchange", "front", "identity", "idle_limit", "idle_since", "key",
                 "paused", "transport")

    def __init__(self, front: HttpFront, key: tuple[Any, str]) -> None:
        self.front = front
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self.paused = False
        self.identity = ""
        self.idle_limit = 300.0  # the service's http.timeouts.idle, set when dialed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes nobody asked for: the connection is not reusable
            return
        ex.upstream_data(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex, self.exchange = self.exchange, None
        self.front.pool.discard(self.key, self)
        if ex is not None:
            ex.upstream_lost(exc)

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.down.pause("upstream")

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.down.resume("upstream")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
