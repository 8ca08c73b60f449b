"""A blocking client for the agent's control socket (used by the CLI and tests)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from meshnode.errors import AgentNotRunningError, PermissionError_, from_wire


class AgentClient:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise AgentNotRunningError(f"no meshnode agent is listening on {self.path}") \
                    from None
            except PermissionError:
                raise PermissionError_(f"cannot open the control socket {self.path}") from None
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
