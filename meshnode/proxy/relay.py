"""The L4 relay: one accepted client socket, one connected upstream socket, bytes both ways.

Owns: moving bytes between two non-blocking sockets on readiness callbacks (the worker's
`Poller`), half-close, reset propagation, per-direction byte counts, the worker's shared read
buffer (`BufferPool`), and the registry of open relays with its idle sweep and drain helpers.

Raw sockets, not uvloop transports and protocols: a transport per socket (two per connection)
costs an object graph, a weak reference, extra getsockname/getpeername calls and a loop round
trip to wrap the upstream socket, and the accept → connect → relay path then needs a Task per
connection. Measured on one worker under a connect-exchange-close load: 160-190 µs of user CPU
per connection with transports against about 50 µs for the bare relay; system time is the same.

Hot-path choices, each measured or forced by the kernel's behaviour:
- One worker-wide 256 KiB read buffer: `recv_into` it, `send` from it, no bytes object per read.
- Backpressure: when the kernel takes only part of a send, the rest waits (`Pipe.pending`) and
  the source is not read until the sink drains. User space holds at most one read per
  direction; the kernel's autotuned socket buffers and TCP flow control do the queueing, the
  way HAProxy and nginx relay. A large remainder keeps its read buffer ("lent": the pool hands
  out another one for the next reads) instead of being copied.
- The client is not read until the upstream is connected: its early bytes wait in the kernel,
  and are read as soon as it is, without waiting for the poller.
- Half-close: EOF from one side is passed on as shutdown(SHUT_WR) to the other (nothing can be
  pending then: a source is read only while its sink is drained); when both sides have sent
  EOF, both sockets are closed.
- A read or write error on either side (RST, EPIPE) resets both (SO_LINGER 0, then close), so
  no peer mistakes a cut-off stream for a clean end.
- Idle: a relay compares its byte total with the last sweep's; one periodic sweep per worker
  closes relays whose total has not moved for `idle_timeout` (no timer or clock call per read).
- A socket's registration ends with the socket (closing removes it from the epoll set); the
  handlers tolerate the stale event a reused descriptor can get within one batch.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshnode.proxy.poller import ERR, READ, WRITE, Poller
from meshnode.proxy.stats import PairStats

if TYPE_CHECKING:
    from meshnode.balance import Balancer, EndpointLoad
    from meshnode.proxy.telemetry import ConnInfo

__all__ = ["BUFFER_SIZE", "BufferPool", "Pipe", "Relay", "RelayRegistry", "reset_socket"]

BUFFER_SIZE = 256 * 1024
# A send remainder up to this size is copied out; a larger one keeps its buffer (lent).
COPY_LIMIT = 16 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN
_SHUT_WR = socket.SHUT_WR
_AGAIN = (BlockingIOError, InterruptedError)
_READABLE = READ | ERR  # an error or hang-up is read (or written) to learn what it is
_WRITABLE = WRITE | ERR


def reset_socket(sock: _socket.socket) -> None:
    """Close with a TCP RST, so the peer sees a reset instead of a clean end of stream."""
    with contextlib.suppress(OSError):  # already dead: closing is all that is left to do
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class BufferPool:
    """The worker's current read buffer, plus spares for when a pipe holds one."""

    __slots__ = ("_free", "_keep", "current", "size")

    def __init__(self, size: int = BUFFER_SIZE, keep: int = 32) -> None:
        self.size = size
        self._keep = keep
        self._free: list[memoryview] = []
        self.current = memoryview(bytearray(size))

    def lend(self) -> memoryview:
        """Hand over the current buffer (a pipe still holds bytes in it) and install another."""
        lent = self.current
        self.current = self._free.pop() if self._free else memoryview(bytearray(self.size))
        return lent

    def give_back(self, view: memoryview) -> None:
        if len(self._free) < self._keep:
            self._free.append(view)


