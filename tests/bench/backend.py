"""The one backend every variant relays to: `python -m tests.bench.backend PORT [HOST]`.

A single uvloop process, started unchanged in each network namespace, so that only the middle
differs between variants. The first byte of a connection picks what it does:
  E  echo every byte back (ping-pong, connection setup: the 1-byte exchange is `E` itself)
  S  sink: count bytes until the client's half-close, then answer the count (8 bytes, big end)
  D  source: read an 8-byte length N, send N bytes, close
  G  HTTP/1.1 keep-alive: a fixed 2-byte 200 answer per request (wrk, nginx http)
Prints `listening` once bound (to HOST, 127.0.0.1 unless given). Imports nothing of meshnode's.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import sys
from typing import cast

import uvloop

CHUNK = memoryview(bytes(1 << 20))  # immutable: a transport may keep a reference to it
HTTP_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
           b"Connection: keep-alive\r\n\r\nok")
# One read buffer for the whole process: every read is consumed before the next one starts.
_SCRATCH = memoryview(bytearray(1 << 20))


class BackendConn(asyncio.BufferedProtocol):
    __slots__ = ("count", "head", "mode", "paused", "remaining", "transport")

    def __init__(self) -> None:
        self.mode = b""
        self.head = b""  # D: the length bytes so far; G: an unfinished request
        self.count = 0
        self.remaining = 0
        self.paused = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        data = _SCRATCH[:nbytes]
        if not self.mode:
            self.mode = bytes(data[:1])
        if self.mode == b"E":
            assert self.transport is not None
            self.transport.write(bytes(data))  # a copy: _SCRATCH is reused by the next read
        elif self.mode == b"S":
            self.count += nbytes
        elif self.mode == b"D":
            self._start_source(bytes(data))
        else:
            self._http(bytes(data))

    def _start_source(self, data: bytes) -> None:
        if len(self.head) >= 9:
            return  # the request is complete: anything more is ignored
        self.head += data
        if len(self.head) >= 9:
            (self.remaining,) = struct.unpack("!Q", self.head[1:9])
            self._pump()

    def _pump(self) -> None:
        assert self.transport is not None
        while self.remaining and not self.paused:
            n = min(self.remaining, len(CHUNK))
            self.transport.write(CHUNK[:n])
            self.remaining -= n
        if not self.remaining:
            self.transport.close()  # flushes first

    def _http(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.head + data
        requests = buf.count(b"\r\n\r\n")
        if requests:
            self.transport.write(HTTP_OK * requests)
            buf = buf[buf.rindex(b"\r\n\r\n") + 4:]
        self.head = buf

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == b"D" and self.remaining:
            self._pump()

    def eof_received(self) -> bool:
        if self.mode == b"S" and self.transport is not None:
            self.transport.write(struct.pack("!Q", self.count - 1))  # minus the mode byte
        return False  # close (after flushing)


async def serve(port: int, host: str = "127.0.0.1") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    server = await asyncio.get_running_loop().create_server(BackendConn, sock=sock, backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of idle connections
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(int(sys.argv[1]), *sys.argv[2:3]))


if __name__ == "__main__":
    main()
