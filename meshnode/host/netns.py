"""Joining a named network namespace (an agent for a test host, or a host's container)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from meshnode.errors import AccessError, UsageError

_CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Join /run/netns/NAME (network namespace only: the mount namespace, and so the cgroup2
    mount, stays the host's). libc's setns(2) directly: pyroute2 would stay loaded in the
    agent for this one call (about 10 MB)."""
    path = Path(f"/run/netns/{name}")
    if not path.exists():
        raise UsageError(f"no network namespace named {name!r}", "create it: ip netns add NAME")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise AccessError(f"cannot enter network namespace {name!r}: "
                                   f"{os.strerror(err)}", "the agent must run as root")
    finally:
        os.close(fd)
