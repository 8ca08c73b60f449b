"""An HTTP/1.1 endpoint for the bad-input tests that records exactly what reached it and can
answer like a broken server: `python -m tests.l7.raw_backend NAME PORT`.

Asyncio, keep-alive. Each connection's bytes are kept as received, and read with httptools
into requests (method, path, headers, body); a request's answer depends on its path:
  /garbage        a line that is not HTTP (an SSH banner), then the connection closes
  /truncated      Content-Length 1000, 10 bytes of body, then the connection closes
  /truncated-chunked  a chunked body cut off in its second chunk (the connection closes)
  /both-lengths   a response with both Content-Length and Transfer-Encoding: chunked
  /big-head       a response whose header block is 200 KiB
  /twice          the response, and a second one in the same write (a response splitter)
  /big/N          N bytes of body
  /slow/MS        waits MS milliseconds, then answers
  /_seen          (asked directly, not through the mesh) JSON: "requests", every request read
                  so far as {"conn", "method", "path", "headers", "body"} (latin-1 strings),
                  and "connections", each connection's raw bytes (latin-1) and its parse
                  error, if any ("conn" indexes them); /_seen requests are not recorded
  /_stalled       (asked directly) JSON {"stalled": connections whose writes wait for the
                  reader (the send buffer is full)}
  anything else   200, JSON {"name", "path", "len"}
Prints "listening" once it accepts connections.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httptools


class Conn(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.n = len(server.conns)
        self.raw = bytearray()
        self.error = ""
        server.conns.append(self)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.body = b""
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self.answer())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.raw += data
        if self.error:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.error = repr(exc)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)

    def on_message_begin(self) -> None:
        self.headers, self.url, self.body = [], b"", b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        req = {"conn": self.n, "method": self.parser.get_method().decode(),
               "path": self.url.decode("latin-1"),
               "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
               "body": self.body.decode("latin-1")}
        if req["path"] not in ("/_seen", "/_stalled"):
            self.server.requests.append(req)
        self.queue.put_nowait(req)

    async def answer(self) -> None:
        while (req := await self.queue.get()) is not None:
            if self.transport is None or self.transport.is_closing():
                return
            if not await self.respond(req["path"], req):
                self.transport.close()
                return

    async def respond(self, path: str, req: dict[str, Any]) -> bool:
        """Answer one request; False: close the connection after it."""
        assert self.transport is not None
        write = self.transport.write
        if path == "/_seen":
            out = json.dumps({"requests": self.server.requests,
                              "connections": [{"raw": c.raw.decode("latin-1"),
                                               "error": c.error}
                                              for c in self.server.conns]})
            write(_ok(out.encode()))
            return True
        if path == "/_stalled":
            write(_ok(json.dumps({"stalled": len(self.server.paused)}).encode()))
            return True
        if path == "/garbage":
            write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            return False
        if path == "/truncated":
            write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            return False
        if path == "/truncated-chunked":
            write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n"
                  b"3e8\r\n0123456789")
            return False
        if path == "/both-lengths":
            write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n")
            return True
        if path == "/big-head":
            write(b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"p" * (200 << 10) + b"\r\n"
                  b"content-length: 2\r\n\r\nok")
            return True
        if path == "/twice":
            write(_ok(b"first") + _ok(b"SMUGGLED"))
            return True
        if path.startswith("/big/"):
            n = int(path.split("/")[2])
            write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % n)
            block = b"b" * (1 << 16)
            while n > 0:
                write(block[:n])
                n -= len(block)
                if self.transport.get_write_buffer_size() > (1 << 20):
                    await self.server.drained(self)
            return True
        if path.startswith("/slow/"):
            await asyncio.sleep(int(path.split("/")[2]) / 1000)
        write(_ok(json.dumps({"name": self.server.name, "path": path,
                              "len": len(req["body"])}).encode() + b"\n"))
        return True

    def pause_writing(self) -> None:
        self.server.paused.add(self)

    def resume_writing(self) -> None:
        self.server.paused.discard(self)


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" \
        % (len(body), body)


class Server:
    def __init__(self, name: str) -> None:
        self.name = name
        self.conns: list[Conn] = []
        self.requests: list[dict[str, Any]] = []
        self.paused: set[Conn] = set()

    async def drained(self, conn: Conn) -> None:
        """Until the connection's send buffer drains (the reader is slow or stopped)."""
        while conn in self.paused and conn.transport is not None \
                and not conn.transport.is_closing():
            await asyncio.sleep(0.01)


async def main() -> None:
    server = Server(sys.argv[1])
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Conn(server), "127.0.0.1", int(sys.argv[2]),
                                   backlog=512)
    print("listening", flush=True)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
