"""cgroup v2: find the mount, create and remove our cgroups, move processes.

The unified hierarchy may be at /sys/fs/cgroup (pure v2) or /sys/fs/cgroup/unified (hybrid):
it is found from /proc/self/mountinfo, never assumed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

from meshnode.errors import CgroupError, NotFoundError, UnavailableError


def cgroup2_mount() -> Path:
    """The cgroup2 mount point seen by this process."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # fields: id parent major:minor root mountpoint opts ... - fstype source superopts
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    raise UnavailableError(
        "no cgroup v2 hierarchy is mounted",
        "mount it: mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified",
    )


def process_cgroup(pid: int, mount: Path) -> Path:
    """The absolute path of the cgroup2 group `pid` is in."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line[3:].strip().lstrip("/")
                    return mount / rel if rel else mount
    except FileNotFoundError:
        raise NotFoundError(f"no process with PID {pid}", "check the PID with: ps -p PID") from None
    raise CgroupError(f"process {pid} has no cgroup v2 membership")


def create(path: Path) -> bool:
    """mkdir -p for cgroups; returns True if the last component was created now."""
    try:
        path.mkdir(parents=True)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}", errno=exc.errno) from exc


def move(pid: int, path: Path) -> None:
    """Move one process (all its threads) into the cgroup at `path`."""
    try:
        with open(path / "cgroup.procs", "w") as f:
            f.write(str(pid))
    except ProcessLookupError:
        raise NotFoundError(f"no process with PID {pid}", "check the PID with: ps -p PID") from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise NotFoundError(f"no process with PID {pid}",
                                "check the PID with: ps -p PID") from None
        raise CgroupError(f"cannot move PID {pid} into {path}: {exc.strerror}",
                          errno=exc.errno) from exc


def procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def remove_tree(path: Path, evacuate_to: Path, timeout: float = 2.0) -> None:
    """Remove a cgroup and its descendants, moving any process left in them to `evacuate_to`.
    Missing groups count as removed. Exiting processes can keep a group busy for a moment,
    so rmdir is retried until `timeout`."""
    if not path.is_dir():
        return
    children = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for group in [*children, path]:
        for pid in procs(group):
            with contextlib.suppress(NotFoundError):
                move(pid, evacuate_to)
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(group)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {group}: {exc.strerror}",
                                      errno=exc.errno) from exc
                for pid in procs(group):
                    with contextlib.suppress(NotFoundError):
                        move(pid, evacuate_to)
                time.sleep(0.02)


def _undo_cgroup(entry: dict[str, object]) -> None:
    remove_tree(Path(str(entry["path"])), cgroup2_mount())


# Ledger kinds this module creates (see host/ledger.py).
UNDO = {"cgroup": _undo_cgroup}
