"""Runs inside a VM with Debian's python3 (stdlib only: starting a process costs ~35x under TCG,
so one invocation does a whole step and prints one JSON line).

  guest.py serve NAME PORT                 HTTP server answering NAME (run it enrolled)
  guest.py calls URL N [URL ...]           N GETs to each URL, replies counted per instance
                                           (run enrolled); one answer per URL, keyed by it,
                                           and the agent's capture status under "capture"
  guest.py loop URL STOPFILE               GETs until STOPFILE exists (run enrolled); makes
                                           STOPFILE.started after the first answer
  guest.py wait-gone SERVICE ADDR TIMEOUT  until ADDR leaves SERVICE in this agent's view
  guest.py wait-count SERVICE N TIMEOUT    until SERVICE has N endpoints here (and ready)
  guest.py wait-ready TIMEOUT              until the agent answers and is ready
  guest.py wait-registry TIMEOUT           until the agent is connected to its registry
  guest.py status                          the agent's status (control socket)
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

CONTROL = "/run/meshnode/agent.sock"


def serve(name: str, port: int) -> None:
    body = name.encode()

    class Reply(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http.server.ThreadingHTTPServer(("0.0.0.0", port), Reply).serve_forever()


def get(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return True, r.read().decode()
    except OSError as exc:
        return False, repr(exc)


def tally(url: str, more: Callable[[int], bool], started: str = "") -> dict[str, Any]:
    """GETs while `more(calls so far)`; replies counted per instance. `started`: a file made
    after the first answer, so a caller can wait for the calls to be under way."""
    replies: Counter[str] = Counter()
    errors: list[str] = []
    while more(len(errors) + sum(replies.values())):
        # 10 s: a call is lost when it fails or hangs, not when an emulated (TCG) VM starved
        # by two agents restarting at once answers it in 3.5 s (seen once in scenario e)
        ok, text = get(url, 10.0)
        if ok:
            replies[text] += 1
            if started and not os.path.exists(started):
                open(started, "w").close()
        else:
            errors.append(f"{time.time():.1f} {text}")
    return {"ok": sum(replies.values()), "failed": len(errors), "replies": dict(replies),
            "errors": errors[:5]}


def control(op: str) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(CONTROL)
        s.sendall(json.dumps({"op": op}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)["value"]  # meshnode.wire.Result: {"t": "result", "value": ...}


def endpoints(service: str) -> set[str]:
    for svc in control("status")["services"]:
        if svc["name"] == service:
            return {e["addr"] for e in svc["endpoints"]}
    return set()


def wait_count(service: str, n: int, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    seen: set[str] = set()
    while time.monotonic() - t0 < timeout:
        try:
            seen = endpoints(service)
            if len(seen) == n:
                break
        except (OSError, ValueError, KeyError):
            pass  # agent (re)starting
        time.sleep(0.2)
    return {"count": len(seen), "endpoints": sorted(seen),
            "after_s": round(time.monotonic() - t0, 2)}


def _wait_status(what: str, holds: Callable[[dict[str, Any]], bool],
                 timeout: float) -> dict[str, Any]:
    """Until the agent's status satisfies `holds`: {what: bool, "after_s": seconds}."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if holds(control("status")):
                return {what: True, "after_s": round(time.monotonic() - t0, 2)}
        except (OSError, ValueError, KeyError):
            pass  # no control socket yet (bcc still compiling), or the agent restarting
        time.sleep(0.5)
    return {what: False, "after_s": round(time.monotonic() - t0, 2)}


def wait_ready(timeout: float) -> dict[str, Any]:
    return _wait_status("ready", lambda s: bool(s["ready"]), timeout)


def wait_registry(timeout: float) -> dict[str, Any]:
    return _wait_status("connected", lambda s: bool(s["registry"]["connected"]), timeout)


def wait_gone(service: str, addr: str, timeout: float) -> dict[str, Any]:
    print(json.dumps({"watching": addr}), flush=True)  # the caller kills only after this
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if addr not in endpoints(service):
                return {"gone": True, "after_s": round(time.monotonic() - t0, 2)}
        except (OSError, ValueError, KeyError):
            pass  # agent restarting: ask again
        time.sleep(0.1)
    return {"gone": False, "after_s": round(time.monotonic() - t0, 2)}


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        serve(args[0], int(args[1]))
        return
    if cmd == "calls":
        n = int(args[1])
        urls = [args[0], *args[2:]]
        out = {url: tally(url, lambda done: done < n) for url in urls}
        out["capture"] = control("status")["capture"]
    elif cmd == "loop":
        out = tally(args[0], lambda done: not os.path.exists(args[1]), args[1] + ".started")
    elif cmd == "wait-gone":
        out = wait_gone(args[0], args[1], float(args[2]))
    elif cmd == "wait-count":
        out = wait_count(args[0], int(args[1]), float(args[2]))
    elif cmd == "wait-ready":
        out = wait_ready(float(args[0]))
    elif cmd == "wait-registry":
        out = wait_registry(float(args[0]))
    elif cmd == "wait-identity":
        out = _wait_status("identity", lambda s: bool(s["identity"]["ready"]), float(args[0]))
    elif cmd == "get":  # one plain GET (not enrolled: not captured, straight to the address)
        t0 = time.monotonic()
        ok, text = get(args[0], 5.0)
        out = {"ok": ok, "text": text[:200], "after_s": round(time.monotonic() - t0, 3)}
    elif cmd == "status":
        out = control("status")
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
