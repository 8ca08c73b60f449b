"""The agent's control socket: a root-only Unix socket speaking one JSON object per line.

Request `{"op": NAME, ...args}`; reply `{"ok": true, "result": ...}` or
`{"ok": false, "error": {type, message, hint, exit_code}}`. A streaming operation (its handler
returns an async iterator, e.g. `tap`) answers `{"ok": true, "stream": true}` and then one
`{"event": ...}` line per item, until the client closes the connection. Typed errors travel
intact so the CLI prints the same one-line message and exit code as if it had failed locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from meshnode.errors import AccessError, MeshnodeError, UsageError

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
                reply = self._error(AccessError("the control socket is root-only"))
                writer.write(json.dumps(reply).encode() + b"\n")
                return
            while line := await reader.readline():
                reply = await self._handle(line)
                stream = reply.pop("stream", None)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                if stream is not None:
                    await self._stream(stream, reader, writer)
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _stream(items: AsyncIterator[Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Write items until the client hangs up (its end of stream) or they run out."""
        hangup = asyncio.ensure_future(reader.read())
        try:
            while True:
                item = asyncio.ensure_future(anext(items))
                await asyncio.wait({item, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await item
                    return
                try:
                    event = item.result()
                except StopAsyncIteration:
                    return
                writer.write(json.dumps({"event": event}).encode() + b"\n")
                await writer.drain()
        finally:
            hangup.cancel()
            if inspect.isasyncgen(items):
                await items.aclose()

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
            result = await handler(req)
            if isinstance(result, AsyncIterator):
                return {"ok": True, "stream": result}
            return {"ok": True, "result": result}
        except MeshnodeError as err:
            return self._error(err)
        except Exception as exc:
            log.exception("control operation %s failed", op)
            return self._error(MeshnodeError(f"{op} failed inside the agent: {exc}",
                                             "see the agent log"))
