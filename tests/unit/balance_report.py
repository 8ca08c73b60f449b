"""Observed traffic share per endpoint for each balancing algorithm, through a real worker.

    python -m tests.unit.balance_report [CALLS] [CONCURRENCY]

Starts one proxy worker (explicit-target mode, loopback, no root) and four backends: `a` and
`b` (weight 1), `c` (weight 2) and `slow` (weight 1, holds each connection 50 ms before it
answers). For each algorithm it makes CALLS (default 1000) short calls, CONCURRENCY (default 8)
at a time, each from a random 127.x.y.z source address so ring hash sees many clients, and
prints the share each endpoint served. Not a test: nothing is asserted (the tests do that).
"""

from __future__ import annotations

import random
import socket
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address

from meshnode.model import BalancerConfig, Endpoint, HostPort, Reset, ServiceSpec
from meshnode.wire import update_message
from tests.unit.test_worker import VIP, Backend, Worker, recv_all

ALGORITHMS = ("round-robin", "random", "p2c-ewma", "ring-hash")


def call(port: int, rng: random.Random) -> bytes:
    with socket.socket() as s:
        s.settimeout(15)
        # A random loopback source: the client IP is the ring-hash key.
        s.bind((f"127.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"NAME\n")
        return recv_all(s)


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    backends = [(Backend("a"), 1), (Backend("b"), 1), (Backend("c"), 2),
                (Backend("slow", delay=0.05), 1)]
    worker = Worker(f"{VIP}:80")
    try:
        assert worker.recv()["t"] == "listening"
        print(f"{calls} calls, {concurrency} concurrent; weights a=1 b=1 c=2 slow=1 "
              "(slow answers after 50 ms)")
        print(f"{'algorithm':<12}" + "".join(f"{b.name:>8}" for b, _ in backends))
        for i, algorithm in enumerate(ALGORITHMS):
            spec = ServiceSpec.build(f"svc{i}", i + 1, IPv4Address(VIP), 80,
                               lb=BalancerConfig(algorithm, locality=False))
            worker.send(update_message(Reset(spec, tuple(
                Endpoint(HostPort.parse(b.addr), weight=w) for b, w in backends))))
            worker.sync()
            rngs = [random.Random(n) for n in range(calls)]
            with ThreadPoolExecutor(concurrency) as pool:
                got = Counter(pool.map(lambda r: call(worker.port, r), rngs))
            print(f"{algorithm:<12}" + "".join(
                f"{got[b.name.encode()] / calls:>8.1%}" for b, _ in backends))
    finally:
        worker.stop()
        for b, _ in backends:
            b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
