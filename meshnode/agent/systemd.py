"""systemd integration without libsystemd: sd_notify(3) over $NOTIFY_SOCKET (READY, RELOADING,
STOPPING, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC) and the re-exec a reload (SIGHUP) ends in.

Two heartbeats: `watchdog` while the agent serves (it stops when a reconcile wedges), then
`while_stopping` from the moment a stop or a reload begins until the process exits or
re-executes (bounded: a stop that wedges past its bound is for systemd to end).

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

WEDGED_AFTER = 20.0  # seconds a reconcile may hold its lock before the heartbeat stops
STOPPING_PING = 5.0  # at most this many seconds between pings while stopping
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


async def while_stopping(limit: float) -> None:
    """Keep systemd waiting while the agent stops or detaches for a reload, for at most
    `limit` seconds from now: WATCHDOG=1 (the serving heartbeat ends with the reconcile, and
    in a reload the watchdog still runs: a slow step must not read as a hung agent) with
    EXTEND_TIMEOUT_USEC (the stop timeout, and the watchdog, then run at least that long from
    each ping; never past `limit`). The first ping goes at once: the last serving one may be
    a whole interval old."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    interval = min(watchdog_interval() or STOPPING_PING, STOPPING_PING)
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        notify("WATCHDOG=1", f"EXTEND_TIMEOUT_USEC={int(min(left, 3 * interval) * 1e6)}")
        await asyncio.sleep(min(interval, left))


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
