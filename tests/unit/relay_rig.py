"""A uvloop loop in a background thread with the worker's data-plane parts (poller, buffer
pool, relay registry), and relays between real loopback sockets the test holds: the relay and
connector tests drive it. Relay state belongs to the loop thread: read it through `call`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from meshnode.proxy.poller import Poller
from meshnode.proxy.relay import BufferPool, Relay, RelayRegistry
from meshnode.proxy.stats import PairStats

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback: (the connecting end, the accepted end)."""
    outer = socket.create_connection(listener.getsockname(), timeout=5)
    inner, _ = listener.accept()
    outer.settimeout(5)
    return outer, inner


class Rig:
    """A loop thread with a poller, a pool and a registry, and relays between test sockets."""

    def __init__(self, buffer_size: int = 64 * 1024) -> None:
        self.clock = Clock()
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = BufferPool(size=buffer_size)
        self.finished: list[Relay] = []
        self.registry = RelayRegistry(self.clock, self.finished.append)
        self.poller: Poller = self.call(lambda: Poller(self.loop))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stats = PairStats("client", "svc")
        self.sockets: list[socket.socket] = [self.listener]

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn in the loop thread and wait for its result (relay state is the loop's)."""
        fut: asyncio.Future[T] = asyncio.run_coroutine_threadsafe(self._run(fn), self.loop)
        return fut.result(10)

    @staticmethod
    async def _run(fn: Callable[[], T]) -> T:
        return fn()

    def relay(self, start: bool = True) -> tuple[Relay, socket.socket, socket.socket]:
        """A relay between a new application socket and a new backend socket."""
        app, client = pair(self.listener)
        backend_side, backend = pair(self.listener)  # (upstream socket, backend socket)
        for s in (client, backend_side):
            s.setblocking(False)
        self.sockets += [app, backend, client, backend_side]
        relay = self.call(lambda: Relay(self.poller, self.pool, self.registry, client,
                                        self.stats))
        if start:
            self.call(lambda: relay.start(backend_side))
        self._upstream = backend_side
        return relay, app, backend

    def start(self, relay: Relay) -> None:
        self.call(lambda: relay.start(self._upstream))

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 5.0) -> None:
        """Until `check()` (run in the loop thread) is true."""
        deadline = self.loop.time() + timeout
        while not self.call(check):
            if self.loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            threading.Event().wait(0.005)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
        self.loop.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


@contextlib.contextmanager
def stuck_port() -> Iterator[int]:
    """A port whose listener's accept queue is full: the kernel drops SYNs, so a connect to it
    stays in progress until the listener makes room (then the SYN's retransmission, ~1 s).
    On loopback each connect's handshake runs inside connect(), so the queue is full as soon
    as the first one returns."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    held = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(s.getsockname())
            held.append(c)
        yield s.getsockname()[1]
    finally:
        for c in held:
            c.close()
        s.close()


def recv_all(s: socket.socket) -> bytes:
    """Everything until EOF."""
    chunks = []
    while chunk := s.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


