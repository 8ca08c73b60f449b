"""The proxy's listening socket and what bounds accepting: bind it (the first worker) or take
it over from the agent (every later one: all accept from one socket), check SO_MARK, and how
many relays fit the descriptor limit.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from ipaddress import IPv4Address

from meshnode.errors import AccessError
from meshnode.listen import BACKLOG, ListenError, listen_tcp
from meshnode.proxy.dial import SO_MARK

__all__ = ["BACKLOG", "ListenError", "bind_listener", "inherited_listener"]

class MarkError(AccessError):
    default_hint = "SO_MARK needs CAP_NET_ADMIN: run the agent as root, or use mark 0 in tests"


def bind_listener(host: str, port: int) -> socket.socket:
    """The outbound listener, shared with the other workers (SO_REUSEPORT for a standalone
    explicit proxy with several workers; with an agent the socket itself is shared)."""
    return listen_tcp(host, port, reuseport=True)


def inherited_listener(fd: int) -> socket.socket:
    """The listening socket the agent handed down (descriptor `fd`)."""
    try:
        sock = socket.socket(fileno=fd)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise ListenError(f"inherited listener fd {fd} is unusable: {exc.strerror}",
                          "the agent hands it down; restart the agent") from exc
    if not listening:
        sock.detach()
        raise ListenError(f"inherited fd {fd} is not a listening socket",
                          "the agent hands it down; restart the agent")
    sock.setblocking(False)
    return sock


def check_mark(mark: int) -> None:
    """Fail at startup, not on every connect, when the mark cannot be set."""
    if not mark:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as exc:
            raise MarkError(f"cannot set SO_MARK {mark:#x}: {exc.strerror}") from exc


FD_RESERVE = 16  # descriptors kept for what opens later: access log, netlink, control


def relay_capacity() -> int:
    """How many relays fit RLIMIT_NOFILE, past the descriptors open now. The soft limit is
    raised to the hard one first, as nginx and HAProxy do: systemd's soft 1024 is for
    programs that still use select(), and would cap a worker at about 500 connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an infinite hard limit above fs.nr_open
            pass
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(1, (soft - len(os.listdir("/proc/self/fd")) - FD_RESERVE) // 2)


def own_addresses(host: str) -> frozenset[int]:
    """The addresses of a listener on `host`: a wildcard listener is every local loopback
    address we can name cheaply."""
    try:
        ip = IPv4Address(host)
    except ValueError:
        return frozenset()
    if ip.is_unspecified:
        return frozenset({int(ip), int(IPv4Address("127.0.0.1"))})
    return frozenset({int(ip)})
