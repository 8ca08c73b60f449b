"""The L4 relay: one accepted client, one upstream, bytes both ways.

Owns: the two protocols of a proxied connection (`Relay.client`, `Relay.upstream`), half-close,
reset propagation, per-direction byte counts, the worker's shared read buffer (`BufferPool`),
and the registry of open relays with its idle sweep and drain helpers.

Hot-path choices, each measured or forced by uvloop's behaviour:
- `asyncio.BufferedProtocol`: the kernel reads straight into one worker-wide 256 KiB buffer and
  the bytes are written on from there; no bytes object per read.
- A transport keeps a reference into the buffer when the kernel does not take a whole write. That
  buffer is then "lent": the pool hands out another one for the next read, and the lent buffer
  comes back when the transport has drained (`resume_writing` with an empty write buffer).
- Backpressure (flow_control.py): a side whose write buffer fills pauses reading on the other.
- Idle: a relay compares its byte total with the last sweep's; one periodic sweep per worker
  closes relays whose total has not moved for `idle_timeout` (no timer or clock call per read).
- uvloop starts reading right after `connection_made`, so a client cannot be paused before its
  first read: bytes that arrive while the upstream connect is in flight are kept once (`pending`)
  and reading is paused until the upstream answers.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from meshnode.proxy.flow_control import HIGH_WATER, LOW_WATER, FlowControl
from meshnode.proxy.stats import PairStats

if TYPE_CHECKING:
    from meshnode.balance import Balancer, EndpointLoad
    from meshnode.proxy.telemetry import ConnInfo

__all__ = ["BUFFER_SIZE", "BufferPool", "Relay", "RelayRegistry", "reset"]

BUFFER_SIZE = 256 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


def reset(transport: asyncio.Transport) -> None:
    """Close with a TCP RST, so the peer sees a reset instead of a clean end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Already closed: abort() below is all that is left to do.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class BufferPool:
    """The worker's current read buffer, plus spares for when a transport holds one."""

    __slots__ = ("_free", "_keep", "current", "size")

    def __init__(self, size: int = BUFFER_SIZE, keep: int = 32) -> None:
        self.size = size
        self._keep = keep
        self._free: list[memoryview] = []
        self.current = memoryview(bytearray(size))

    def lend(self) -> memoryview:
        """Hand over the current buffer (a transport still references it) and install another."""
        lent = self.current
        self.current = self._free.pop() if self._free else memoryview(bytearray(self.size))
        return lent

    def give_back(self, view: memoryview) -> None:
        if len(self._free) < self._keep:
            self._free.append(view)


class _Side(asyncio.BufferedProtocol):
    """One socket of a relay. `out` is the other side's transport, set once both exist."""

    __slots__ = ("flow", "lent", "lost", "out", "peer", "pool", "read_eof", "relay", "transport")

    def __init__(self, relay: Relay, pool: BufferPool) -> None:
        self.relay = relay
        self.pool = pool
        self.peer: _Side = self  # replaced by Relay.__init__
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.out: asyncio.Transport | None = None
        self.lent: memoryview | None = None
        self.read_eof = False
        self.lost = False

    def _attach(self, transport: asyncio.BaseTransport) -> asyncio.Transport:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.flow = FlowControl(transport)
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        return transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.current

    def _forward(self, out: asyncio.Transport, nbytes: int) -> None:
        out.write(self.pool.current[:nbytes])
        if out.get_write_buffer_size():
            # The transport kept (part of) the write as a view into our buffer; the next read
            # must not overwrite it.
            self.lent = self.pool.lend()

    # Flow control: our transport's write buffer is what the peer's reads fill.
    def pause_writing(self) -> None:
        flow = self.peer.flow
        if flow is not None:
            flow.pause_reading()

    def resume_writing(self) -> None:
        src = self.peer
        if src.lent is not None and self.transport is not None \
                and not self.transport.get_write_buffer_size():
            self.pool.give_back(src.lent)
            src.lent = None
        if src.flow is not None:
            src.flow.resume_reading()

    def eof_received(self) -> bool:
        self.read_eof = True
        out = self.out
        if out is None:
            return True  # upstream not connected yet: Relay.start passes the EOF on
        if self.peer.read_eof:
            self.relay.close()  # both directions finished: close sends the last FIN itself
        elif not out.is_closing():
            out.write_eof()  # half-close: the other direction keeps flowing
        return True  # keep the transport: we still write the other direction to it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lent = None
        if exc is not None and self.relay.outcome == "ok":
            self.relay.outcome = "reset"
        peer = self.peer
        if peer.transport is not None and not peer.lost:
            if exc is None:
                peer.transport.close()  # we closed this side; let the other flush and close
            else:
                reset(peer.transport)  # reset or error: pass the reset on
        self.relay._side_lost()


class _ClientSide(_Side):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)
        relay = self.relay
        relay.registry.add(relay)
        relay.on_accept(relay)

    def buffer_updated(self, nbytes: int) -> None:
        out = self.out
        relay = self.relay
        if out is None:
            # Upstream still connecting: keep these bytes, leave the rest in the kernel.
            if relay.pending is None:
                relay.pending = bytearray(self.pool.current[:nbytes])
            else:
                relay.pending += self.pool.current[:nbytes]
            assert self.flow is not None
            self.flow.pause_reading()
            return
        self._forward(out, nbytes)
        relay.bytes_up += nbytes
        relay.stats.bytes_up += nbytes


