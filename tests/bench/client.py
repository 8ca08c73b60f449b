"""The load generator: `python -m tests.bench.client`, one long-lived process per network
namespace (enrolled in a service where capture is measured), driven by JSON lines on stdin.

One process for the whole run, so that Python's start-up and `meshnode run` are paid once, and so
that every socket it and its forked children open is captured like an application's would be.
Blocking sockets with large buffers: the proxies are measured against the same client, and each
operation is bounded in bytes, round trips or seconds. Imports nothing of meshnode's.

Operations (each answers one JSON line; errors answer {"error": "..."}):
  check       {host, port}                       one 1-byte exchange
  bulk        {host, port, nbytes, direction}    up: send N, wait for the count; down: get N
  pingpong    {host, port, size, count}          round-trip times in µs: p50, p90, p99, mean
  connrate    {host, port, seconds, clients}     connect, 1-byte exchange, close, in a loop
  idle_open   {host, port, n} / idle_close {}    hold N established connections
  wrk         {url, seconds, connections}        wrk's requests/s and latency percentiles
  pin         {cpus}                             CPU affinity for this process and children
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from tests.bench.ops import serve

CHUNK = 1 << 20
_held: list[socket.socket] = []


def _connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exact(s: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = s.recv_into(buf[got:])
        if not n:
            raise ConnectionError(f"closed after {got} of {len(buf)} bytes")
        got += n


def _exchange(s: socket.socket) -> None:
    s.sendall(b"E")
    if s.recv(1) != b"E":
        raise ConnectionError("no echo")


def op_check(host: str, port: int) -> dict[str, Any]:
    with _connect(host, port, timeout=3.0) as s:
        _exchange(s)
    return {"ok": True}


def op_bulk(host: str, port: int, nbytes: int, direction: str) -> dict[str, Any]:
    buf = memoryview(bytearray(CHUNK))
    with _connect(host, port, timeout=120.0) as s:
        t0 = time.perf_counter()
        if direction == "up":
            s.sendall(b"S")
            left = nbytes
            while left:
                n = min(left, CHUNK)
                s.sendall(buf[:n])
                left -= n
            s.shutdown(socket.SHUT_WR)
            _recv_exact(s, buf[:8])
            (got,) = struct.unpack("!Q", buf[:8])
            if got != nbytes:
                raise ConnectionError(f"backend counted {got} of {nbytes} bytes")
        else:
            s.sendall(b"D" + struct.pack("!Q", nbytes))
            left = nbytes
            while left:
                n = s.recv_into(buf[:min(left, CHUNK)])
                if not n:
                    raise ConnectionError(f"closed with {left} bytes to come")
                left -= n
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": nbytes}


def _percentile(ordered: list[int], p: float) -> float:
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))] / 1000.0


def op_pingpong(host: str, port: int, size: int, count: int) -> dict[str, Any]:
    payload = b"x" * size
    buf = memoryview(bytearray(size))
    rtts: list[int] = []
    clock = time.perf_counter_ns
    with _connect(host, port) as s:
        _exchange(s)
        for i in range(count + count // 10):
            t0 = clock()
            s.sendall(payload)
            _recv_exact(s, buf)
            if i >= count // 10:  # the first tenth warms caches and the scheduler up
                rtts.append(clock() - t0)
    rtts.sort()
    return {"p50_us": _percentile(rtts, 0.50), "p90_us": _percentile(rtts, 0.90),
            "p99_us": _percentile(rtts, 0.99), "mean_us": sum(rtts) / len(rtts) / 1000.0}


def _connrate_child(host: str, port: int, start: float, end: float, out: Connection) -> None:
    done = errors = 0
    addr = (host, port)
    while time.monotonic() < start:
        time.sleep(0.001)
    while time.monotonic() < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(5.0)
            s.connect(addr)
            s.sendall(b"E")
            if s.recv(1) == b"E":
                done += 1
            else:
                errors += 1
        except OSError:
            errors += 1
        finally:
            s.close()
    out.send((done, errors))
    out.close()


def op_connrate(host: str, port: int, seconds: float, clients: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")  # children stay in this cgroup and namespace
    start = time.monotonic() + 0.2  # every child starts at once, after the forks
    end = start + seconds
    pipes, procs = [], []
    for _ in range(clients):
        rx, tx = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_connrate_child, args=(host, port, start, end, tx))
        p.start()
        tx.close()
        pipes.append(rx)
        procs.append(p)
    done = errors = 0
    for rx, p in zip(pipes, procs, strict=True):
        if rx.poll(seconds + 30):
            d, e = rx.recv()
            done, errors = done + d, errors + e
        p.join(5)
        if p.is_alive():
            p.kill()
    return {"rate": done / seconds, "connections": done, "errors": errors}


def op_idle_open(host: str, port: int, n: int) -> dict[str, Any]:
    for _ in range(n):
        s = _connect(host, port)
        _exchange(s)  # established end to end, upstream included
        _held.append(s)
    return {"open": len(_held)}


def op_idle_close() -> dict[str, Any]:
    while _held:
        _held.pop().close()
    return {"open": 0}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def op_wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "5s", url]  # wrk takes whole seconds only
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    out = run.stdout
    if run.returncode:
        raise ValueError(f"wrk exited {run.returncode}: {(run.stderr or out).strip()}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise ValueError(f"unreadable wrk output:\n{out}")
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps[1]), "p50_ms": _ms(pct["50"]), "p90_ms": _ms(pct["90"]),
            "p99_ms": _ms(pct["99"]), "errors": errors + (int(non2xx[1]) if non2xx else 0)}


def op_pin(cpus: list[int] | None) -> dict[str, Any]:
    os.sched_setaffinity(0, cpus if cpus else range(os.cpu_count() or 1))
    return {"cpus": sorted(os.sched_getaffinity(0))}


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "check": op_check, "bulk": op_bulk, "pingpong": op_pingpong, "connrate": op_connrate,
    "idle_open": op_idle_open, "idle_close": op_idle_close, "wrk": op_wrk, "pin": op_pin}


def main() -> None:
    serve(OPS)


class ClientError(RuntimeError):
    """The load generator failed an operation or stopped answering."""


class Client:
    """The orchestrator's handle on one load generator process."""

    def __init__(self, proc: subprocess.Popen[str], name: str) -> None:
        self.proc = proc
        self.name = name
        hello = self._read(60.0)
        self.pid = int(hello["pid"])

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            raise ClientError(f"load generator in {self.name} did not answer in {timeout:.0f}s")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        result = self._read(timeout)
        if "error" in result:
            raise ClientError(f"{op} in {self.name}: {result['error']}")
        return result


if __name__ == "__main__":
    main()
