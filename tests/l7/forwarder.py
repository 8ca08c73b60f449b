"""A service that calls another one, as an instrumented app does: `python -m tests.l7.forwarder
NAME PORT UPSTREAM_URL`.

Every request it gets (HTTP/1.1, keep-alive, threaded) makes one GET of UPSTREAM_URL carrying
the incoming `traceparent` and `tracestate` unchanged (what an app's tracing library propagates;
this one makes no span of its own), then answers 200 with JSON: its name, the traceparent it
got, the upstream's status and the upstream's body (parsed when it is JSON). Prints "listening"
once it accepts connections.
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROPAGATED = ("traceparent", "tracestate")


def main() -> None:
    name, port, upstream = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    target = urllib.parse.urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # the head and the body are two writes: without this, Nagle holds the body until the
        # proxy's delayed ACK of the head (40 ms a response)
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            headers = {h: v for h in PROPAGATED if (v := self.headers.get(h)) is not None}
            conn = http.client.HTTPConnection(target.hostname or "", target.port or 80,
                                              timeout=10)
            try:
                conn.request("GET", target.path or "/", headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
            finally:
                conn.close()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            out = json.dumps({"name": name, "traceparent": self.headers.get("traceparent"),
                              "upstream_status": status, "upstream": body}).encode() + b"\n"
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
