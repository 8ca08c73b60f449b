"""Proxy worker supervision: start N uvloop workers in the proxy cgroup, adopt the ones an
earlier agent left serving, feed them discovery updates over the worker socket, run sync
barriers, collect stats, replace the dead, roll them over to new code one at a time, and
detach from them (a restart) or drain them (a removal).

The data plane outlives the agent. Workers run in their own session and cgroup, not as part of
the agent: when it stops or crashes they keep serving with the routes they have and reconnect
to the worker socket (`AgentConfig.worker_socket`) until a new agent answers. That agent adopts
whoever connects from the proxy cgroup, by the slot, pid and build each names in its Hello.

One listening socket for all: the first worker binds it, the agent keeps a copy (pidfd_getfd)
and hands it to every worker it starts later. A worker's exit (a crash, a drain) then closes
nothing: the queue stays with the others, or with the agent's copy until a replacement
accepts from it, so a single worker's restart refuses no connection.

The channel speaks meshnode.wire's typed messages (one codec each way). A line that is not a
message is logged and dropped; a kind this agent does not know is skipped and counted. The
agent never imports the proxy package (it would pull uvloop into the agent): workers are
separate processes started with `python -m meshnode.proxy.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshnode import __version__
from meshnode.agent.worker_handle import Worker
from meshnode.build import code_build
from meshnode.config import AgentConfig
from meshnode.errors import MeshnodeError, UnavailableError, WireError
from meshnode.host import process
from meshnode.model import Add, DoesNotExist, Remove, Reset, Update
from meshnode.wire import (
    PROTOCOL,
    AgentMessage,
    Hello,
    StatsReply,
    StatsRequest,
    Sync,
    encode,
    update_message,
    worker_codec,
)

# What a (re)started or adopted worker is sent first: discovery updates and other messages.
Initial = Update | AgentMessage

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0
MAX_LINE = 16 * 1024 * 1024  # as the worker's side (proxy/control.py)
ADOPT_WAIT = 5.0  # seconds a restarted agent waits for the workers it finds to say hello
# While the last worker is being replaced, capture stays on for this long: the listening socket
# (the agent's copy) queues connections for the replacement instead of refusing them.
BRIDGE = 5.0
BRIDGE_BACKOFF = 1.0  # ...when the replacement starts within this


class WorkerPool:
    def __init__(self, cfg: AgentConfig, proxy_cgroup: Path,
                 initial: Callable[[], list[Initial]],
                 on_change: Callable[[], Awaitable[None]],
                 on_event: Callable[[dict[str, Any]], None] = lambda event: None,
                 build: str | None = None) -> None:
        """`initial`: what a (re)started or adopted worker is sent first (routes, sources,
        taps); `on_event`: the tap events workers send (each the connection's record)."""
        self.cfg = cfg
        self.proxy_cgroup = proxy_cgroup
        self.build = build or code_build()
        self._initial = initial
        self._on_change = on_change
        self._on_event = on_event
        self.workers = [Worker(i) for i in range(cfg.workers)]
        self.retiring: list[Worker] = []  # draining: replaced by an upgrade, or surplus
        self._starting: list[Worker] = []  # an upgrade's replacements, not yet serving
        self.listener: int | None = None  # the agent's copy of the listening socket
        self.held: dict[str, int] = {}  # descriptors workers hold for the agent (DNS)
        self.adopted = 0  # workers found serving at start
        self._by_pid: dict[int, Worker] = {}
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._bridging_since: float | None = None  # no worker alive, a replacement starting

    # -- lifecycle ------------------------------------------------------------------------
    async def adopt(self) -> None:
        """Open the worker socket and adopt the workers an earlier agent left serving (their
        listening socket and held descriptors become this pool's)."""
        if self._server is None:
            await self._serve()
            await self._adopt()

    async def start(self, timeout: float = 20.0) -> None:
        """Adopt (unless done), start the missing workers and wait until all listen;
        UnavailableError if one cannot."""
        await self.adopt()
        try:
            async with asyncio.timeout(timeout):
                if self.listener is None:
                    await self._first_listener()
                for w in self.workers:
                    if w.pid is None:
                        self._spawn(w)
                for w in self.workers:
                    await self._wait_listening(w)
        except TimeoutError:
            raise UnavailableError("proxy workers did not start listening in time",
                                   "check the agent log for the worker's error") from None
        for slot in range(len(self.workers)):
            self._spawn_task(self._supervise(slot))

    async def _serve(self) -> None:
        path = self.cfg.worker_socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # an earlier agent's: nobody answers there any more
        old = os.umask(0o077)  # root only: a worker's channel steers the data plane
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, path,
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)

    def _cgroup_pids(self) -> set[int]:
        try:
            text = (self.proxy_cgroup / "cgroup.procs").read_text()
        except OSError:
            return set()
        return {int(p) for p in text.split()} - {os.getpid()}

    async def _adopt(self) -> None:
        """Wait for the processes serving in the proxy cgroup (an earlier agent's workers) to
        reconnect, then take the listening socket and the held descriptors from them."""
        found = self._cgroup_pids()
        if not found:
            return
        log.info("found %d proxy workers serving: adopting them", len(found))
        deadline = time.monotonic() + ADOPT_WAIT
        while time.monotonic() < deadline:
            known = {p for p, w in self._by_pid.items() if w.listening.is_set()}
            if found <= known or not (found - known) & self._cgroup_pids():
                break
            await asyncio.sleep(0.02)
        for pid in found - set(self._by_pid):
            # an old worker that cannot reconnect (or a wedged one): it drains and exits
            log.warning("process %d in the proxy cgroup did not say hello: draining it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        adopted = [w for w in self._by_pid.values() if w.adopted and w.listening.is_set()]
        self.adopted = len(adopted)
        for w in adopted:
            if self.listener is None and w.listener_fd >= 0 and w.pidfd is not None:
                try:
                    self.listener = process.pidfd_getfd(w.pidfd, w.listener_fd)
                except MeshnodeError as exc:
                    log.warning("worker %d: %s", w.id, exc)
            # each name from the first worker holding it (a gateway listener opened after
            # some workers started is held by those that took it)
            for name, fd in w.held.items():
                if name not in self.held and w.pidfd is not None:
                    with contextlib.suppress(MeshnodeError):
                        self.held[name] = process.pidfd_getfd(w.pidfd, fd)

    async def _first_listener(self) -> None:
        """Nobody to copy the listening socket from: the first worker binds it."""
        w = next((w for w in self.workers if w.pid is None), None)
        if w is None:  # every slot adopted, none told its listener: each keeps its own
            return
        self._spawn(w)
        await self._wait_listening(w)
        assert w.pidfd is not None
        self.listener = process.pidfd_getfd(w.pidfd, w.listener_fd)

    async def _wait_listening(self, w: Worker) -> None:
        listening = asyncio.ensure_future(w.listening.wait())
        exited = asyncio.ensure_future(w.exited.wait())
        try:
            await asyncio.wait({listening, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
            exited.cancel()
        if not w.listening.is_set():
            raise UnavailableError(
                f"proxy worker {w.id} exited: {w.error or 'no reason given'}",
                f"is port {self.cfg.outbound_port} taken by another program? (ss -ltnp)")

    def _spawn(self, w: Worker) -> None:
        w.spawn(self.cfg, self.proxy_cgroup, self.build, self.listener, self.held)
        assert w.pid is not None
        self._by_pid[w.pid] = w
        w.watch_exit(self._exited)

    def _exited(self, w: Worker) -> None:
        if w.pid is not None:
            self._by_pid.pop(w.pid, None)
        if w in self.retiring:
            self.retiring.remove(w)

    def _spawn_task(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the channel ----------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """A worker connects (one this agent started, or an earlier agent's): it names itself
        in its Hello; anything else is turned away."""
        writer.write(encode(Hello(PROTOCOL, __version__)))
        hello: Hello | None = None
        with contextlib.suppress(TimeoutError, ConnectionError, ValueError, WireError):
            async with asyncio.timeout(5.0):
                msg = worker_codec().decode(await reader.readline())
                hello = msg if isinstance(msg, Hello) else None
        w = self._claim(hello) if hello is not None and not self._stopping else None
        if w is None or hello is None:
            log.debug("worker socket: turned away %r", hello)
            writer.close()
            return
        w.protocol, w.build, w.held = hello.protocol, hello.build, dict(hello.held)
        if hello.protocol != PROTOCOL:
            log.info("worker %d speaks protocol %d (meshnode %s), this agent %d",
                     w.id, hello.protocol, hello.software or "?", PROTOCOL)
        if w.writer is not None:
            w.writer.close()
        w.writer = writer
        w.channel_open = True
        # Routes first: a started worker applies them before its first connection needs them;
        # an adopted one replaces what it kept (Retain drops services deleted meanwhile).
        for item in self._initial():
            w.send(_message(item))
        w.send(Sync(0))  # "the routes are in": a started worker begins accepting on it
        await self._read(w, reader)

    def _claim(self, hello: Hello) -> Worker | None:
        w = self._by_pid.get(hello.pid)
        if w is not None:
            return w
        if hello.pid not in self._cgroup_pids():
            log.warning("process %d is not a proxy worker of this agent: turned away",
                        hello.pid)
            return None
        w = Worker(hello.worker)
        w.pid, w.adopted = hello.pid, True
        slot = hello.worker
        if 0 <= slot < len(self.workers) and self.workers[slot].pid is None:
            self.workers[slot] = w
        else:  # beyond this agent's worker count, or its slot is taken: let it drain
            w.retiring = True
            self.retiring.append(w)
            w.signal(signal.SIGTERM)
        self._by_pid[hello.pid] = w
        w.watch_exit(self._exited)
        return w

    async def _read(self, w: Worker, reader: asyncio.StreamReader) -> None:
        # a killed worker with unread input resets the socket: that is EOF too
        with contextlib.suppress(ConnectionError, ValueError):
            while line := await reader.readline():
                w.dispatch(line, self._on_event)
        w.channel_open = False
        w.listening.clear()
        # (no reconcile here: the exit watcher's supervisor decides whether capture must
        # fall back, or the listening socket bridges the gap until a replacement serves)
        for fut in w.pending.values():
            if not fut.done():
                fut.cancel()
        w.pending.clear()

    # -- supervision ----------------------------------------------------------------------
    async def _supervise(self, slot: int) -> None:
        """Replace the slot's worker when it dies (not when an upgrade retired it)."""
        backoff = self.cfg.restart_backoff
        while not self._stopping:
            w = self.workers[slot]
            await w.exited.wait()
            if self._stopping:
                return
            if self.workers[slot] is not w:
                continue  # replaced on purpose: watch its successor
            log.warning("proxy worker %d (pid %s) exited with %s; restarting in %.1fs",
                        w.id, w.pid, w.returncode, backoff)
            if not self.alive:
                if backoff <= BRIDGE_BACKOFF:  # soon replaced: the socket queues meanwhile
                    self._bridging_since = time.monotonic()
                # capture falls back (kernel path where allowed; else, unless bridging, fail
                # open or closed) until a worker serves
                await self._on_change()
            ran_for = time.monotonic() - w.started_at
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            new = self.workers[slot] = Worker(slot)
            new.restarts = w.restarts + 1
            try:
                self._spawn(new)
                async with asyncio.timeout(10):
                    await self._wait_listening(new)
            except (TimeoutError, UnavailableError, OSError) as exc:
                log.error("proxy worker %d failed to restart: %s", slot, exc)
                new.signal(signal.SIGKILL)
            finally:
                self._bridging_since = None
            # a worker that keeps dying right away backs off further; a healthy run resets it
            backoff = (min(backoff * 2, _MAX_BACKOFF) if ran_for < 10
                       else self.cfg.restart_backoff)
            await self._on_change()

    def _bridging(self) -> bool:
        since = self._bridging_since
        return (since is not None and self.listener is not None
                and time.monotonic() - since < BRIDGE)

    async def upgrade(self) -> int:
        """Replace the workers running other code than this agent's, one at a time: the new
        one accepts from the same socket and has its routes before the old one is told to
        drain (its established connections get the drain grace). Returns how many."""
        replaced = 0
        for slot in range(len(self.workers)):
            old = self.workers[slot]
            if self._stopping or not old.alive or old.build == self.build:
                continue
            # The new one joins the slot only once it serves: until then the old one counts
            # for barriers (capture stays), and the new one gets broadcasts as `starting`.
            new = Worker(slot)
            self._starting.append(new)
            try:
                self._spawn(new)
                async with asyncio.timeout(10):
                    await self._wait_listening(new)
                await new.ask(Sync, next(self._seq), 5.0)
            except (TimeoutError, UnavailableError, OSError) as exc:
                log.error("upgrade: new worker %d did not start (%s); keeping the old one",
                          slot, exc)
                new.signal(signal.SIGKILL)
                continue
            finally:
                self._starting.remove(new)
            self.workers[slot] = new
            old.retiring = True
            self.retiring.append(old)
            old.signal(signal.SIGTERM)
            replaced += 1
            log.info("upgrade: worker %d replaced (build %s -> %s), the old one drains",
                     slot, old.build or "?", self.build)
        return replaced

    def detach(self) -> None:
        """Leave the workers serving (an agent restart): they reconnect to the next agent."""
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
        for w in [*self.workers, *self.retiring, *self._starting]:
            if w.writer is not None:
                w.writer.close()
            w.unwatch()
        with contextlib.suppress(FileNotFoundError):
            self.cfg.worker_socket.unlink()
        self._close_fds()

    async def stop(self) -> None:
        """Drain (a removal): SIGTERM every worker, wait out the grace period, then kill what
        is left."""
        self._stopping = True
        live = [w for w in [*self.workers, *self.retiring, *self._starting]
                if w.pid is not None and not w.exited.is_set()]
        for w in live:
            w.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.drain_grace + 2):
                await asyncio.gather(*(w.exited.wait() for w in live))
        for w in live:
            if not w.exited.is_set():
                w.signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*(w.exited.wait() for w in live))
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        for w in [*self.workers, *self.retiring, *self._starting]:
            if w.writer is not None:
                w.writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.cfg.worker_socket.unlink()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in [*([self.listener] if self.listener is not None else []),
                   *self.held.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.listener = None
        self.held = {}

    # -- messages -------------------------------------------------------------------------
    @property
    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    @property
    def pids(self) -> set[int]:
        return set(self._by_pid)

    def broadcast(self, updates: list[Update]) -> None:
        # encoded once, not once per worker: a Reset of a large service is a long line
        lines = b"".join(encode(update_message(u)) for u in updates)
        for w in [*self.workers, *self._starting]:
            if lines and w.writer is not None and not w.writer.is_closing():
                w.writer.write(lines)

    def send_all(self, msg: AgentMessage) -> None:
        for w in [*self.workers, *self._starting]:
            w.send(msg)

    async def barrier(self, timeout: float = 2.0) -> bool:
        """True when every live worker has applied everything sent so far (and one is live,
        or the last one's replacement is starting: the listening socket queues for it)."""
        live = self.alive
        if not live:
            return self._bridging()
        answers = await asyncio.gather(*(w.ask(Sync, next(self._seq), timeout) for w in live))
        return all(a is not None for a in answers) and all(w.alive for w in live)

    async def stats(self, timeout: float = 1.0) -> list[StatsReply]:
        """The live workers' counters (each names its pid: a new pid, counters restarted)."""
        live = self.alive
        answers = await asyncio.gather(*(w.ask(StatsRequest, next(self._seq), timeout)
                                         for w in live))
        return [a for a in answers if isinstance(a, StatsReply)]

    def describe(self) -> list[dict[str, Any]]:
        return [{"id": w.id, "pid": w.pid, "alive": w.alive, "restarts": w.restarts,
                 "protocol": w.protocol, "build": w.build, "adopted": w.adopted,
                 "retiring": w.retiring, "unknown_messages": w.codec.unknown.total()}
                for w in [*self.workers, *self.retiring]]


def _message(item: Initial) -> AgentMessage:
    """Discovery updates travel as their wire messages; other messages as they are."""
    if isinstance(item, Reset | Add | Remove | DoesNotExist):
        return update_message(item)
    return item