class Pipe:
    """One direction of a relay: read `src`, write `dst`. Each pipe also owns its src socket's
    registration in the poller (`ready` is its handler), whose interest is READ while this pipe
    reads plus WRITE while the opposite pipe (whose dst is that socket) has bytes pending."""

    __slots__ = ("attached", "dst", "eof", "lent", "mask", "other", "pending", "poller",
                 "pool", "reading", "relay", "src", "src_fd")

    def __init__(self, relay: Relay, src: _socket.socket, dst: _socket.socket) -> None:
        self.relay = relay
        self.poller = relay.poller
        self.pool = relay.pool
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.pending: memoryview | bytes | None = None  # what dst has not taken yet
        self.lent: memoryview | None = None  # the pool buffer `pending` points into
        self.reading = True
        self.eof = False  # src sent its FIN (and dst was shut down for writing)
        self.mask = READ  # src's interest as registered
        self.attached = True  # src is in the poller's epoll set
        self.other: Pipe = self  # the opposite direction, linked by Relay.start

    def count(self, n: int) -> None:
        raise NotImplementedError

    def ready(self, events: int) -> None:
        """The poller's handler for src (which is also the opposite pipe's dst)."""
        relay = self.relay
        if events & _READABLE and self.reading:
            self.readable()
        other = self.other
        if events & _WRITABLE and other.pending is not None and not relay.finished:
            other.writable()
        elif events & ERR and self.eof and not relay.finished:
            # Read to its end and nothing to write to it: an error (its peer's RST) that
            # nobody else would notice, reported again on every poll until handled.
            if _sock_error(self.src):
                relay.reset()
            else:
                relay.close()

    def _sync(self) -> None:
        """Bring src's registration in line with what the two pipes want of it."""
        mask = (READ if self.reading else 0) | (WRITE if self.other.pending is not None else 0)
        if mask == self.mask:
            return
        self.mask = mask
        poller = self.poller
        if not mask and not self.eof:
            # Paused for backpressure with nothing to write to it either: out of the set
            # until resumed. Its peer's FIN after our own shutdown is a hang-up, reported on
            # every poll, while the last bytes still wait in its receive queue for us.
            poller.detach(self.src_fd)
            self.attached = False
        elif not self.attached:
            poller.attach(self.src_fd, mask)
            self.attached = True
        else:
            poller.modify(self.src_fd, mask)

    def readable(self) -> None:
        buf = self.pool.current
        try:
            n = self.src.recv_into(buf)
        except _AGAIN:
            return
        except OSError:
            self.relay.reset()
            return
        if not n:
            self._eof()
            return
        self.count(n)
        try:
            sent = self.dst.send(buf[:n])
        except _AGAIN:
            sent = 0
        except OSError:
            self.relay.reset()
            return
        if sent < n:
            self._hold(buf, sent, n)

    def _hold(self, buf: memoryview, sent: int, n: int) -> None:
        """dst took `sent` of `n` bytes: keep the rest and stop reading src until it drains."""
        if n - sent <= COPY_LIMIT:
            self.pending = bytes(buf[sent:n])
        else:
            self.lent = self.pool.lend()  # == buf: the next reads must go elsewhere
            self.pending = buf[sent:n]
        self.reading = False
        self._sync()
        self.other._sync()  # its src is our dst: now wanted writable

    def writable(self) -> None:
        pending = self.pending
        assert pending is not None  # called only while something is pending
        try:
            sent = self.dst.send(pending)
        except _AGAIN:
            return
        except OSError:
            self.relay.reset()
            return
        if sent < len(pending):
            self.pending = pending[sent:]
            return
        self._drained()

    def _drained(self) -> None:
        """dst took everything pending: read src again."""
        self.pending = None
        if self.lent is not None:
            self.pool.give_back(self.lent)
            self.lent = None
        self.reading = True
        self._sync()
        self.other._sync()

    def _eof(self) -> None:
        self.eof = True
        self.reading = False
        relay = self.relay
        if self.other.eof:
            relay.close()  # both directions finished: close sends the last FIN itself
            return
        self._sync()
        try:
            self._shut()  # half-close: the other direction keeps flowing
        except OSError:
            relay.reset()

    def _shut(self) -> None:
        self.dst.shutdown(_SHUT_WR)


class _Up(Pipe):
    __slots__ = ()

    def count(self, n: int) -> None:
        relay = self.relay
        relay.bytes_up += n
        relay.stats.bytes_up += n


class _Down(Pipe):
    __slots__ = ()

    def count(self, n: int) -> None:
        relay = self.relay
        relay.bytes_down += n
        relay.stats.bytes_down += n


def _sock_error(sock: _socket.socket) -> int:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as exc:
        return exc.errno or 1


