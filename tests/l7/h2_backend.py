"""An HTTP/2 (prior knowledge, cleartext) backend for the L7 tests:
`python -m tests.l7.h2_backend NAME PORT [--garbage]`.

asyncio + h2, many streams per connection. Every response is JSON naming the backend, with
what it saw: method, path, the request's traceparent, the body length. Paths:
  /status/N       answers status N
  /slow/MS        waits MS milliseconds, then answers
  /echo           answers the request body
  /big/N          answers N bytes (flow control both ways)
  /reset          resets the stream (INTERNAL_ERROR) without answering
  anything else   200
`--garbage`: answers every connection with bytes that are not HTTP/2.
Prints "listening" once it accepts connections. It listens on 127.0.0.1, or on $L7_BIND (the
multi-host tests bind 0.0.0.0: an endpoint other hosts reach).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError


class Server(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.sending: dict[int, tuple[bytes, asyncio.Event]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                self.requests[ev.stream_id] = (dict(ev.headers), bytearray())  # type: ignore[arg-type]
            elif isinstance(ev, DataReceived):
                req = self.requests.get(ev.stream_id)
                if req is not None:
                    req[1].extend(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                req = self.requests.pop(ev.stream_id, None)
                if req is not None:
                    asyncio.get_running_loop().create_task(self.answer(ev.stream_id, *req))
            elif isinstance(ev, WindowUpdated):
                for _, ready in self.sending.values():
                    ready.set()
            elif isinstance(ev, StreamReset):
                self.requests.pop(ev.stream_id, None)
                sending = self.sending.pop(ev.stream_id, None)
                if sending is not None:
                    sending[1].set()
            elif isinstance(ev, ConnectionTerminated) and self.transport is not None:
                self.transport.close()
        self.flush()

    async def answer(self, sid: int, headers: dict[str, str], body: bytearray) -> None:
        path = headers.get(":path", "")
        status = 200
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
        elif path.startswith("/slow/"):
            await asyncio.sleep(int(path.split("/")[2]) / 1000)
        elif path == "/reset":
            self.conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            self.flush()
            return
        if path == "/echo":
            out = bytes(body)
        elif path.startswith("/big/"):
            out = b"x" * int(path.split("/")[2])
        else:
            out = json.dumps({"name": self.name, "method": headers.get(":method"),
                              "path": path, "traceparent": headers.get("traceparent"),
                              "len": len(body)}).encode() + b"\n"
        try:
            self.conn.send_headers(sid, [(":status", str(status)),
                                         ("content-length", str(len(out))),
                                         ("content-type", "application/json")])
            await self.send_body(sid, out)
        except ProtocolError:
            pass  # the stream was reset meanwhile
        self.flush()

    async def send_body(self, sid: int, out: bytes) -> None:
        ready = asyncio.Event()
        self.sending[sid] = (out, ready)
        view = memoryview(out)
        while view:
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                ready.clear()
                self.flush()
                await ready.wait()
                if sid not in self.sending:
                    return
                continue
            self.conn.send_data(sid, bytes(view[:window]))
            view = view[window:]
        self.sending.pop(sid, None)
        self.conn.end_stream(sid)


class Garbage(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno")  # type: ignore[attr-defined]


async def serve(name: str, port: int, garbage: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        (lambda: Garbage()) if garbage else (lambda: Server(name)),
        os.environ.get("L7_BIND", "127.0.0.1"), port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), "--garbage" in sys.argv[3:]))


if __name__ == "__main__":
    main()
