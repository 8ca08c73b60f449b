"""Proxy worker supervision: spawn N uvloop workers in the proxy cgroup, feed them discovery
updates over a socketpair, run sync barriers, collect stats, restart the dead with backoff,
and drain them on stop.

The channel speaks meshnode.wire's typed messages (one codec each way): the agent opens with
Hello, and each worker's answer says which protocol it speaks (`Worker.protocol`). A line that is
not a message is logged and dropped; a kind this agent does not know is skipped and counted.

The agent never imports the proxy package (it would pull uvloop into the agent): workers are
separate processes started with `python -m meshnode.proxy.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshnode import __version__
from meshnode.config import AgentConfig
from meshnode.errors import UnavailableError, WireError
from meshnode.model import Add, DoesNotExist, Remove, Reset, Update
from meshnode.wire import (
    PROTOCOL,
    AgentMessage,
    ConnEvent,
    Hello,
    Listening,
    StartError,
    StatsReply,
    StatsRequest,
    Sync,
    Synced,
    encode,
    update_message,
    worker_codec,
)

# What a (re)started worker is sent first: discovery updates and other agent messages.
Initial = Update | AgentMessage

log = logging.getLogger(__name__)

# Joins the cgroup before exec, so the worker's listening socket (and every socket accepted on
# it) belongs to the proxy cgroup from the first instant: capture hooks key on socket cgroups.
_IN_CGROUP = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
_MAX_BACKOFF = 5.0


class Worker:
    def __init__(self, worker_id: int) -> None:
        self.id = worker_id
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.listening = asyncio.Event()
        self.error: str | None = None
        self.pending: dict[int, asyncio.Future[Synced | StatsReply]] = {}
        self.channel_open = False  # False from the moment the worker's end closes (it died)
        self.started_at = 0.0
        self.restarts = 0
        self.protocol: int | None = None  # from its Hello; None until it answers
        self.codec = worker_codec()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return (self.proc is not None and self.proc.returncode is None and self.channel_open
                and self.listening.is_set())

    def send(self, msg: AgentMessage) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(msg))


class WorkerPool:
    def __init__(self, cfg: AgentConfig, proxy_cgroup: Path,
                 initial: Callable[[], list[Initial]],
                 on_change: Callable[[], Awaitable[None]],
                 on_event: Callable[[dict[str, Any]], None] = lambda event: None) -> None:
        """`initial`: what a (re)started worker is sent first (routes, sources, taps);
        `on_event`: the tap events workers send (each the connection's record)."""
        self.cfg = cfg
        self.proxy_cgroup = proxy_cgroup
        self._initial = initial
        self._on_change = on_change
        self._on_event = on_event
        self.workers = [Worker(i) for i in range(cfg.workers)]
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, timeout: float = 20.0) -> None:
        """Start every worker and wait until all listen; UnavailableError if one cannot."""
        for w in self.workers:
            await self._spawn(w)
        try:
            async with asyncio.timeout(timeout):
                for w in self.workers:
                    await self._wait_listening(w)
        except TimeoutError:
            raise UnavailableError("proxy workers did not start listening in time",
                                   "check the agent log for the worker's error") from None
        for w in self.workers:
            self._watch(w)

    async def _wait_listening(self, w: Worker) -> None:
        assert w.proc is not None
        listening = asyncio.ensure_future(w.listening.wait())
        exited = asyncio.ensure_future(w.proc.wait())
        await asyncio.wait({listening, exited}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        exited.cancel()
        if not w.listening.is_set():
            raise UnavailableError(
                f"proxy worker {w.id} exited: {w.error or 'no reason given'}",
                f"is port {self.cfg.outbound_port} taken by another program? (ss -ltnp)")

    async def _spawn(self, w: Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = self.cfg.worker(w.id, child.fileno()).to_argv()
        try:
            w.proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", _IN_CGROUP, "sh", str(self.proxy_cgroup),
                sys.executable, "-m", "meshnode.proxy.worker", *argv,
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        finally:
            child.close()
        w.listening.clear()
        w.error = None
        w.started_at = time.monotonic()
        w.protocol = None
        reader, w.writer = await asyncio.open_unix_connection(sock=parent)
        w.channel_open = True
        self._spawn_task(self._read(w, reader))
        w.send(Hello(PROTOCOL, __version__))
        # Routes first: the worker applies them before its first accepted connection needs them.
        for msg in self._initial():
            w.send(_message(msg))

    def _spawn_task(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, w: Worker, reader: asyncio.StreamReader) -> None:
        # a killed worker with unread input resets the socketpair: that is EOF too
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                self._dispatch(w, line)
        # EOF: the worker is gone (or going); nobody waits on it any more
        w.channel_open = False
        w.listening.clear()
        if not self._stopping:
            self._spawn_task(self._on_change())
        for fut in w.pending.values():
            if not fut.done():
                fut.cancel()
        w.pending.clear()

    def _dispatch(self, w: Worker, line: bytes) -> None:
        try:
            msg = w.codec.decode(line)
        except WireError as err:
            log.warning("worker %d: %s; ignored: %.100r", w.id, err.message, line)
            return
        match msg:
            case None:
                if w.codec.unknown.total() == 1:
                    log.info("worker %d sent a message kind this agent does not know "
                             "(a newer worker?): %s", w.id, dict(w.codec.unknown))
            case ConnEvent(record):
                self._on_event(record)
            case Listening():
                w.listening.set()
            case StartError(message, hint):
                w.error = f"{message} ({hint})"
                log.error("worker %d: %s", w.id, w.error)
            case Hello(protocol, software):
                w.protocol = protocol
                if protocol != PROTOCOL:
                    log.info("worker %d speaks protocol %d (meshnode %s), this agent %d",
                             w.id, protocol, software or "?", PROTOCOL)
            case Synced(seq) | StatsReply(seq):
                fut = w.pending.pop(seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def _watch(self, w: Worker) -> None:
        self._spawn_task(self._supervise(w))

    async def _supervise(self, w: Worker) -> None:
        backoff = self.cfg.restart_backoff
        while not self._stopping:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping:
                return
            w.listening.clear()
            log.warning("proxy worker %d (pid %s) exited with %s; restarting in %.1fs",
                        w.id, w.pid, code, backoff)
            await self._on_change()  # capture falls back to pass-through before anything else
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            ran_for = time.monotonic() - w.started_at
            await self._spawn(w)
            w.restarts += 1
            try:
                async with asyncio.timeout(10):
                    await self._wait_listening(w)
            except (TimeoutError, UnavailableError) as exc:
                log.error("proxy worker %d failed to restart: %s", w.id, exc)
                if w.proc and w.proc.returncode is None:
                    w.proc.kill()
            # a worker that keeps dying right away backs off further; a healthy run resets it
            backoff = (min(backoff * 2, _MAX_BACKOFF) if ran_for < 10
                       else self.cfg.restart_backoff)
            await self._on_change()

    async def stop(self) -> None:
        """Drain: SIGTERM every worker, wait out the grace period, then kill what is left."""
        self._stopping = True
        live = [w for w in self.workers if w.proc and w.proc.returncode is None]
        for w in live:
            assert w.proc is not None
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.drain_grace + 2):
                await asyncio.gather(*(w.proc.wait() for w in live if w.proc))
        for w in live:
            if w.proc and w.proc.returncode is None:
                w.proc.kill()
                await w.proc.wait()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self.workers:
            if w.writer is not None:
                w.writer.close()

    # -- messages -------------------------------------------------------------------------
    @property
    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def broadcast(self, updates: list[Update]) -> None:
        # encoded once, not once per worker: a Reset of a large service is a long line
        lines = b"".join(encode(update_message(u)) for u in updates)
        for w in self.workers:
            if lines and w.writer is not None and not w.writer.is_closing():
                w.writer.write(lines)

    def send_all(self, msg: AgentMessage) -> None:
        for w in self.workers:
            w.send(msg)

    async def _ask(self, w: Worker, ask: Callable[[int], Sync | StatsRequest],
                   timeout: float) -> Synced | StatsReply | None:
        if not w.channel_open:
            return None
        seq = next(self._seq)
        fut: asyncio.Future[Synced | StatsReply] = asyncio.get_running_loop().create_future()
        w.pending[seq] = fut
        w.send(ask(seq))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except (TimeoutError, asyncio.CancelledError):
            w.pending.pop(seq, None)
            return None

    async def barrier(self, timeout: float = 2.0) -> bool:
        """True when every live worker has applied everything sent so far (and one is live)."""
        live = self.alive
        if not live:
            return False
        answers = await asyncio.gather(*(self._ask(w, Sync, timeout) for w in live))
        return all(a is not None for a in answers) and all(w.alive for w in live)

    async def stats(self, timeout: float = 1.0) -> list[StatsReply]:
        """The live workers' counters (each names its pid: a new pid, counters restarted)."""
        live = self.alive
        answers = await asyncio.gather(*(self._ask(w, StatsRequest, timeout) for w in live))
        return [a for a in answers if isinstance(a, StatsReply)]

    def describe(self) -> list[dict[str, Any]]:
        return [{"id": w.id, "pid": w.pid, "alive": w.alive, "restarts": w.restarts,
                 "protocol": w.protocol, "unknown_messages": w.codec.unknown.total()}
                for w in self.workers]


def _message(item: Initial) -> AgentMessage:
    """Discovery updates travel as their wire messages; other messages as they are."""
    if isinstance(item, Reset | Add | Remove | DoesNotExist):
        return update_message(item)
    return item
