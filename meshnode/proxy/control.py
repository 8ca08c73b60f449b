"""The worker's end of the agent channel: newline-delimited JSON over AF_UNIX SOCK_STREAM, the
agent's worker socket (or an inherited socket, in tests).

Owns framing: splitting lines, decoding them into typed messages (meshnode.wire, the one codec
of the channel), encoding replies, noticing the agent's end of stream. A line that is not a
message is logged and dropped; a kind this worker does not know (a newer agent's) is skipped and
counted (`unknown`). What a message means is the worker's business (`ControlHandler`).
Messages are handled synchronously in arrival order, which is what makes `sync` a barrier.

Data plane module: must not import bcc, pyroute2 or meshnode.agent/cli/capture/bpf/host.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Protocol, cast

from meshnode.errors import WireError
from meshnode.wire import AgentMessage, WorkerMessage, agent_codec, encode

__all__ = ["MAX_LINE", "ControlChannel", "ControlHandler", "connect_control", "open_control"]

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024 * 1024  # a Reset of a large service is one line; anything beyond is a bug


class ControlHandler(Protocol):
    def on_control_open(self, channel: ControlChannel) -> None:
        """The channel is up: messages may arrive before its opener's await returns."""
        ...

    def on_message(self, msg: AgentMessage) -> None: ...

    def on_control_closed(self) -> None:
        """The agent closed its end (or the channel failed)."""
        ...


class ControlChannel(asyncio.Protocol):
    def __init__(self, handler: ControlHandler) -> None:
        self._handler = handler
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._closed = asyncio.get_running_loop().create_future()
        self._codec = agent_codec()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._handler.on_control_open(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buf[start:end])
            start = end + 1
            if line.strip():
                self._dispatch(line)
        del self._buf[:start]
        if len(self._buf) > MAX_LINE:
            log.error("control line longer than %d bytes; closing the channel", MAX_LINE)
            assert self._transport is not None
            self._transport.close()

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = self._codec.decode(line)
        except WireError as err:
            log.warning("control: %s; ignored: %.200r", err.message, line)
            return
        if msg is None:
            if self._codec.unknown.total() == 1 or log.isEnabledFor(logging.DEBUG):
                log.info("control: unknown message kinds ignored (a newer agent?): %s",
                         dict(self._codec.unknown))
            return
        self._handler.on_message(msg)

    @property
    def unknown(self) -> int:
        """Messages skipped because their kind is unknown here."""
        return self._codec.unknown.total()

    def eof_received(self) -> bool:
        return False  # close our end too; connection_lost tells the worker

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._closed.done():
            self._closed.set_result(None)
        self._handler.on_control_closed()

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, msg: WorkerMessage) -> None:
        if self._transport is None or self._transport.is_closing():
            return  # the agent is gone; nobody to tell
        self._transport.write(encode(msg))

    async def close(self, timeout: float) -> None:
        """Flush what we wrote (close() sends buffered bytes first) and wait up to `timeout`."""
        if self._transport is not None:
            self._transport.close()
        try:
            async with asyncio.timeout(timeout):
                await self._closed
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()


async def connect_control(path: str, handler: ControlHandler) -> ControlChannel:
    """Connect to the agent's worker socket (OSError when nobody listens there)."""
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: ControlChannel(handler), path)
    return channel


async def open_control(fd: int, handler: ControlHandler) -> ControlChannel:
    """Wrap the inherited descriptor `fd` (it becomes owned by the channel)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    _, channel = await loop.create_unix_connection(lambda: ControlChannel(handler), sock=sock)
    return channel