class Relay:
    """One proxied connection. The worker makes it for each accepted client socket, connects
    an upstream (`connecting` holds that attempt's cancel hook meanwhile), then `start`s it."""

    __slots__ = ("balancer", "bytes_down", "bytes_up", "client", "connecting", "down",
                 "finished", "idle_limit", "idle_since", "info", "outcome", "poller", "pool",
                 "registry", "seen", "started", "stats", "token", "up", "upstream")

    def __init__(self, poller: Poller, pool: BufferPool, registry: RelayRegistry,
                 client: _socket.socket, stats: PairStats, info: ConnInfo | None = None) -> None:
        self.poller = poller
        self.pool = pool
        self.registry = registry
        self.client = client
        self.stats = stats
        self.upstream: _socket.socket | None = None
        self.up: Pipe | None = None
        self.down: Pipe | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        # While an upstream connect is in flight: how to abandon it (client gone, drain).
        self.connecting: Callable[[], None] | None = None
        self.started = False
        self.finished = False
        self.seen = 0
        self.idle_since = 0.0
        self.idle_limit: float | None = None  # the service's idle timeout (None: the worker's)
        # The balancer told of this connection's upstream (its in-flight count) and the token
        # it handed out: told `on_done` once, when the relay finishes.
        self.balancer: Balancer | None = None
        self.token: EndpointLoad | None = None
        # How it ended: "ok" (closed by either end), "reset", "idle_timeout", "drain", or
        # what the worker set when it refused the client (no_endpoint, refused, timeout, ...).
        self.outcome = "ok"
        # The worker's record of this connection (source, destination, endpoint, times) for
        # telemetry; the relay only carries it to RelayRegistry.on_finish.
        self.info = info
        registry.add(self)

    def hold(self, balancer: Balancer, token: EndpointLoad) -> None:
        """The upstream connection counts as in flight on `token` until the relay ends."""
        self.balancer = balancer
        self.token = token

    def release(self) -> None:
        balancer, token = self.balancer, self.token
        if balancer is not None and token is not None:
            self.balancer = self.token = None
            balancer.on_done(token)

    def start(self, upstream: _socket.socket,
              pipes: tuple[type[Pipe], type[Pipe]] | None = None) -> None:
        """The upstream answered: relay both ways. `pipes`: the (up, down) pipe classes, when
        a side is not a plain socket (proxy/tlspipe.py)."""
        self.connecting = None
        self.upstream = upstream
        up_cls, down_cls = pipes or (_Up, _Down)
        self.up = up = up_cls(self, self.client, upstream)
        self.down = down = down_cls(self, upstream, self.client)
        up.other, down.other = down, up
        self.started = True
        self.registry.started(self)
        poller = self.poller
        poller.register(up.src_fd, READ, up.ready)
        poller.register(down.src_fd, READ, down.ready)
        # A client usually speaks first and has by now (its connect returned before we even
        # accepted): read it at once instead of waiting for the poller to say so, as HAProxy
        # does. Nothing there (a server-first protocol) costs one EAGAIN.
        up.readable()

    def close(self) -> None:
        """Close both sides cleanly: FIN after whatever the kernel still holds to send."""
        self._finish(False)

    def reset(self) -> None:
        """Reset both sides (RST) and abandon a connect in flight. A read or write error on
        either side ends here too: the reset is passed on to the other."""
        if self.outcome == "ok":
            self.outcome = "reset"
        self._finish(True)

    def _finish(self, rst: bool) -> None:
        if self.finished:
            return
        self.finished = True
        if self.connecting is not None:
            cancel, self.connecting = self.connecting, None
            cancel()
        for pipe in (self.up, self.down):
            if pipe is not None:
                self.poller.forget(pipe.src_fd)  # closing leaves the epoll set
                pipe.pending = pipe.lent = None
        for sock in (self.client, self.upstream):
            if sock is not None:
                if rst:
                    reset_socket(sock)
                else:
                    sock.close()
        self.release()
        self.registry.discard(self)


class RelayRegistry:
    """Open relays: the `active` gauge, the idle sweep, and the drain at shutdown."""

    def __init__(self, clock: Callable[[], float],
                 on_finish: Callable[[Relay], None] = lambda relay: None) -> None:
        self._clock = clock
        self._relays: set[Relay] = set()
        self._empty: asyncio.Future[None] | None = None
        self.on_finish = on_finish  # called once per relay, when it has ended

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
        """Close relays that moved no byte for their service's idle timeout, or
        `idle_timeout`; returns how many."""
        now = self._clock()
        idle = []
        for r in self._relays:
            if not r.started or r.finished:
                continue  # connecting (bounded by the connect timeout) or already closed
            total = r.bytes_up + r.bytes_down
            if total != r.seen:
                r.seen = total
                r.idle_since = now
            elif now - r.idle_since >= (r.idle_limit or idle_timeout):
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

    def close_all(self) -> int:
        """The end of a drain: relays with nothing held in flight close cleanly (FIN both
        ways, after what the kernel still holds: the peers see an orderly end); the rest, a
        connect in flight or bytes not yet taken by a peer, are reset so that no client
        mistakes a cut for an end. Returns how many closed cleanly."""
        clean = 0
        for r in list(self._relays):
            if r.outcome == "ok":
                r.outcome = "drain"
            if r.started and r.up is not None and r.down is not None \
                    and r.up.pending is None and r.down.pending is None:
                r.close()
                clean += 1
            else:
                r.reset()
        return clean

    def reset_all(self) -> int:
        relays = list(self._relays)
        for r in relays:
            if r.outcome == "ok":
                r.outcome = "drain"
            r.reset()
        return len(relays)
