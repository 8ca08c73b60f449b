"""A blocking client for the agent's control socket (used by the CLI and tests): requests and
replies are meshnode.wire's typed envelope; an error the agent sends is raised here as the same
typed error, and a reply that cannot be decoded is a WireError.

CLI side: imports nothing of the agent's but this module's own (wire, errors).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshnode.errors import AccessError, AgentNotRunningError, WireError
from meshnode.wire import Failure, Request, Result, StreamItem, StreamStart, decode_reply, encode

_CLOSED = ("the agent closed the control connection", "check the agent log")


class AgentClient:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise AgentNotRunningError(f"no meshnode agent is listening on {self.path}") \
                from None
        except PermissionError:
            sock.close()
            raise AccessError(f"cannot open the control socket {self.path}") from None
        return sock

    def stream(self, op: str, deadline: float | None = None, **args: Any) -> Iterator[Any]:
        """A streaming operation's items, until the caller stops iterating (that closes the
        connection, which ends the stream in the agent) or `deadline` (time.monotonic) passes:
        then the items simply end."""
        sock = self._connect()
        try:
            sock.sendall(encode(Request(op, args)))
            lines = sock.makefile("rb")
            first = lines.readline()
            if not first:
                raise AgentNotRunningError(*_CLOSED)
            match decode_reply(first):
                case StreamStart():
                    pass
                case Failure(error):
                    raise error.error()
                case other:
                    raise WireError(f"the agent answered {op!r} with {type(other).__name__}, "
                                    "not a stream")
            while True:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    sock.settimeout(left)
                else:
                    sock.settimeout(None)
                try:
                    line = lines.readline()
                except TimeoutError:
                    return
                if not line:
                    return  # the agent went away
                match decode_reply(line):
                    case StreamItem(item):
                        yield item
                    case Failure(error):
                        raise error.error()
                    case other:
                        raise WireError(f"unexpected {type(other).__name__} in a stream")
        finally:
            sock.close()

    def call(self, op: str, **args: Any) -> Any:
        sock = self._connect()
        try:
            sock.sendall(encode(Request(op, args)))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise AgentNotRunningError(*_CLOSED)
                buf += chunk
        finally:
            sock.close()
        match decode_reply(buf):
            case Result(value):
                return value
            case Failure(error):
                raise error.error()
            case other:
                raise WireError(f"the agent answered {op!r} with {type(other).__name__}")
