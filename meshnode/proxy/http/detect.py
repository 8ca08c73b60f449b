"""Protocol detection on `auto` ports: HTTP/1.1, HTTP/2 (prior knowledge) or opaque TCP, from
the client's first bytes, without reading them.

The client socket is watched for readability for at most the service's `http.detectTimeout`
(0.2 s by default); its first bytes are looked at with MSG_PEEK, so whatever the verdict the
bytes are still in the kernel for the handler that takes the connection. An HTTP/1.1 request
line (a known method and a space) → HTTP/1.1; the HTTP/2 connection preface → HTTP/2; any
other byte → TCP at once; nothing within the window → TCP, so a server-first protocol (SMTP,
MySQL, SSH: the server speaks first) waits for its banner at most the window, never Linkerd's
10 s. Bytes that are still a prefix of a method or of the preface wait for more (within the
window). Each verdict is counted (protocol_detections: http1, h2, tcp, timeout).

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import _socket
import asyncio
import select
import socket
from collections.abc import Callable

from meshnode.proxy.poller import ERR, READ, Poller

__all__ = ["H2_PREFACE", "Detector", "classify"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_METHODS = tuple(m + b" " for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS",
                                    b"PATCH", b"TRACE", b"CONNECT"))
_PEEK = 24
_MSG_PEEK = socket.MSG_PEEK
# Edge-triggered: peeked bytes stay readable, and a level-triggered watch would fire on them
# again and again while we wait for the rest of a request line.
_WATCH = READ | select.EPOLLET


def classify(head: bytes) -> str:
    """"http1", "h2", "tcp", or "more" (a prefix of a request line or of the preface)."""
    if head.startswith(H2_PREFACE):
        return "h2"
    for m in _METHODS:
        if head.startswith(m):
            return "http1"
    n = len(head)
    if H2_PREFACE.startswith(head) or any(m.startswith(head) for m in _METHODS if n < len(m)):
        return "more"
    return "tcp"


class Detector:
    """Watches one accepted client until it is classified; then `done(verdict)` once, with
    the socket no longer in the poller ("http1", "h2", "tcp", "timeout" or "closed")."""

    __slots__ = ("done", "fd", "poller", "sock", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, poller: Poller, sock: _socket.socket,
                 window: float, done: Callable[[str], None]) -> None:
        self.sock = sock
        self.poller = poller
        self.done = done
        self.fd = sock.fileno()
        poller.register(self.fd, _WATCH, self._readable)
        self.timer = loop.call_later(window, self._expired)

    def _finish(self, verdict: str) -> None:
        self.timer.cancel()
        self.poller.unregister(self.fd)
        self.done(verdict)

    def _readable(self, events: int) -> None:
        try:
            head = self.sock.recv(_PEEK, _MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish("closed")
            return
        if not head:
            # EOF before a byte: nothing to detect; TCP passes the half-close on
            self._finish("tcp")
            return
        verdict = classify(head)
        if verdict != "more":
            self._finish(verdict)
        elif events & ERR:
            self._finish("tcp")

    def _expired(self) -> None:
        self.poller.unregister(self.fd)
        self.done("timeout")
