"""`python -m tests.bench scale-fabric [--services N] [--changes K]`, as root (`make
bench-scale SCALE_ARGS=...` runs the one-host variant; this is its three-host twin): what one
change costs in a large mesh spread over three hosts that share one etcd cluster.

The e2e fabric (tests/e2e/fabric.py: three network namespaces on a bridge, an agent each, a
three-member etcd cluster) is loaded through host 0's control socket with N services of 4
endpoints each (Service documents by `apply`, 40 per etcd transaction; each service's
endpoints by `service.add`). Then K changes are made on host 0, each a new service with its
4 endpoints; for each:
  call     host 0's control calls (apply + service.add), which return once host 0's workers
           and kernel run the change;
  hosts    from the first call's start until hosts 1 and 2 report (through etcd) that their
           workers and kernel run it (`hosts`: applied revision >= the change's);
  kernel   until the new VIP is in host 2's pinned mn_dest map.
Health checks are off for the loaded services (the e2e tests cover health). Everything is
removed on success, failure or Ctrl-C.

Measured (2 shared CPUs; ms, p50 / p99): see README, "Policy as resources".
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

from meshnode import constants
from tests.bench.scale import (
    ENDPOINTS,
    PORT,
    MapWatch,
    _interrupt,
    loaded_endpoint,
    pct,
    service_doc,
)
from tests.e2e.fabric import Fabric
from tests.harness import Host, wait_for

APPLY_BATCH = 40  # the etcd registry's transaction holds at most this many resources


def load(h0: Host, n: int) -> None:
    for lo in range(0, n, APPLY_BATCH):
        h0.call("apply",
                docs=[service_doc(f"s{i}") for i in range(lo, min(n, lo + APPLY_BATCH))])
    for i in range(n):
        h0.call("service.add", name=f"s{i}",
                endpoints=[f"{loaded_endpoint(i, j)}:{PORT}" for j in range(ENDPOINTS)])
        if (i + 1) % 500 == 0:
            print(f"  loaded {i + 1}/{n}", file=sys.stderr)


def caught_up(h0: Host, nodes: set[str], rev: int) -> bool:
    hosts = {x["node"]: x for x in h0.call("hosts")["hosts"]}
    return all(hosts.get(n, {}).get("applied_revision", 0) >= rev for n in nodes)


def run(args: argparse.Namespace, tmp: Path) -> int:
    f = Fabric(tmp, hosts=3, etcd_members=3, ttl=10)
    try:
        f.start()
        h0, h2 = f.hosts[0], f.hosts[2]
        t0 = time.monotonic()
        load(h0, args.services)
        everyone = {h.node for h in f.hosts}
        rev = h0.call("hosts")["revision"]
        wait_for("every host runs the loaded mesh",
                 lambda: caught_up(h0, everyone, rev), timeout=600, interval=0.5)
        print(f"loaded {args.services} services x {ENDPOINTS} endpoints in "
              f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
        watch = MapWatch(Path(constants.PIN_ROOT) / h2.tag)
        call_ms: list[float] = []
        hosts_ms: list[float] = []
        kernel_ms: list[float] = []
        try:
            for k in range(args.changes):
                name, vip = f"new{k}", IPv4Address(0x7FF0FA01 + k)
                doc = {**service_doc(name), "spec": {**service_doc(name)["spec"],
                                                     "vip": str(vip)}}
                eps = [f"{IPv4Address(0x7FC90001 + ENDPOINTS * k + j)}:{PORT}"
                       for j in range(ENDPOINTS)]
                with watch.until(vip, 0, True) as seen:
                    start = time.perf_counter()
                    h0.call("apply", docs=[doc])
                    h0.call("service.add", name=name, endpoints=eps)
                    call_ms.append((time.perf_counter() - start) * 1000)
                    rev = h0.call("hosts")["revision"]
                    wait_for("hosts 1 and 2 run it",
                             lambda rev=rev: caught_up(h0, everyone - {h0.node}, rev),
                             timeout=30, interval=0.001)
                    hosts_ms.append((time.perf_counter() - start) * 1000)
                kernel_ms.append((seen[0] - start) * 1000)
        finally:
            watch.close()
        print(f"\nmeshnode bench-scale, 3 hosts on etcd: {args.services} services x "
              f"{ENDPOINTS} endpoints, eBPF; {args.changes} changes (add a service with "
              f"{ENDPOINTS} endpoints on h0)")
        print(f"{'':30} {'p50':>8} {'p99':>8}   (ms from the change's first call)")
        for label, xs in (("h0's calls return", call_ms), ("h1 and h2 report it", hosts_ms),
                          ("in h2's kernel map", kernel_ms)):
            print(f"{label:30} {pct(xs, 0.5):8.1f} {pct(xs, 0.99):8.1f}")
        return 0
    finally:
        f.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench scale-fabric")
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--changes", type=int, default=30)
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a kill still removes the fabric
        signal.signal(sig, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-scale-fabric-"))
    try:
        return run(args, tmp)
    except KeyboardInterrupt:
        print("interrupted: the agents, etcd and the namespaces have been removed",
              file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
