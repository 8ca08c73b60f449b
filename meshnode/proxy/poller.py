"""Readiness of the worker's data-plane sockets: one epoll instance of the worker's own, watched
by the uvloop loop through a single `add_reader`, dispatching each ready descriptor to the
handler registered for it.

Why not the loop's `add_reader`/`add_writer` per socket: in uvloop each of those calls checks
the descriptor against a Python-level WeakValueDictionary of transports (a KeyError raised and
caught every time), and creates or closes a poll handle, which sets O_NONBLOCK once more; about
3 µs per call, four to six calls per connection. Here registering is one epoll_ctl, changing
interest another, and a closed socket leaves the epoll set by itself (its file is released),
so nothing is undone at close. Timers, signals and the control channel stay on the uvloop
loop, which also decides when this set is polled.

Handlers get the event mask and must tolerate spurious calls: a descriptor closed and reused
within one batch can receive the old socket's event (they then meet EAGAIN or nothing pending).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

__all__ = ["ERR", "READ", "WRITE", "Poller"]

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
ERR = select.EPOLLERR | select.EPOLLHUP  # always reported, whatever the interest
# Events taken per wake-up: the loop's timers and control channel run between batches.
BATCH = 256

Handler = Callable[[int], None]


class Poller:
    __slots__ = ("_ep", "_handlers", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        loop.add_reader(self._ep.fileno(), self._dispatch)

    def __len__(self) -> int:
        return len(self._handlers)

    def register(self, fd: int, events: int, handler: Handler) -> None:
        self._ep.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def detach(self, fd: int) -> None:
        """Leave the epoll set but keep the handler (`attach` comes back). Even with no
        interest a registered socket reports hang-ups and errors, level-triggered: on every
        poll while it stays in that state."""
        self._ep.unregister(fd)

    def attach(self, fd: int, events: int) -> None:
        self._ep.register(fd, events)

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed: closing it removes it from the epoll set, so only the
        handler goes."""
        self._handlers.pop(fd, None)

    def unregister(self, fd: int) -> None:
        """Stop watching `fd`, which stays open."""
        if self._handlers.pop(fd, None) is not None:
            self._ep.unregister(fd)

    def _dispatch(self) -> None:
        handlers = self._handlers
        for fd, events in self._ep.poll(0, BATCH):
            handler = handlers.get(fd)
            if handler is not None:
                handler(events)

    def close(self) -> None:
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._handlers.clear()
