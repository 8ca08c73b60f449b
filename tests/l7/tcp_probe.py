"""Time to the first line from a TCP server: `python -m tests.l7.tcp_probe HOST PORT N [SEND]`.

N times: connect, send SEND at once when given (a client-first protocol), and read until the
first line (CRLF or LF) arrives; the time from before connect() to that line is measured
(monotonic clock). Prints one JSON object: {"seconds": [...], "lines": [...]}.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def first_line(host: str, port: int, send: bytes) -> tuple[float, str]:
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as s:
        if send:
            s.sendall(send)
        buf = b""
        while b"\n" not in buf:
            data = s.recv(4096)
            if not data:
                break
            buf += data
        return time.monotonic() - t0, buf.decode("utf-8", "replace").rstrip("\r\n")


def main() -> None:
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    send = sys.argv[4].encode() + b"\r\n" if len(sys.argv) > 4 else b""
    results = [first_line(host, port, send) for _ in range(n)]
    print(json.dumps({"seconds": [round(t, 6) for t, _ in results],
                      "lines": [line for _, line in results]}))


if __name__ == "__main__":
    main()
