"""The relay driven through fake transports: no sockets, no event loop unless a test needs one.

The fakes behave like asyncio/uvloop transports where it matters: `write` may keep a *view* of
the caller's buffer (uvloop does when the kernel does not take the whole write), the write
buffer size is whatever the test says, and `connection_lost` is called by the test, as the loop
would after close()/abort().
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshnode.proxy.flow_control import FlowControl
from meshnode.proxy.relay import BufferPool, Relay, RelayRegistry
from meshnode.proxy.stats import PairStats

pytestmark = pytest.mark.timeout(10)


class FakeTransport:
    def __init__(self, keep_views: bool = False) -> None:
        self.chunks: list[Any] = []
        self.keep_views = keep_views  # hold memoryviews like uvloop's pending write buffer
        self.buffered = 0
        self.eof_written = False
        self.reading = True
        self.closed = False
        self.aborted = False
        self.limits: tuple[int | None, int | None] | None = None

    @property
    def written(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks)

    def write(self, data: Any) -> None:
        assert not self.eof_written, "write after write_eof"
        assert not (self.closed or self.aborted), "write after close"
        self.chunks.append(data if self.keep_views else bytes(data))

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, connect_upstream: bool = True, buffer_size: int = 64,
                 keep_views: bool = False) -> None:
        self.clock = Clock()
        self.pool = BufferPool(size=buffer_size)
        self.registry = RelayRegistry(self.clock)
        self.sink = PairStats("client", "svc")
        self.stats = PairStats("client", "svc")
        self.accepted: list[Relay] = []
        self.relay = Relay(self.pool, self.registry, self._on_accept, self.sink)
        self.ct = FakeTransport()
        self.ut = FakeTransport(keep_views=keep_views)
        self.relay.client.connection_made(self.ct)  # type: ignore[arg-type]
        if connect_upstream:
            self.connect()

    def _on_accept(self, relay: Relay) -> None:
        relay.assign(self.stats)
        self.accepted.append(relay)

    def connect(self) -> None:
        self.relay.upstream.connection_made(self.ut)  # type: ignore[arg-type]

    def feed(self, side: Any, data: bytes) -> None:
        """What the loop does on readable: get_buffer, recv_into it, buffer_updated."""
        while data:
            buf = side.get_buffer(-1)
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            side.buffer_updated(n)

    def up(self, data: bytes) -> None:
        self.feed(self.relay.client, data)

    def down(self, data: bytes) -> None:
        self.feed(self.relay.upstream, data)


def test_bytes_flow_both_ways_and_are_counted() -> None:
    h = Harness()
    h.up(b"hello " * 50)
    h.down(b"world" * 7)
    assert h.ut.written == b"hello " * 50
    assert h.ct.written == b"world" * 7
    assert (h.relay.bytes_up, h.relay.bytes_down) == (300, 35)
    assert (h.stats.bytes_up, h.stats.bytes_down) == (300, 35)
    assert h.stats.active == 1 and h.sink.active == 0 and len(h.registry) == 1


def test_write_limits_are_set_on_both_sides() -> None:
    h = Harness()
    assert h.ct.limits is not None and h.ut.limits is not None


def test_backpressure_pauses_the_other_side_until_low_water() -> None:
    h = Harness()
    h.up(b"x" * 10)
    # The upstream's buffer passed high water: stop reading the client.
    h.ut.buffered = 10
    h.relay.upstream.pause_writing()
    assert not h.ct.reading and h.ut.reading
    h.ut.buffered = 0
    h.relay.upstream.resume_writing()
    assert h.ct.reading
    # And the other direction.
    h.relay.client.pause_writing()
    assert not h.ut.reading and h.ct.reading
    h.relay.client.resume_writing()
    assert h.ut.reading


def test_flow_control_is_idempotent() -> None:
    t = FakeTransport()
    f = FlowControl(t)  # type: ignore[arg-type]
    f.pause_reading()
    f.pause_reading()
    assert not t.reading
    f.resume_reading()
    assert t.reading
    t.reading = False  # someone else's pause is not ours to undo
    f.resume_reading()
    assert not t.reading


def test_a_buffer_the_transport_still_holds_is_never_overwritten() -> None:
    # The upstream keeps views of what it could not send; every later read must go elsewhere.
    h = Harness(keep_views=True)
    first = h.pool.current
    h.ut.buffered = 1  # the kernel did not take the write
    h.up(b"A" * 64)
    assert h.pool.current is not first
    h.up(b"B" * 64)
    h.up(b"C" * 64)
    assert h.ut.written == b"A" * 64 + b"B" * 64 + b"C" * 64
    # Once drained, the lent buffer comes back for reuse instead of being reallocated.
    h.ut.buffered = 0
    h.relay.upstream.resume_writing()
    assert h.relay.client.lent is None
    h.ut.buffered = 1
    h.up(b"D" * 64)
    assert h.ut.written.endswith(b"D" * 64)


def test_a_fully_written_read_keeps_the_buffer() -> None:
    h = Harness()
    first = h.pool.current
    h.up(b"x" * 200)
    assert h.pool.current is first  # no allocation on the fast path


def test_half_close_client_first() -> None:
    h = Harness()
    h.up(b"request")
    assert h.relay.client.eof_received() is True  # keep the transport open
    assert h.ut.eof_written and not h.ct.eof_written
    assert not (h.ct.closed or h.ut.closed)
    # The other direction still flows after the client's FIN.
    h.down(b"response")
    assert h.ct.written == b"response"
    assert h.relay.upstream.eof_received() is True
    # both directions done: close both; close() is the client's FIN (no shutdown call first)
    assert h.ct.closed and h.ut.closed and not (h.ct.aborted or h.ut.aborted)


def test_half_close_upstream_first() -> None:
    h = Harness()
    h.relay.upstream.eof_received()
    assert h.ct.eof_written and not h.ut.eof_written and not h.ct.closed
    h.up(b"late bytes")
    assert h.ut.written == b"late bytes"
    h.relay.client.eof_received()
    assert h.ct.closed and h.ut.closed and not (h.ct.aborted or h.ut.aborted)


def test_clean_close_finishes_the_relay() -> None:
    h = Harness()
    h.relay.client.eof_received()
    h.relay.upstream.eof_received()
    h.relay.client.connection_lost(None)
    assert len(h.registry) == 1  # the upstream is still closing
    h.relay.upstream.connection_lost(None)
    assert len(h.registry) == 0 and h.relay.finished
    assert h.stats.active == 0 and h.stats.connections == 0  # connections is the worker's count
    assert not h.ct.aborted and not h.ut.aborted


def test_reset_on_one_side_aborts_the_other() -> None:
    h = Harness()
    h.relay.client.connection_lost(ConnectionResetError())
    assert h.ut.aborted and not h.ut.closed
    h.relay.upstream.connection_lost(None)
    assert h.relay.finished and h.stats.active == 0

    h = Harness()
    h.relay.upstream.connection_lost(BrokenPipeError())
    assert h.ct.aborted


def test_bytes_before_the_upstream_connects_wait_and_reading_pauses() -> None:
    h = Harness(connect_upstream=False)
    assert h.accepted == [h.relay]
    h.up(b"early")
    assert not h.ct.reading  # the rest waits in the kernel
    h.up(b"-more")  # a read already in flight still lands
    h.relay.client.eof_received()
    h.connect()
    assert h.ut.written == b"early-more"
    assert h.ut.eof_written
    assert h.ct.reading
    assert h.relay.bytes_up == 10 and h.stats.bytes_up == 10


def test_client_gone_while_connecting_finishes_and_late_upstream_is_aborted() -> None:
    h = Harness(connect_upstream=False)
    h.relay.client.connection_lost(ConnectionResetError())
    assert h.relay.finished and len(h.registry) == 0 and h.stats.active == 0
    h.connect()
    assert h.ut.aborted


def test_connect_task_is_cancelled_when_the_client_goes() -> None:
    async def scenario() -> None:
        h = Harness(connect_upstream=False)
        task = asyncio.get_running_loop().create_task(asyncio.Event().wait())
        h.relay.connect_task = task  # type: ignore[assignment]
        h.relay.client.connection_lost(None)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_idle_sweep_uses_the_injected_clock_and_spares_busy_relays() -> None:
    h = Harness()
    busy = Harness()
    registry = h.registry
    registry.add(busy.relay)  # one registry, two relays
    registry.started(busy.relay)
    h.clock.now += 20
    assert registry.sweep(idle_timeout=30) == 0
    busy.up(b"ping")
    h.clock.now += 20  # 40 s idle for h, busy moved a byte since the last sweep
    assert registry.sweep(idle_timeout=30) == 1
    assert h.ct.closed and h.ut.closed
    assert not busy.ct.closed
    h.clock.now += 29
    assert registry.sweep(idle_timeout=30) == 0
    h.clock.now += 1
    assert registry.sweep(idle_timeout=30) >= 1
    assert busy.ct.closed


def test_idle_sweep_skips_relays_still_connecting() -> None:
    h = Harness(connect_upstream=False)
    h.clock.now += 1000
    assert h.registry.sweep(idle_timeout=1) == 0
    assert not h.ct.closed


def test_registry_reset_all_and_wait_empty() -> None:
    async def scenario() -> None:
        h = Harness()
        waiter = asyncio.ensure_future(h.registry.wait_empty())
        await asyncio.sleep(0)
        assert not waiter.done()
        assert h.registry.reset_all() == 1
        assert h.ct.aborted and h.ut.aborted
        h.relay.client.connection_lost(None)
        h.relay.upstream.connection_lost(None)
        await asyncio.wait_for(waiter, 5)

    asyncio.run(scenario())


def test_buffer_pool_keeps_a_bounded_number_of_spares() -> None:
    pool = BufferPool(size=8, keep=2)
    lent = [pool.lend() for _ in range(4)]
    for v in lent:
        pool.give_back(v)
    assert len(pool._free) == 2
    assert pool.lend() in lent
