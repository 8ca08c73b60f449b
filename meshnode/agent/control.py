"""The agent's control socket: a root-only Unix socket speaking one JSON object per line.

Request `{"op": NAME, ...args}`; reply `{"ok": true, "result": ...}` or
`{"ok": false, "error": {type, message, hint, exit_code}}`. Typed errors travel intact so the CLI
prints the same one-line message and exit code as if it had failed locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshnode.errors import MeshnodeError, PermissionError_, UsageError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 1 << 20


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    sock: socket.socket = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if _peer_uid(writer) != 0:
                reply = self._error(PermissionError_("the control socket is root-only"))
                writer.write(json.dumps(reply).encode() + b"\n")
                return
            while line := await reader.readline():
                reply = await self._handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _error(err: MeshnodeError) -> dict[str, Any]:
        return {"ok": False, "error": err.to_wire()}

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            return self._error(UsageError("malformed control request", "send one JSON object"))
        op = str(req.pop("op", ""))
        handler = self.handlers.get(op)
        if handler is None:
            return self._error(UsageError(f"unknown control operation {op!r}",
                                          "upgrade the CLI and the agent together"))
        try:
            return {"ok": True, "result": await handler(req)}
        except MeshnodeError as err:
            return self._error(err)
        except Exception as exc:
            log.exception("control operation %s failed", op)
            return self._error(MeshnodeError(f"{op} failed inside the agent: {exc}",
                                             "see the agent log"))
