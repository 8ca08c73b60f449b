"""The real clients of tests/bench/kernel.py: `python -m tests.bench.app_load`, one long-lived
process per side (one enrolled in service `client`, so that redis-benchmark, pgbench and h2load,
its children, are captured and resolve `<service>.mesh` like an application; one not enrolled,
for the servers reached directly), driven by JSON lines on stdin like tests/bench/client.py.
Imports nothing of meshnode's.

Operations (each answers one JSON line; errors answer {"error": "..."}):
  resolve  {name}                            the IPv4 addresses getaddrinfo gives for a name
  redis    {host, port, tests, requests, clients}
                                             redis-benchmark --csv: req/s and p50 (ms) per test
  pgbench  {host, port, seconds, clients}    pgbench -S (select-only), one thread: tps, mean
                                             latency (ms), transactions, failed
  h2load   (tests/bench/http_load.py's)      h2c load: req/s, p50/p99 from its log
"""

from __future__ import annotations

import csv
import io
import re
import socket
from collections.abc import Callable
from typing import Any

from tests.bench.http_load import _run, op_h2load
from tests.bench.ops import serve


def op_resolve(name: str) -> dict[str, Any]:
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return {"addrs": sorted({str(i[4][0]) for i in infos})}


def op_redis(host: str, port: int, tests: str, requests: int, clients: int) -> dict[str, Any]:
    # -q --csv: one row per test (PING_INLINE, PING_MBULK, SET, GET for "ping,set,get")
    out = _run(["redis-benchmark", "-h", host, "-p", str(port), "-t", tests,
                "-n", str(requests), "-c", str(clients), "--csv"], 120)
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows or "rps" not in rows[0]:
        raise ValueError(f"unreadable redis-benchmark output:\n{out[-800:]}")
    return {"rps": {r["test"]: float(r["rps"]) for r in rows},
            "p50_ms": {r["test"]: float(r["p50_latency_ms"]) for r in rows}}


def op_pgbench(host: str, port: int, seconds: float, clients: int) -> dict[str, Any]:
    # -n: no vacuum first (select-only writes nothing); -j1: one thread, as every load here
    out = _run(["pgbench", "-S", "-n", "-j1", f"-c{clients}", f"-T{max(1, round(seconds))}",
                "-h", host, "-p", str(port), "-U", "postgres", "postgres"], seconds + 60)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if tps is None or lat is None or done is None:
        raise ValueError(f"unreadable pgbench output:\n{out[-800:]}")
    return {"tps": float(tps[1]), "latency_ms": float(lat[1]), "transactions": int(done[1]),
            "failed": int(failed[1]) if failed else 0}


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "resolve": op_resolve, "redis": op_redis, "pgbench": op_pgbench, "h2load": op_h2load}


def main() -> None:
    serve(OPS)


if __name__ == "__main__":
    main()
