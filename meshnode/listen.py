"""A non-blocking TCP listening socket with a one-line error naming the fix: the proxy's
outbound listener (bound by the first worker) and the agent's inbound mTLS listener are both
made here.

Pure, shared by the agent and the worker: imports nothing of meshnode's but errors.
"""

from __future__ import annotations

import errno
import socket

from meshnode.errors import EX_UNAVAILABLE, UnavailableError

__all__ = ["BACKLOG", "ListenError", "listen_tcp"]

BACKLOG = 4096  # clamped by net.core.somaxconn


class ListenError(UnavailableError):
    """A listening socket could not be bound."""

    exit_code = EX_UNAVAILABLE


def listen_tcp(host: str, port: int, reuseport: bool = False, what: str = "",
               hint: str = "check the listen address and port") -> socket.socket:
    """Bound, listening, non-blocking, TCP_NODELAY (inherited by every accepted socket: one
    setsockopt fewer each). `what` names the listener in the error ("for mTLS")."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hints = {
            errno.EADDRINUSE: f"another program holds the port: ss -ltnp 'sport = :{port}'",
            errno.EACCES: "ports below 1024 need root (CAP_NET_BIND_SERVICE)",
            errno.EADDRNOTAVAIL: f"{host} is not an address of this host (or namespace)",
        }
        where = f"{what} " if what else ""
        raise ListenError(f"cannot listen {where}on {host}:{port}: {exc.strerror}",
                          hints.get(exc.errno or 0, hint)) from exc
    return sock
