"""A blocking client for the agent's control socket (used by the CLI and tests)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshnode.errors import AccessError, AgentNotRunningError, from_wire


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
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            lines = sock.makefile("rb")
            first = json.loads(lines.readline() or b"{}")
            if not first.get("ok"):
                if "error" in first:
                    raise from_wire(first["error"])
                raise AgentNotRunningError("the agent closed the control connection",
                                           "check the agent log")
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
                yield json.loads(line)["event"]
        finally:
            sock.close()

    def call(self, op: str, **args: Any) -> Any:
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise AgentNotRunningError("the agent closed the control connection",
                                               "check the agent log")
                buf += chunk
        finally:
            sock.close()
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise from_wire(reply.get("error", {}))
        return reply.get("result")
