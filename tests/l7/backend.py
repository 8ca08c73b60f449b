"""An HTTP/1.1 backend for the L7 tests: `python -m tests.l7.backend NAME PORT [DELAY_MS]`.

Keep-alive (HTTP/1.1), threaded. Every response is JSON naming the backend, with what it saw:
method, path, the request's traceparent, the body length. DELAY_MS: every request waits that
long before it is answered (a slow endpoint). Paths:
  /status/N       answers status N
  /slow/MS        waits MS milliseconds, then answers
  /echo           answers the request body (any method)
  /chunked        answers a chunked body of three parts
  /close          answers without a length, closing the connection (close-delimited)
  /count          {"name", "count"}: how many requests (other than /count) it has answered or
                  is answering, so a test counts what reached the endpoint, retries included
  anything else   200
Prints "listening" once it accepts connections. It listens on 127.0.0.1, or on $L7_BIND (the
multi-host tests bind 0.0.0.0: an endpoint other hosts reach).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    delay = int(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.0
    lock = threading.Lock()
    seen = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # the head and the body are two writes: without this, Nagle holds the body until the
        # proxy's delayed ACK of the head (40 ms a response)
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            path = self.path
            status = 200
            if path == "/count":
                with lock:
                    out = json.dumps({"name": name, "count": seen[0]}).encode() + b"\n"
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                return
            with lock:
                seen[0] += 1
            if delay:
                time.sleep(delay)
            if path.startswith("/status/"):
                status = int(path.split("/")[2])
            elif path.startswith("/slow/"):
                time.sleep(int(path.split("/")[2]) / 1000)
            if path == "/echo":
                out = body
            else:
                out = json.dumps({"name": name, "method": self.command, "path": path,
                                  "traceparent": self.headers.get("traceparent"),
                                  "len": len(body)}).encode() + b"\n"
            if path == "/chunked":
                self.send_response(status)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for part in (b"one,", b"two,", b"three"):
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
                return
            if path == "/close":
                self.send_response(status)
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(out)
                self.close_connection = True
                return
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _answer

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # a load test's connections all wait in the backlog at once

        def handle_error(self, request: object, client_address: object) -> None:
            # A proxy that gives up on an answer (a timeout, a discarded 5xx) closes the
            # connection under the handler: expected here, not worth a traceback.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)  # type: ignore[arg-type]

    server = Server((os.environ.get("L7_BIND", "127.0.0.1"), port), Handler)
    server.daemon_threads = True
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
