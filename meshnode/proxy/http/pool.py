"""Keep-alive connections to endpoints, per worker: idle ones waiting for the next request,
keyed by (endpoint address, source identity) — a connection through the mTLS tunnel presents
its source service's certificate, so it serves only that source.

`UpstreamPool.get` hands out an idle connection (newest first: the warmest, and the oldest
age out), or dials a new one while the endpoint has fewer than `max_connections`; past that the
request waits for one to come back (at most `max_pending` waiting per endpoint; more are
refused at once: circuit breaking). A connection returns with `release`, or leaves with
`discard` (closed, failed, or not reusable). `sweep` closes connections idle longer than the
service's idle timeout; the worker calls it periodically.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from meshnode.model import HostPort

__all__ = ["PoolFull", "Pooled", "UpstreamPool"]

Key = tuple[HostPort, str]


class Pooled(Protocol):
    """What the pool needs of a connection."""

    closed: bool
    idle_since: float

    def close(self) -> None: ...


C = TypeVar("C", bound=Pooled)


class PoolFull(Exception):
    """More requests wait for this endpoint than `max_pending`."""


class _Slot(Generic[C]):
    __slots__ = ("dialing", "idle", "live", "waiters")

    def __init__(self) -> None:
        self.idle: list[C] = []
        # Connections made and not discarded (idle or busy): membership, not a count, so a
        # connection dropped twice (closed by the sweep, then its connection_lost) counts once.
        self.live: set[C] = set()
        self.dialing = 0
        self.waiters: deque[asyncio.Future[C | None]] = deque()

    @property
    def open(self) -> int:
        return len(self.live) + self.dialing


class UpstreamPool(Generic[C]):
    __slots__ = ("_clock", "_slots")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._slots: dict[Key, _Slot[C]] = {}

    def idle(self, key: Key) -> C | None:
        """An idle connection for `key`, without waiting (the per-request fast path)."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        idle = slot.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            slot.live.discard(conn)
        return None

    async def get(self, key: Key, dial: Callable[[], Awaitable[C]], max_connections: int,
                  max_pending: int) -> C:
        """An idle connection, a new one, or (at `max_connections`) the next one released."""
        conn = self.idle(key)
        if conn is not None:
            return conn
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        while max_connections and slot.open >= max_connections:
            if len(slot.waiters) >= max_pending:
                raise PoolFull(f"{len(slot.waiters)} requests wait for {key[0]}")
            fut: asyncio.Future[C | None] = asyncio.get_running_loop().create_future()
            slot.waiters.append(fut)
            try:
                got = await fut
            finally:
                if not fut.done():
                    fut.cancel()
                with contextlib.suppress(ValueError):
                    slot.waiters.remove(fut)
            if got is not None and not got.closed:
                return got
            # None: a connection was discarded, making room to dial one
        slot.dialing += 1
        try:
            conn = await dial()
        except BaseException:
            slot.dialing -= 1
            self._wake(key, slot)
            raise
        slot.dialing -= 1
        slot.live.add(conn)
        return conn

    def release(self, key: Key, conn: C) -> None:
        """A connection finished its request and can take another."""
        slot = self._slots.get(key)
        if slot is None or conn not in slot.live or conn.closed:
            conn.close()  # discarded meanwhile: not the pool's any more
            return
        while slot.waiters:
            fut = slot.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        conn.idle_since = self._clock()
        slot.idle.append(conn)

    def discard(self, key: Key, conn: C) -> None:
        """A connection that will not come back (closed, failed, not reusable); a second
        discard of the same connection changes nothing."""
        slot = self._slots.get(key)
        if slot is None or conn not in slot.live:
            return
        slot.live.remove(conn)
        if conn in slot.idle:
            slot.idle.remove(conn)
        self._wake(key, slot)

    def _wake(self, key: Key, slot: _Slot[C]) -> None:
        """Room for one more connection: the first waiter dials it."""
        while slot.waiters:
            fut = slot.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        if not slot.open and not slot.waiters:
            del self._slots[key]

    def sweep(self, idle_for: Callable[[C], float]) -> int:
        """Close connections idle longer than `idle_for(connection)` seconds; how many."""
        now = self._clock()
        closed = 0
        for key, slot in list(self._slots.items()):
            keep = [c for c in slot.idle if not c.closed and now - c.idle_since < idle_for(c)]
            for c in slot.idle:
                if c not in keep:
                    closed += 1
                    slot.live.discard(c)
                    c.close()
            slot.idle = keep
            if not slot.open and not slot.waiters:
                del self._slots[key]
        return closed

    def close_all(self) -> None:
        for slot in self._slots.values():
            for c in slot.idle:
                c.close()
            for fut in slot.waiters:
                if not fut.done():
                    fut.cancel()
        self._slots.clear()

    def open_count(self, addr: HostPort) -> int:
        return sum(s.open for (a, _), s in self._slots.items() if a == addr)
