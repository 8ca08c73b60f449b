"""The drill's load generator: `python load.py --host VIP --port P [options]`.

Runs inside a host's namespace as an enrolled application (`meshnode run --service client`),
so every connection it opens is captured like an app's; it imports nothing of meshnode's.

  short calls   K threads at a fixed total rate: each call is a NEW TCP connection to the VIP,
                a random request line, the exact echo read back, close. A failure is counted
                by kind: refused, reset, timeout, eof (closed early), wrong (bytes differ) or
                the errno's name.
  streams       M persistent connections, each sending a numbered line every --interval and
                checking the exact echo. Any error, EOF or wrong byte breaks the stream (counted
                by kind); it is then reopened, retrying every 100 ms (failed reopenings are
                counted apart: they are not established streams lost).

Every --bucket seconds one JSON line goes to stdout with what happened in it ("t0"/"t" are
CLOCK_MONOTONIC, which the drill shares, so it can cut the run into phases):
  ok, fail{kind: n}, fs (when each failed call had started, the first FS_MAX of the bucket:
  the drill tells the calls under way at a fault from new ones), ff/lf (first and last failure
  time), stall (the longest time without a successful call, ending or still open in this
  bucket), lat_max (slowest successful call), broken{kind: n}, reopen_fail, opened, msgs, up
  (streams established at the end).

Commands, one JSON line each on stdin (each is acknowledged with {"ack": OP}):
  {"op": "recycle"}        every stream closes cleanly and reopens (after an upgrade, so the
                           old workers' drain does not cut them later, in another phase)
  {"op": "stop"} or EOF    stop, print the last bucket and {"done": true, "totals": {...}}
"""

from __future__ import annotations

import argparse
import errno
import json
import secrets
import socket
import sys
import threading
import time
from typing import Any

CLOCK = time.monotonic
FS_MAX = 200  # failed calls' start times per bucket (an outage fails thousands: counts suffice)


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower()
    return type(exc).__name__


class Broken(Exception):
    """The peer closed early (`eof`) or answered other bytes (`wrong`)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _recv_exact(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        d = s.recv(n - len(got))
        if not d:
            raise Broken("eof")
        got += d
    return got


def _add(counts: dict[str, int], kind: str) -> None:
    counts[kind] = counts.get(kind, 0) + 1


class Stats:
    """Counters of the current bucket, shared by every thread under one lock (a few hundred
    updates a second: contention is not a concern)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.last_ok = CLOCK()
        self.up = 0
        self.totals: dict[str, Any] = {"ok": 0, "fail": {}, "broken": {}, "reopen_fail": 0,
                                       "msgs": 0}
        self._reset(CLOCK())

    def _reset(self, t0: float) -> None:
        self.t0 = t0
        self.ok = self.reopen_fail = self.opened = self.msgs = 0
        self.fs: list[float] = []
        self.fail: dict[str, int] = {}
        self.broken: dict[str, int] = {}
        self.ff: float | None = None
        self.lf: float | None = None
        self.stall = 0.0
        self.lat_max = 0.0

    def _failure(self, now: float) -> None:
        if self.ff is None:
            self.ff = now
        self.lf = now

    def call_ok(self, started: float, now: float) -> None:
        with self.lock:
            self.ok += 1
            self.stall = max(self.stall, now - self.last_ok)
            self.last_ok = now
            self.lat_max = max(self.lat_max, now - started)

    def call_failed(self, kind: str, started: float, now: float) -> None:
        with self.lock:
            _add(self.fail, kind)
            if len(self.fs) < FS_MAX:
                self.fs.append(round(started, 4))
            self._failure(now)

    def stream_opened(self) -> None:
        with self.lock:
            self.opened += 1
            self.up += 1

    def stream_closed(self, broken: str | None, now: float) -> None:
        with self.lock:
            self.up -= 1
            if broken is not None:
                _add(self.broken, broken)
                self._failure(now)

    def reopen_failed(self, now: float) -> None:
        with self.lock:
            self.reopen_fail += 1
            self._failure(now)

    def message(self) -> None:
        with self.lock:
            self.msgs += 1

    def rotate(self) -> dict[str, Any]:
        """Close the current bucket: its JSON record."""
        with self.lock:
            now = CLOCK()
            rec = {"t0": round(self.t0, 4), "t": round(now, 4), "ok": self.ok,
                   "fail": self.fail, "fs": self.fs,
                   "ff": None if self.ff is None else round(self.ff, 4),
                   "lf": None if self.lf is None else round(self.lf, 4),
                   "stall": round(max(self.stall, now - self.last_ok), 4),
                   "lat_max": round(self.lat_max, 4), "broken": self.broken,
                   "reopen_fail": self.reopen_fail, "opened": self.opened, "msgs": self.msgs,
                   "up": self.up}
            t = self.totals
            t["ok"] += self.ok
            t["reopen_fail"] += self.reopen_fail
            t["msgs"] += self.msgs
            for k, n in self.fail.items():
                t["fail"][k] = t["fail"].get(k, 0) + n
            for k, n in self.broken.items():
                t["broken"][k] = t["broken"].get(k, 0) + n
            self._reset(now)
        return rec

    def emit(self, record: dict[str, Any]) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
            sys.stdout.flush()


