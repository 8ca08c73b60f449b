"""The agent's control socket: a root-only Unix socket speaking one JSON object per line, the
typed envelope of meshnode.wire.

A `Request` (op name and an args mapping) gets one reply: `Result`, or `Failure` with the typed
error, or, for a streaming operation (its handler returns an async iterator, e.g. `tap`),
`StreamStart` and then one `StreamItem` per item until the client closes the connection.
Typed errors travel intact (errno included) so the CLI prints the same one-line message and
exit code as if it had failed locally. A line that is not a request gets a WireError back.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from meshnode.errors import AccessError, MeshnodeError, UsageError, WireError
from meshnode.wire import (
    ErrorInfo,
    Failure,
    Reply,
    Result,
    StreamItem,
    StreamStart,
    decode_request,
    encode,
)

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
                writer.write(encode(self._error(AccessError("the control socket is root-only"))))
                return
            while line := await reader.readline():
                reply, stream = await self._handle(line)
                writer.write(encode(reply))
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
        item: asyncio.Future[Any] | None = None
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
                writer.write(encode(StreamItem(event)))
                await writer.drain()
        finally:
            hangup.cancel()
            # Cancelled mid-wait (the agent stopping): the pending step must end before the
            # generator can be closed ("aclose(): asynchronous generator is already running").
            if item is not None and not item.done():
                item.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await item
            if inspect.isasyncgen(items):
                await items.aclose()

    @staticmethod
    def _error(err: MeshnodeError) -> Failure:
        return Failure(ErrorInfo.of(err))

    async def _handle(self, line: bytes) -> tuple[Reply, AsyncIterator[Any] | None]:
        """The reply to one request line, and the items to stream after it (if any)."""
        try:
            req = decode_request(line)
        except WireError as err:
            return self._error(err), None
        handler = self.handlers.get(req.op)
        if handler is None:
            return self._error(UsageError(f"unknown control operation {req.op!r}",
                                          "upgrade the CLI and the agent together")), None
        try:
            result = await handler(dict(req.args))
            if isinstance(result, AsyncIterator):
                return StreamStart(), result
            return Result(result), None
        except MeshnodeError as err:
            return self._error(err), None
        except Exception as exc:
            log.exception("control operation %s failed", req.op)
            return self._error(MeshnodeError(f"{req.op} failed inside the agent: {exc}",
                                             "see the agent log")), None
