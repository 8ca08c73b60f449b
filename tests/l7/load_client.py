"""A keep-alive HTTP/1.1 load client for the traffic tests: `python -m tests.l7.load_client URL
[--n N] [--seconds S] [--conns C] [-H 'Name: value']...`.

C threads, each with one keep-alive connection (http.client), send GET URL until N requests
were sent in all; with --seconds, until S seconds have passed; with --n 0, until a line
arrives on stdin (or stdin closes). One JSON
line per request on stdout, as it completes: [status, backend name, seconds, Retry-After,
x-meshnode-error, error]. Status 0 and `error`: the request failed at the socket (the
connection is made again for the next one). The backend name is tests/l7/backend.py's JSON
`name` ("" for an answer of the proxy's own). Prints "started" first.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("-H", dest="headers", action="append", default=[])
    args = ap.parse_args()
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path + (f"?{url.query}" if url.query else "") or "/"
    headers = dict(h.split(":", 1) for h in args.headers)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    lock = threading.Lock()
    left = [args.n]
    stop = threading.Event()

    def take() -> bool:
        if stop.is_set():
            return False
        if args.seconds:
            return time.monotonic() < until
        if args.n == 0:
            return True
        with lock:
            if left[0] <= 0:
                return False
            left[0] -= 1
            return True

    def emit(row: list[object]) -> None:
        line = json.dumps(row)
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        while take():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=10)
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                seconds = time.monotonic() - t0
                name = ""
                if body.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        name = json.loads(body).get("name", "")
                emit([resp.status, name, seconds, resp.getheader("retry-after"),
                      resp.getheader("x-meshnode-error"), ""])
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                emit([0, "", time.monotonic() - t0, None, None, f"{type(exc).__name__}: {exc}"])
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.conns)]
    print("started", flush=True)
    until = time.monotonic() + args.seconds
    for t in threads:
        t.start()
    if args.n == 0 and not args.seconds:
        sys.stdin.readline()
        stop.set()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
