"""What the suite reads from and does to the processes it measures: CPU seconds and RSS (psutil,
i.e. /proc/PID/stat and /proc/PID/status), CPU pinning of every thread, a peak-RSS sampler, and
stopping a process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

ALL_CPUS = sorted(os.sched_getaffinity(0))


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of these processes (their own threads, not their children)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


def set_affinity(pids: Iterable[int], cpus: Iterable[int]) -> None:
    """sched_setaffinity acts on one thread: set it on every thread of each process."""
    cpus = list(cpus)
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            for t in psutil.Process(pid).threads():
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(t.id, cpus)


class RssPeak:
    """The highest summed RSS of some processes while the `with` block runs (sampled)."""

    def __init__(self, pids: Iterable[int], interval: float = 0.05) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pids))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssPeak:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def listens(pid: int, port: int) -> bool:
    """Whether the process holds a TCP socket listening on `port` in its own namespace
    (/proc/PID/net/tcp: psutil reads the caller's namespace instead)."""
    try:
        fd_dir = Path(f"/proc/{pid}/fd")
        inodes = {link[8:-1] for fd in fd_dir.iterdir()
                  if (link := os.readlink(fd)).startswith("socket:[")}
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        f = row.split()
        if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
            return True  # 0A: TCP_LISTEN
    return False


def children(pid: int) -> list[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return []


def stop_tree(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM a process (nginx's master stops its workers, a worker drains), then SIGKILL
    whatever of its tree is left: an orphan would outlive its network namespace."""
    tree = children(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def pinned(pids: Iterable[int], cpus: list[int]) -> Iterator[None]:
    pids = list(pids)
    set_affinity(pids, cpus)
    try:
        yield
    finally:
        set_affinity(pids, ALL_CPUS)


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in this process, which unwinds through every
    context manager: nothing is left behind. A forked helper (pyroute2 forks to work in a
    namespace, and stops its child with SIGTERM) inherits the handler: raising there would
    unwind a copy of our stack, whose clean-up then removes the real run's files under it, so
    it exits instead."""
    main_pid = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
