"""The access log: one JSON line per proxied connection, written by each worker.

Lines are buffered and written at most every FLUSH_INTERVAL (or once MAX_BUFFERED lines wait),
so a busy worker makes one write per batch, not one per connection. The file is opened with
O_APPEND: every worker appends whole batches to the same file, and each write lands at the end
(`logrotate` with `copytruncate` works; so does moving the file away, since the worker reopens
the path when the file it holds has been unlinked or renamed).

Sampling keeps a share of connections (a random draw per connection); the tap stream and the
metrics still see every one.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random

__all__ = ["FLUSH_INTERVAL", "AccessLog"]

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2
MAX_BUFFERED = 512


class AccessLog:
    """`path` "-" writes to stdout; `sample` is the share of connections logged (0..1)."""

    def __init__(self, path: str, sample: float = 1.0,
                 rng: random.Random | None = None) -> None:
        self.path = path
        self.sample = sample
        self._rng = rng or random.Random()
        self._lines: list[str] = []
        self._fd = -1
        self._ino: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # lines lost to write errors (a full disk must not stop the proxy)

    def wants(self) -> bool:
        """Whether to log the next connection (the sampling draw)."""
        return self.sample >= 1.0 or self._rng.random() < self.sample

    def write(self, line: str) -> None:
        """One JSON line (without its newline)."""
        self._lines.append(line)
        if len(self._lines) >= MAX_BUFFERED:
            self.flush()
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_INTERVAL)
        finally:
            self._task = None
            self.flush()

    def _open(self) -> int:
        if self.path == "-":
            return 1
        if self._fd >= 0:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)  # rotated away: reopen the path
            self._fd = -1
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)
        return fd

    def flush(self) -> None:
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode()
        n = len(self._lines)
        self._lines.clear()
        try:
            fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            self.dropped += n
            log.warning("access log %s: %s (%d lines dropped)", self.path, exc.strerror, n)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.flush()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
