"""A raw-socket HTTP/1.1 client for the bad-input tests: it sends exact bytes and reports what
came back. `python -m tests.l7.raw_client HOST PORT`, then one JSON command per stdin line,
one JSON answer per stdout line (it prints {"ready": true} first). Byte strings are latin-1.

  {"op": "open", "id": I}                 connect connection I to HOST:PORT
  {"op": "send", "id": I, "data": D}      send D on I
  {"op": "read", "id": I, "timeout": T}   read until a whole response, the connection's end or
                                          T seconds: {"status", "headers": [[name, value]],
                                          "body", "complete", "closed" (EOF), "reset",
                                          "seconds" (to the response's end), "raw"}
                                          (status 0: no response head); after a response
                                          saying `connection: close`, "closed" tells
                                          whether the connection did end (within 1 s)
  {"op": "ask", "data": D, "timeout": T}  open, send D, read, close: "read"'s answer
  {"op": "drip", "id": I, "data": D, "interval": S}
                                          in the background: D one byte every S seconds until
                                          the connection answers or ends
  {"op": "dripped", "id": I}              wait for that drip: "read"'s answer, plus "sent"
                                          (bytes dripped before the answer)
  {"op": "hold", "n": N, "data": D}       open N connections, send D on each, keep them
                                          (never read): {"open": connections still open}
  {"op": "close", "id": I}                close I
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from typing import Any

import httptools


class _Response:
    def __init__(self) -> None:
        self.headers: list[list[str]] = []
        self.body = b""
        self.head = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append([name.decode("latin-1"), value.decode("latin-1")])

    def on_headers_complete(self) -> None:
        self.head = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def read(sock: socket.socket, timeout: float, t0: float | None = None) -> dict[str, Any]:
    """One response from `sock` (or what there is of it after `timeout`)."""
    t0 = time.monotonic() if t0 is None else t0
    resp = _Response()
    parser = httptools.HttpResponseParser(resp)
    raw = b""
    closed = reset = False
    deadline = time.monotonic() + timeout
    while not resp.complete:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            break
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            reset = True
            break
        if not data:
            closed = True
            break
        raw += data
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            break
    seconds = time.monotonic() - t0
    status = parser.get_status_code() if resp.head else 0
    says_close = any(n.lower() == "connection" and v.lower() == "close"
                     for n, v in resp.headers)
    if resp.complete and says_close and not closed and not reset \
            and select.select([sock], [], [], 1.0)[0]:
        # does the connection end, as the answer says? (its FIN follows at once)
        try:
            closed = sock.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            reset = True
    return {"status": status, "headers": resp.headers, "body": resp.body.decode("latin-1"),
            "complete": resp.complete, "closed": closed, "reset": reset,
            "seconds": seconds, "raw": raw[:2000].decode("latin-1")}


class Client:
    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.conns: dict[str, socket.socket] = {}
        self.drips: dict[str, threading.Thread] = {}
        self.dripped: dict[str, dict[str, Any]] = {}
        self.held: list[socket.socket] = []

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        data = cmd.get("data", "").encode("latin-1")
        if op == "open":
            self.conns[cmd["id"]] = self.connect()
            return {"ok": True}
        if op == "send":
            self.conns[cmd["id"]].sendall(data)
            return {"ok": True}
        if op == "read":
            return read(self.conns[cmd["id"]], cmd.get("timeout", 5.0))
        if op == "ask":
            t0 = time.monotonic()
            with self.connect() as sock:
                sock.sendall(data)
                return read(sock, cmd.get("timeout", 5.0), t0)
        if op == "drip":
            sock = self.conns[cmd["id"]]
            thread = threading.Thread(target=self._drip, args=(cmd["id"], sock, data,
                                                               cmd["interval"]))
            self.drips[cmd["id"]] = thread
            thread.start()
            return {"ok": True}
        if op == "dripped":
            self.drips.pop(cmd["id"]).join()
            return self.dripped.pop(cmd["id"])
        if op == "hold":
            for _ in range(cmd["n"]):
                sock = self.connect()
                sock.sendall(data)
                self.held.append(sock)
            return {"open": sum(1 for s in self.held if _open(s))}
        if op == "close":
            self.conns.pop(cmd["id"]).close()
            return {"ok": True}
        return {"error": f"unknown op {op}"}

    def _drip(self, key: str, sock: socket.socket, data: bytes, interval: float) -> None:
        t0 = time.monotonic()
        sent = 0
        for i in range(len(data)):
            try:
                sock.sendall(data[i:i + 1])
            except OSError:
                break
            sent += 1
            if select.select([sock], [], [], interval)[0]:
                break  # an answer, or the end
        answer = read(sock, 5.0, t0)
        answer["sent"] = sent
        self.dripped[key] = answer


def _open(sock: socket.socket) -> bool:
    if not select.select([sock], [], [], 0)[0]:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def main() -> None:
    client = Client(sys.argv[1], int(sys.argv[2]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            answer = client.handle(json.loads(line))
        except OSError as exc:
            answer = {"error": repr(exc)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
