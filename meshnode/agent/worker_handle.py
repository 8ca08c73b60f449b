"""One proxy worker process as the agent sees it: started here (a child, in the proxy cgroup,
in a session of its own) or adopted from an earlier agent; its exit watched through a pidfd
(also for a process that is not our child), its messages dispatched, its answers awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnode.config import AgentConfig
from meshnode.errors import WireError
from meshnode.wire import (
    AgentMessage,
    ConnEvent,
    Listening,
    StartError,
    StatsReply,
    StatsRequest,
    Sync,
    Synced,
    encode,
    worker_codec,
)

log = logging.getLogger(__name__)

# Joins the cgroup before exec, so the worker's listening socket (and every socket accepted on
# it) belongs to the proxy cgroup from the first instant: capture hooks key on socket cgroups.
_IN_CGROUP = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'


class Worker:
    """One worker process: started by this agent (`popen`) or adopted from an earlier one."""

    def __init__(self, worker_id: int) -> None:
        self.id = worker_id
        self.pid: int | None = None
        self.popen: subprocess.Popen[bytes] | None = None  # None: adopted, not our child
        self.pidfd: int | None = None
        self.exited = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.listening = asyncio.Event()
        self.listener_fd = -1  # its descriptor number of the listening socket
        self.error: str | None = None
        self.pending: dict[int, asyncio.Future[Synced | StatsReply]] = {}
        self.channel_open = False  # False from the moment the worker's end closes
        self.started_at = time.monotonic()
        self.restarts = 0
        self.protocol: int | None = None  # from its Hello; None until it answers
        self.build = ""
        self.held: dict[str, int] = {}
        self.adopted = False
        self.retiring = False  # told to drain (replaced by an upgrade): its exit is expected
        self.codec = worker_codec()

    @property
    def alive(self) -> bool:
        return (self.pid is not None and not self.exited.is_set() and self.channel_open
                and self.listening.is_set())

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def send(self, msg: AgentMessage) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(msg))

    def signal(self, sig: int) -> None:
        if self.pid is not None and not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    # -- the process ----------------------------------------------------------------------
    def spawn(self, cfg: AgentConfig, proxy_cgroup: Path, build: str, listener: int | None,
              held: dict[str, int]) -> None:
        """Start it in `proxy_cgroup`, handing down the listening socket (none: it binds
        one) and the descriptors it holds for the agent."""
        listen_fd = listener if listener is not None else -1
        argv = cfg.worker(self.id, build, listen_fd, held).to_argv()
        fds = [fd for fd in (listen_fd, *held.values()) if fd >= 0]
        # Its own session: a Ctrl-C in the agent's terminal (or a signal to its process group)
        # is the agent's business; a worker stops on its own SIGTERM only.
        self.popen = subprocess.Popen(
            ["/bin/sh", "-c", _IN_CGROUP, "sh", str(proxy_cgroup),
             sys.executable, "-m", "meshnode.proxy.worker", *argv],
            pass_fds=fds, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid
        self.build = build
        self.started_at = time.monotonic()

    def watch_exit(self, on_exit: Callable[[Worker], None]) -> None:
        """Call `on_exit(self)` once the process is gone (`exited` is set first)."""
        assert self.pid is not None

        def exited() -> None:
            self.unwatch()
            if self.popen is not None:
                self.popen.poll()  # reap our child
            self.listening.clear()
            self.exited.set()
            on_exit(self)

        try:
            self.pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            exited()
            return
        asyncio.get_running_loop().add_reader(self.pidfd, exited)

    def unwatch(self) -> None:
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    # -- messages -------------------------------------------------------------------------
    def dispatch(self, line: bytes, on_event: Callable[[dict[str, Any]], None]) -> None:
        """One line from the worker."""
        try:
            msg = self.codec.decode(line)
        except WireError as err:
            log.warning("worker %d: %s; ignored: %.100r", self.id, err.message, line)
            return
        match msg:
            case None:
                if self.codec.unknown.total() == 1:
                    log.info("worker %d sent a message kind this agent does not know "
                             "(a newer worker?): %s", self.id, dict(self.codec.unknown))
            case ConnEvent(record):
                on_event(record)
            case Listening(_, _, listener):
                self.listener_fd = listener
                self.listening.set()
            case StartError(message, hint):
                self.error = f"{message} ({hint})"
                log.error("worker %d: %s", self.id, self.error)
            case Synced(seq) | StatsReply(seq):
                fut = self.pending.pop(seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    async def ask(self, ask: Callable[[int], Sync | StatsRequest], seq: int,
                  timeout: float) -> Synced | StatsReply | None:
        """Send a request, await its answer (None: no channel, or no answer in time)."""
        if not self.channel_open:
            return None
        fut: asyncio.Future[Synced | StatsReply] = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        self.send(ask(seq))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except (TimeoutError, asyncio.CancelledError):
            self.pending.pop(seq, None)
            return None
