"""HTTP/2 connections to endpoints, shared by many requests at once, per worker; and the one
write per event-loop pass that every HTTP/2 connection's frames go out in.

`H2Pool` keys connections like the HTTP/1.1 pool, by (endpoint address, source identity): a
connection through the mTLS tunnel presents its source's certificate, so it carries only that
source's requests. Unlike HTTP/1.1 a connection takes many requests at a time, each on its own
stream, up to the endpoint's SETTINGS_MAX_CONCURRENT_STREAMS (and the proxy's own cap).
`ready(key)` is the fast path: a connection with a free stream, now. `get` waits: for the dial
in flight when there is one (a burst of requests to a new endpoint shares one connection rather
than dialing one each), else dials another connection while the endpoint has fewer than
`max_connections`; past that the request waits for a stream to free up (at most `max_pending`
waiting per endpoint; more are refused at once: circuit breaking). A connection that received
GOAWAY, or ran out of stream ids, takes no new streams (`retire`) and closes once its streams
end. `sweep` closes connections with no stream for longer than their idle limit.

`WriteBatch`: handlers change a connection's h2 state as events come (one client DATA frame can
touch its own connection and an endpoint's), then `mark` it; the frames of every marked
connection go out in one transport write each, at the end of the loop pass. A burst of
requests read in one `data_received` becomes one write per endpoint connection, not one per
request.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from meshnode.proxy.http.dial import DialError
from meshnode.proxy.http.pool import PoolFull

__all__ = ["H2Pool", "Multiplexed", "WriteBatch"]

Key = tuple[Any, str]


class Flushable(Protocol):
    dirty: bool

    def flush(self) -> None: ...


class WriteBatch:
    __slots__ = ("_loop", "_pending", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[Flushable] = []
        self._scheduled = False

    def mark(self, conn: Flushable) -> None:
        """`conn` has frames to send: they go out at the end of this loop pass."""
        if conn.dirty:
            return
        conn.dirty = True
        self._pending.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for conn in pending:
            conn.dirty = False
            conn.flush()


class Multiplexed(Protocol):
    """What the pool needs of a connection."""

    key: Key
    closed: bool
    retired: bool
    error: str  # why it closed, when the peer broke the protocol
    idle_since: float
    idle_limit: float

    def capacity(self) -> int: ...

    def active(self) -> int: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Multiplexed)


class _Slot(Generic[C]):
    __slots__ = ("conns", "dial", "waiters")

    def __init__(self) -> None:
        self.conns: list[C] = []  # open connections, retired ones included until they close
        self.dial: asyncio.Task[C] | None = None  # the connection being dialed
        self.waiters: deque[asyncio.Future[None]] = deque()  # requests waiting for a stream


class H2Pool(Generic[C]):
    __slots__ = ("_clock", "_slots", "writes")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._slots: dict[Key, _Slot[C]] = {}
        self.writes = WriteBatch(loop)

    def ready(self, key: Key) -> C | None:
        """A connection for `key` with a free stream now (the first: requests fill one
        connection before the next is used, so few connections stay warm)."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        for conn in slot.conns:
            if conn.capacity() > 0:
                return conn
        return None

    async def get(self, key: Key, dial: Callable[[], Awaitable[C]], max_connections: int,
                  max_pending: int) -> C:
        """A connection for `key` with a free stream: one open, the one being dialed, a new
        one, or (at `max_connections`) the first to free a stream."""
        while True:
            conn = self.ready(key)
            if conn is not None:
                return conn
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
            if slot.dial is None and (not max_connections or len(slot.conns) < max_connections):
                slot.dial = asyncio.get_running_loop().create_task(self._dial(key, slot, dial))
                slot.dial.add_done_callback(_retrieve)
            if slot.dial is not None:
                # Shielded: a request that gives up does not cancel the dial the others share.
                await asyncio.shield(slot.dial)
                continue
            if len(slot.waiters) >= max_pending:
                raise PoolFull(f"{len(slot.waiters)} requests wait for a stream to {key[0]}")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            slot.waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
                with contextlib.suppress(ValueError):
                    slot.waiters.remove(fut)

    async def _dial(self, key: Key, slot: _Slot[C], dial: Callable[[], Awaitable[C]]) -> C:
        try:
            conn = await dial()
        finally:
            slot.dial = None
        if conn.closed:
            if conn.error:
                raise DialError("upstream_error", conn.error)
            raise DialError("reset", f"{key[0]} closed the connection at once")
        slot.conns.append(conn)
        self._slots.setdefault(key, slot)
        return conn

    def stream_done(self, conn: C) -> None:
        """A stream of `conn` ended: a waiting request may take its place."""
        if not conn.active():
            conn.idle_since = self._clock()
        slot = self._slots.get(conn.key)
        if slot is not None:
            self._wake(slot)

    def retire(self, conn: C) -> None:
        """`conn` takes no new streams (GOAWAY, stream ids running out): waiting requests may
        dial a replacement."""
        conn.retired = True
        slot = self._slots.get(conn.key)
        if slot is not None:
            self._wake(slot, everyone=True)

    def discard(self, conn: C) -> None:
        """`conn` closed."""
        slot = self._slots.get(conn.key)
        if slot is None:
            return
        if conn in slot.conns:
            slot.conns.remove(conn)
        self._wake(slot, everyone=True)
        if not slot.conns and slot.dial is None and not slot.waiters:
            del self._slots[conn.key]

    @staticmethod
    def _wake(slot: _Slot[C], everyone: bool = False) -> None:
        while slot.waiters:
            fut = slot.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if not everyone:
                    return

    def sweep(self) -> int:
        """Close connections without a stream for longer than their idle limit; how many."""
        now = self._clock()
        stale = [c for slot in self._slots.values() for c in slot.conns
                 if not c.active() and now - c.idle_since >= c.idle_limit]
        for conn in stale:
            conn.close()  # its connection_lost discards it
        return len(stale)

    def close_all(self) -> None:
        for slot in list(self._slots.values()):
            if slot.dial is not None:
                slot.dial.cancel()
            for fut in slot.waiters:
                if not fut.done():
                    fut.cancel()
            for conn in list(slot.conns):
                conn.close()
        self._slots.clear()

    def open_count(self, addr: Any) -> int:
        return sum(len(s.conns) for (a, _), s in self._slots.items() if a == addr)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A dial every waiter gave up on still fails quietly (its waiters got the error)."""
    if not task.cancelled():
        task.exception()
