"""The HTTP load driver of tests/bench/http.py: `python -m tests.bench.http_load`, one long-lived
process per side (one enrolled in service `client`, so that wrk and h2load, its children, are
captured like an application; one not enrolled, for the middles reached by their own address),
driven by JSON lines on stdin like tests/bench/client.py. Imports nothing of meshnode's.

Operations (each answers one JSON line; errors answer {"error": "..."}):
  wrk     {url, seconds, connections, script?, headers?}
                                            HTTP/1.1 keep-alive, one thread: requests, req/s,
                                            p50/p99 (wrk --latency), errors; a Lua script
                                            (-s) and extra headers (-H) for tests/bench/gateway.py
  h2load  {url, clients, streams, seconds?, requests?, h1?, log, timeout?, more_urls?,
           connect_to?}
                                            one thread; -D seconds or -n requests; p50/p99
                                            from the per-request log file (h2load prints none);
                                            more_urls: taken in turn with url (same authority);
                                            connect_to: HOST:PORT dialled instead of it
  get     {url}                             one GET: status and body (nginx stub_status)
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.bench.ops import serve

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unreadable latency {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def _run(argv: list[str], timeout: float) -> str:
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise ValueError(f"{argv[0]} exited {run.returncode}: {(run.stderr or run.stdout)[-800:]}")
    return run.stdout


def op_wrk(url: str, seconds: float, connections: int, script: str = "",
           headers: Sequence[str] = ()) -> dict[str, Any]:
    extra = [*(["-s", script] if script else []), *(a for h in headers for a in ("-H", h))]
    out = _run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                "--timeout", "5s", *extra, url], seconds + 30)  # wrk takes whole seconds only
    total = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    if total is None or rps is None or "99" not in pct:
        raise ValueError(f"unreadable wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(total[1]), "rps": float(rps[1]), "p50_ms": _ms(pct["50"]),
            "p99_ms": _ms(pct["99"]), "errors": errors + (int(non2xx[1]) if non2xx else 0)}


def _percentiles(log: Path) -> dict[str, float | None]:
    """p50/p99 of the log's third column: microseconds from a request's start to its end."""
    times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines()
                   if line.count("\t") >= 2)
    if not times:
        return {"p50_ms": None, "p99_ms": None}

    def at(p: float) -> float:
        return times[min(len(times) - 1, round(p * (len(times) - 1)))] / 1000.0

    return {"p50_ms": at(0.50), "p99_ms": at(0.99)}


def op_h2load(url: str, clients: int, streams: int, log: str, seconds: float = 0.0,
              requests: int = 0, h1: bool = False, timeout: float = 5.0,
              more_urls: Sequence[str] = (), connect_to: str = "") -> dict[str, Any]:
    size = ["-D", f"{seconds:g}"] if seconds else ["-n", str(requests)]
    # -N: a connection silent this long is closed and its requests count as failed (a middle
    # that accepts and never answers must not hang the run; wrk's --timeout likewise)
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", *size, f"--log-file={log}",
            f"--connection-inactivity-timeout={timeout:g}", *(["--h1"] if h1 else []),
            *([f"--connect-to={connect_to}"] if connect_to else []), url, *more_urls]
    try:
        out = _run(argv, seconds + 4 * timeout + 30)
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                         r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
        rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        if done is None or rps is None or codes is None:
            raise ValueError(f"unreadable h2load output:\n{out}")
        # failed: every request not answered 2xx/3xx (errored and timed out among them)
        return {"requests": int(done[1]), "rps": float(rps[1]), **_percentiles(Path(log)),
                "errors": int(done[3]), "codes": [int(n) for n in codes.groups()]}
    finally:
        Path(log).unlink(missing_ok=True)


def op_get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return {"status": r.status, "body": r.read().decode()}


OPS: dict[str, Callable[..., dict[str, Any]]] = {"wrk": op_wrk, "h2load": op_h2load,
                                                 "get": op_get}


def main() -> None:
    serve(OPS)


if __name__ == "__main__":
    main()