class _UpstreamSide(_Side):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = self._attach(transport)
        relay = self.relay
        if relay.finished or relay.client.lost:
            t.abort()  # the client went away while we connected
            return
        relay.start()

    def buffer_updated(self, nbytes: int) -> None:
        out = self.out
        assert out is not None  # reading starts only after Relay.start linked both sides
        self._forward(out, nbytes)
        relay = self.relay
        relay.bytes_down += nbytes
        relay.stats.bytes_down += nbytes


class Relay:
    """One proxied connection. The worker creates it per accepted socket (`client` is the
    server protocol), routes it in `on_accept`, then connects `upstream`."""

    __slots__ = ("balancer", "bytes_down", "bytes_up", "client", "closing", "connect_task",
                 "finished", "idle_since", "info", "on_accept", "outcome", "pending",
                 "registry", "seen", "started", "stats", "token", "upstream")

    def __init__(self, pool: BufferPool, registry: RelayRegistry,
                 on_accept: Callable[[Relay], None], stats: PairStats) -> None:
        self.registry = registry
        self.on_accept = on_accept
        self.stats = stats
        self.client = _ClientSide(self, pool)
        self.upstream = _UpstreamSide(self, pool)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.bytes_up = 0
        self.bytes_down = 0
        self.pending: bytearray | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.started = False
        self.closing = False
        self.finished = False
        self.seen = 0
        self.idle_since = 0.0
        # The balancer told of this connection's upstream (its in-flight count) and the token
        # it handed out: told `on_done` once, when the relay finishes.
        self.balancer: Balancer | None = None
        self.token: EndpointLoad | None = None
        # How it ended: "ok" (closed by either end), "reset", "idle_timeout", "drain", or
        # what the worker set when it refused the client (no_endpoint, refused, timeout, ...).
        self.outcome = "ok"
        # The worker's record of this connection (source, destination, endpoint, times) for
        # telemetry; the relay only carries it to RelayRegistry.on_finish.
        self.info: ConnInfo | None = None

    def hold(self, balancer: Balancer, token: EndpointLoad) -> None:
        """The upstream connection counts as in flight on `token` until the relay ends."""
        self.balancer = balancer
        self.token = token
        if self.finished:
            self.release()  # the client left while we connected: nothing will end it later

    def release(self) -> None:
        balancer, token = self.balancer, self.token
        if balancer is not None and token is not None:
            self.balancer = self.token = None
            balancer.on_done(token)

    def assign(self, stats: PairStats) -> None:
        """Count this relay under `stats` from now on (moves the `active` gauge with it)."""
        self.stats.active -= 1
        stats.active += 1
        self.stats = stats

    def start(self) -> None:
        """Both sides exist: link them and let the client's bytes flow."""
        client, upstream = self.client, self.upstream
        assert client.transport is not None and upstream.transport is not None
        client.out = upstream.transport
        upstream.out = client.transport
        self.started = True
        self.registry.started(self)
        assert client.flow is not None
        # Resume before writing what we kept: if that write fills the upstream buffer, its
        # pause_writing must be the last word.
        client.flow.resume_reading()
        if self.pending is not None:
            n = len(self.pending)
            upstream.transport.write(self.pending)  # ours alone from here: no copy needed
            self.pending = None
            self.bytes_up += n
            self.stats.bytes_up += n
        if client.read_eof:
            upstream.transport.write_eof()

    def close(self) -> None:
        """Close both sides cleanly (FIN after what is buffered)."""
        self.closing = True
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.lost:
                side.transport.close()

    def reset(self) -> None:
        """Reset both sides (RST) and stop connecting."""
        if self.outcome == "ok":
            self.outcome = "reset"
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.lost:
                reset(side.transport)

    def _side_lost(self) -> None:
        if self.finished or not self.client.lost:
            return
        if self.upstream.transport is not None and not self.upstream.lost:
            return
        self.finished = True
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        self.release()
        self.registry.discard(self)


class RelayRegistry:
    """Open relays: the `active` gauge, the idle sweep, and the drain at shutdown."""

    def __init__(self, clock: Callable[[], float],
                 on_finish: Callable[[Relay], None] = lambda relay: None) -> None:
        self._clock = clock
        self._relays: set[Relay] = set()
        self._empty: asyncio.Future[None] | None = None
        self.on_finish = on_finish  # called once per relay, when both sides are gone

    def __len__(self) -> int:
        return len(self._relays)

    def add(self, relay: Relay) -> None:
        self._relays.add(relay)
        relay.stats.active += 1

    def started(self, relay: Relay) -> None:
        relay.seen = relay.bytes_up + relay.bytes_down
        relay.idle_since = self._clock()

    def discard(self, relay: Relay) -> None:
        if relay in self._relays:
            self._relays.remove(relay)
            relay.stats.active -= 1
            relay.stats.closed += 1
            self.on_finish(relay)
        if not self._relays and self._empty is not None and not self._empty.done():
            self._empty.set_result(None)

    def sweep(self, idle_timeout: float) -> int:
        """Close relays that moved no byte for `idle_timeout`; returns how many."""
        now = self._clock()
        idle = []
        for r in self._relays:
            if not r.started or r.closing or r.finished:
                continue  # connecting (bounded by the connect timeout) or already closing
            total = r.bytes_up + r.bytes_down
            if total != r.seen:
                r.seen = total
                r.idle_since = now
            elif now - r.idle_since >= idle_timeout:
                idle.append(r)
        for r in idle:
            r.outcome = "idle_timeout"
            r.close()
        return len(idle)

    async def wait_empty(self) -> None:
        if not self._relays:
            return
        if self._empty is None or self._empty.done():
            self._empty = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._empty)

    def reset_all(self) -> int:
        relays = list(self._relays)
        for r in relays:
            if r.outcome == "ok":
                r.outcome = "drain"
            r.reset()
        return len(relays)