def caller(addr: tuple[str, int], period: float, timeout: float, stats: Stats,
           stop: threading.Event, tid: int) -> None:
    """Short calls, one connection each, paced at one per `period` (0: back to back). A late
    thread does not burst to catch up: the rate stays the rate."""
    nxt = CLOCK()
    seq = 0
    while not stop.is_set():
        seq += 1
        request = f"{tid}:{seq}:{secrets.token_hex(8)}\n".encode()
        started = CLOCK()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(addr)
            s.sendall(request)
            if _recv_exact(s, len(request)) != request:
                raise Broken("wrong")
        except Broken as exc:
            stats.call_failed(exc.kind, started, CLOCK())
        except OSError as exc:
            stats.call_failed(error_kind(exc), started, CLOCK())
        else:
            stats.call_ok(started, CLOCK())
        finally:
            s.close()
        if period:
            nxt = max(nxt + period, CLOCK())
            stop.wait(nxt - CLOCK())


def streamer(addr: tuple[str, int], interval: float, timeout: float, stats: Stats,
             stop: threading.Event, recycle: list[int], sid: int) -> None:
    """One long-lived stream, reopened whenever it breaks or is recycled."""
    while not stop.is_set():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except OSError:
            s.close()
            stats.reopen_failed(CLOCK())
            stop.wait(0.1)
            continue
        stats.stream_opened()
        generation = recycle[0]
        broken: str | None = None
        seq = 0
        try:
            while not stop.is_set() and recycle[0] == generation:
                seq += 1
                line = f"{sid}:{generation}:{seq:08d}\n".encode()
                s.sendall(line)
                if _recv_exact(s, len(line)) != line:
                    raise Broken("wrong")
                stats.message()
                stop.wait(interval)
        except Broken as exc:
            broken = exc.kind
        except OSError as exc:
            broken = error_kind(exc)
        stats.stream_closed(broken, CLOCK())
        s.close()
        if broken is not None:
            stop.wait(0.1)


def commands(stats: Stats, stop: threading.Event, recycle: list[int]) -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "recycle":
            recycle[0] += 1
        stats.emit({"ack": op})
        if op == "stop":
            break
    stop.set()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="load.py")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=4, help="short-call threads")
    p.add_argument("--rate", type=float, default=400.0,
                   help="short calls per second in all (0: as fast as they go)")
    p.add_argument("--streams", type=int, default=4, help="long-lived streams")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between messages")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds a call may take")
    p.add_argument("--bucket", type=float, default=0.1, help="seconds per report line")
    a = p.parse_args(argv)
    addr = (a.host, a.port)
    stats = Stats()
    stop = threading.Event()
    recycle = [0]  # the streams' generation: bumping it recycles them
    period = a.threads / a.rate if a.rate > 0 else 0.0
    threads = [threading.Thread(target=caller, args=(addr, period, a.timeout, stats, stop, i),
                                daemon=True) for i in range(a.threads)]
    threads += [threading.Thread(target=streamer, daemon=True,
                                 args=(addr, a.interval, a.timeout, stats, stop, recycle, i))
                for i in range(a.streams)]
    stats.emit({"ready": True})
    for t in threads:
        t.start()
    threading.Thread(target=commands, args=(stats, stop, recycle), daemon=True).start()
    while not stop.wait(a.bucket):
        stats.emit(stats.rotate())
    for t in threads:
        t.join(a.timeout + 1)
    stats.emit(stats.rotate())
    stats.emit({"done": True, "totals": stats.totals})


if __name__ == "__main__":
    main()
