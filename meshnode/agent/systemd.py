"""systemd integration without libsystemd: sd_notify(3) over $NOTIFY_SOCKET (READY, RELOADING,
STOPPING, STATUS, WATCHDOG) and the re-exec a reload (SIGHUP) ends in.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

WEDGED_AFTER = 20.0  # seconds a reconcile may hold its lock before the heartbeat stops
# The `meshnode agent` command line (JSON), kept for a reload: run again, it reads its config
# file anew. Without it (the agent started otherwise) a reload re-executes the same process.
RELOAD_ARGV = "MESHNODE_AGENT_CLI_ARGV"


def notify(*fields: str) -> bool:
    """Send KEY=VALUE fields to systemd; False when not run by systemd (or it is gone)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.debug("sd_notify %s: %s", fields, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec= (what systemd asks for), when it watches this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


async def watchdog(healthy: Callable[[], bool]) -> None:
    """Ping systemd's watchdog while `healthy()` (called on the agent's loop, so a blocked
    loop stops the pings too); systemd restarts an agent that stops pinging, which is a
    restart like any other: the data plane keeps serving."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        else:
            log.error("heartbeat missed: a reconcile has been running for over %.0f s",
                      WEDGED_AFTER)
        await asyncio.sleep(interval)


def reexec() -> None:
    """Replace this process with a fresh start of its command line (same PID, so systemd's
    MAINPID holds; the new agent adopts the data plane as after a restart, with the code and
    the configuration as they are now)."""
    sys.stdout.flush()
    sys.stderr.flush()
    cli = os.environ.get(RELOAD_ARGV)
    if cli:
        os.execv(sys.executable, [sys.executable, "-m", "meshnode.cli", *json.loads(cli)])
    os.execv(sys.executable, sys.orig_argv)
