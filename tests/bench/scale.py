"""`python -m tests.bench scale [--services N] [--changes K] [--load api|file] [--profile]`,
as root (`make bench-scale`): what one change costs in a large mesh (issue 12, item 9).

A real agent (embedded registry, eBPF capture, one worker, no access log) in a test namespace
holding only `lo` is loaded with N services of 4 static endpoints each, then K single changes
are made in turn through its control socket: add a service with 4 endpoints, add one endpoint
to a loaded service, remove that endpoint again. For each change:
  call    the control call's latency (it returns once the agent's workers and kernel run it);
  kernel  from the call's start until the pinned mn_dest map holds the new key (the VIP, the
          endpoint) or no longer holds the removed one, polled from this process;
  probe   for a new service, until an enrolled probe's connection to its VIP is answered by
          one of its endpoints.
Then the agent's and its workers' RSS. With --profile the agent runs under cProfile and its
top costs are printed after it stops.

Load: `api` (the default up to 1 000 services) applies the Service documents in batches of
500 (`apply`) and adds each service's endpoints with `service.add`, timing each call: the load
itself shows how a change's cost grows with the mesh. `file` (the default above) writes the
registry file before the agent starts (the embedded registry's format-1 file, which it reads
and converts): loading 10 000 services one call at a time costs hours while a change costs
seconds, which is what this measures. Health checks are off ("none") for every service:
40 000 endpoints probed every 5 s would measure the checker, not a change.

Addresses: the agent's VIPs (127.240.0.0/16; the bench pins its new services' VIPs at
127.240.250.0 on), endpoints from 127.1.0.1 on, 127.200/16 and 127.201/16 for the changes; one
server bound to 0.0.0.0 in the namespace answers them all with the address it was reached on.
Everything started is stopped, and the namespace removed, on success, failure or Ctrl-C.

Measured (2 shared CPUs, Linux 6.18; ms, p50 / p99; +-50 % on this shared machine):
  with the change feed and kernel delta (issue 12), 10 000 services: add service 6.4 / 9.5,
  add endpoint 6.3 / 14, remove endpoint 5.5 / 11; capture sync 0.4 / 0.8; RSS agent
  111 MiB, worker 82 MiB, flat over the changes.
  The kernel shows a change 1-2 ms before the call returns; a probe reaches a new service
  1 ms after. Before the incremental registry, compiler and kernel sync (issue 12), adding a
  service cost 2 550 / 3 600 ms at 10 000 services and 414 / 903 ms at 1 000.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from meshnode import constants
from meshnode.bpf import syscall
from meshnode.bpf.maps import pack_addr4
from meshnode.config import AgentConfig
from tests.harness import Host, Probe, wait_for

PORT = 9000  # every endpoint's port, and the services' VIP port
ENDPOINTS = 4  # per service
APPLY_BATCH = 500  # Service documents per `apply` call while loading
API_LOAD_MAX = 1000  # above this many services, --load defaults to file
_MAIN_PID = os.getpid()

# One server for every endpoint address: bound to 0.0.0.0, it answers with where it was reached.
SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(512)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(c.getsockname()[0].encode() + b"\n"); c.close()
"""


def loaded_endpoint(service: int, j: int) -> IPv4Address:
    return IPv4Address(0x7F010001 + ENDPOINTS * service + j)  # 127.1.0.1 on


def new_endpoint(k: int) -> IPv4Address:
    return IPv4Address(0x7FC80001 + k)  # 127.200.0.1 on: single endpoint adds


def new_service_endpoint(k: int, j: int) -> IPv4Address:
    return IPv4Address(0x7FC90001 + ENDPOINTS * k + j)  # 127.201.0.1 on


def new_vip(k: int) -> IPv4Address:
    return IPv4Address(0x7FF0FA01 + k)  # 127.240.250.1 on: above every allocated VIP


def service_doc(name: str) -> dict[str, Any]:
    return {"kind": "Service", "name": name,
            "spec": {"port": PORT, "health": {"kind": "none"}}}


# -- the agent ------------------------------------------------------------------------------

class ScaleHost(Host):
    """A harness host whose agent may run under cProfile (the harness starts it plainly)."""

    def __init__(self, tmp: Path, profile: Path | None) -> None:
        super().__init__(tmp, "ebpf", workers=1, agent_args=("--access-log", "off"))
        self.profile = profile

    def start(self, timeout: float = 600.0) -> float:
        return super().start(timeout)

    def agent_argv(self) -> list[str]:
        if self.profile is None:
            return super().agent_argv()
        # The agent's own entry point: `meshnode agent` would exec it, leaving cProfile behind.
        cfg = AgentConfig(instance=self.tag, capture="ebpf", workers=1, netns=self.netns,
                          drain_grace=2.0, access_log="off")
        return [sys.executable, "-m", "cProfile", "-o", str(self.profile),
                "-m", "meshnode.cli.agent_main", "--log-level=debug", *cfg.to_argv()]

    @property
    def log_file(self) -> Path:
        return self.tmp / f"agent-{self.starts}.log"

    @property
    def registry_file(self) -> Path:
        return self.tmp / "state" / self.tag / "registry.json"

    @property
    def pin_dir(self) -> Path:
        return Path(constants.PIN_ROOT) / self.tag


def write_registry(path: Path, n: int, node: str) -> None:
    """N services with their endpoints as a format-1 registry file (see the module doc)."""
    services = [{
        "name": f"s{i}", "vip": str(IPv4Address(0x7FF00001 + i)), "port": PORT,
        "health": {"kind": "none"},
        "endpoints": [{"addr": f"{loaded_endpoint(i, j)}:{PORT}", "source": "static",
                       "node": node, "zone": "", "weight": 1} for j in range(ENDPOINTS)],
    } for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"services": services}))


def load_api(h: ScaleHost, n: int) -> list[float]:
    """Services by batched `apply`, then each one's endpoints by `service.add`; returns the
    endpoint calls' latencies (s), in load order."""
    for lo in range(0, n, APPLY_BATCH):
        docs = [service_doc(f"s{i}") for i in range(lo, min(n, lo + APPLY_BATCH))]
        h.call("apply", docs=docs)
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        h.call("service.add", name=f"s{i}",
               endpoints=[f"{loaded_endpoint(i, j)}:{PORT}" for j in range(ENDPOINTS)])
        took.append(time.perf_counter() - t0)
        if (i + 1) % 200 == 0:
            print(f"  loaded {i + 1}/{n}: last call {took[-1] * 1000:.0f} ms", file=sys.stderr)
    return took


# -- one change, timed ----------------------------------------------------------------------

class MapWatch:
    """Polls the pinned mn_dest map from this process until a key is present (or absent)."""

    POLL = 0.0002  # s between lookups: a lookup costs ~7 us, the agent needs the CPU more

    def __init__(self, pin_dir: Path) -> None:
        self.fd = syscall.obj_get(str(pin_dir / "mn_dest"))

    def close(self) -> None:
        os.close(self.fd)

    def has(self, ip: IPv4Address, port: int) -> bool:
        return syscall.map_lookup(self.fd, pack_addr4(ip, port), 4) is not None

    @contextlib.contextmanager
    def until(self, ip: IPv4Address, port: int, present: bool,
              timeout: float = 60.0) -> Iterator[list[float]]:
        """Yields a list that holds, after the block, the perf_counter time the key first
        showed the wanted state (NaN: not within `timeout`)."""
        seen: list[float] = []
        stop = threading.Event()

        def poll() -> None:
            deadline = time.perf_counter() + timeout
            while not stop.is_set() and time.perf_counter() < deadline:
                if self.has(ip, port) == present:
                    seen.append(time.perf_counter())
                    return
                time.sleep(self.POLL)
            seen.append(float("nan"))

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        try:
            yield seen
        finally:
            t.join(timeout + 1)
            stop.set()


@dataclass
class Samples:
    call: list[float] = field(default_factory=list)  # ms
    kernel: list[float] = field(default_factory=list)
    probe: list[float] = field(default_factory=list)


def reach(probe: Probe, vip: IPv4Address, want: set[str], t0: float,
          timeout: float = 10.0) -> float:
    """ms from `t0` until a connection to VIP:PORT is answered by one of `want`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            r = probe.connect(str(vip), PORT, timeout=2)
            if r.get("ok") and r.get("reply") in want:
                return (time.perf_counter() - t0) * 1000
    return float("nan")


def changes(h: ScaleHost, n: int, k: int, probe: Probe) -> dict[str, Samples]:
    out = {"add service (4 endpoints)": Samples(), "add endpoint": Samples(),
           "remove endpoint": Samples()}
    watch = MapWatch(h.pin_dir)
    try:
        for c in range(k):
            kind = c % 3
            step = c // 3
            target = f"s{(step * 7919) % n}"  # spread over the loaded services
            if kind == 0:
                vip = new_vip(step)
                eps = [new_service_endpoint(step, j) for j in range(ENDPOINTS)]
                s = out["add service (4 endpoints)"]
                with watch.until(vip, 0, True) as seen:
                    t0 = time.perf_counter()
                    h.call("service.add", name=f"new{step}",
                           patch={"port": PORT, "vip": str(vip), "health": {"kind": "none"}},
                           endpoints=[f"{e}:{PORT}" for e in eps])
                    s.call.append((time.perf_counter() - t0) * 1000)
                s.probe.append(reach(probe, vip, {str(e) for e in eps}, t0))
            else:
                ep = new_endpoint(step)
                s = out["add endpoint" if kind == 1 else "remove endpoint"]
                op = "service.add" if kind == 1 else "service.remove"
                with watch.until(ep, PORT, kind == 1) as seen:
                    t0 = time.perf_counter()
                    h.call(op, name=target, endpoints=[f"{ep}:{PORT}"])
                    s.call.append((time.perf_counter() - t0) * 1000)
            s.kernel.append((seen[0] - t0) * 1000)
            print(f"  change {c + 1}/{k}: {s.call[-1]:.0f} ms", file=sys.stderr)
    finally:
        watch.close()
    return out


# -- reporting ------------------------------------------------------------------------------

def rss_mib(h: ScaleHost) -> tuple[float, float]:
    """(agent, its workers) RSS in MiB."""
    agent = psutil.Process(int(h.call("ping")["pid"]))
    workers = agent.children(recursive=True)
    return (agent.memory_info().rss / 2**20,
            sum(w.memory_info().rss for w in workers if w.is_running()) / 2**20)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))  # NaN: never seen
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def table(n: int, samples: dict[str, Samples]) -> str:
    head = f"{'change (' + str(n) + ' services)':<28}{'n':>4}{'call p50':>10}{'p99':>8}" \
           f"{'kernel p50':>12}{'p99':>8}{'probe p50':>11}{'p99':>8}"
    lines = [head, "-" * len(head)]
    for name, s in samples.items():
        probe = (f"{pct(s.probe, .5):>11.1f}{pct(s.probe, .99):>8.1f}" if s.probe
                 else f"{'':>11}{'':>8}")
        lines.append(f"{name:<28}{len(s.call):>4}{pct(s.call, .5):>10.1f}"
                     f"{pct(s.call, .99):>8.1f}{pct(s.kernel, .5):>12.1f}"
                     f"{pct(s.kernel, .99):>8.1f}{probe}")
    return "\n".join(lines) + "\n(ms; kernel and probe from the call's start)"


def capture_syncs(log: Path, offset: int) -> list[float]:
    """ms of each capture sync the agent logged after `offset` (BpfCapture.sync's debug line;
    it runs in a thread, which cProfile does not see)."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [float(m) for m in re.findall(r"capture sync: \d+ map writes in ([0-9.]+) ms", text)]


def top_costs(profile: Path, limit: int = 15) -> str:
    """The agent's top functions by own time, and meshnode's by cumulative time."""
    entries: dict[tuple[str, int, str], tuple[Any, ...]] = \
        pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    rows = [(tot, cum, calls, f"{Path(file).name}:{line}({fn})", file)
            for (file, line, fn), (_cc, calls, tot, cum, _callers) in entries.items()]
    out = [f"agent profile, by own time{'own s':>41}{'cum s':>9}{'calls':>10}"]
    for tot, cum, calls, where, _ in sorted(rows, reverse=True)[:limit]:
        out.append(f"  {where:<64.64} {tot:7.2f} {cum:8.2f} {calls:9d}")
    out.append("meshnode functions, by cumulative time")
    ours = sorted(((cum, tot, calls, where) for tot, cum, calls, where, file in rows
                   if "/meshnode/" in file), reverse=True)
    for cum, tot, calls, where in ours[:limit]:
        out.append(f"  {where:<64.64} {tot:7.2f} {cum:8.2f} {calls:9d}")
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------

def _interrupt(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _MAIN_PID:  # a forked pyroute2 helper: see tests/bench/__main__.py
        os._exit(128 + signum)
    raise KeyboardInterrupt  # unwinds through every `finally`: nothing left behind


def run(args: argparse.Namespace, tmp: Path) -> int:
    profile = tmp / "agent.prof" if args.profile else None
    h = ScaleHost(tmp / "host", profile)
    server: subprocess.Popen[str] | None = None
    try:
        load = args.load or ("api" if args.services <= API_LOAD_MAX else "file")
        if load == "file":
            write_registry(h.registry_file, args.services, h.node)
        t0 = time.monotonic()
        start_s = h.start()
        print(f"agent ready in {start_s:.1f}s ({load} load)", file=sys.stderr)
        rss_empty = rss_mib(h)
        server = h.popen([sys.executable, "-c", SERVER, str(PORT)], stdout=subprocess.PIPE,
                         text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        load_calls: list[float] = []
        if load == "api":
            load_calls = load_api(h, args.services)
        load_s = time.monotonic() - t0
        wait_for("every service loaded", lambda: h.call("ping")["ready"], 60)
        rss_loaded = rss_mib(h)
        probe = h.probe(service="client")
        # The load worked: the first service's VIP reaches one of its endpoints.
        vip0 = IPv4Address(h.call("service.add", name="s0")["vip"])
        want0 = {str(loaded_endpoint(0, j)) for j in range(ENDPOINTS)}
        if math.isnan(reach(probe, vip0, want0, time.perf_counter(), timeout=30)):
            raise RuntimeError(f"{vip0}:{PORT} (service s0) does not reach its endpoints: "
                               f"see the agent log in {h.tmp} (--keep)")
        log_mark = h.log_file.stat().st_size
        samples = changes(h, args.services, args.changes, probe)
        rss_after = rss_mib(h)
        syncs = capture_syncs(h.log_file, log_mark)
    finally:
        if server is not None:
            server.kill()
        h.close()
    print(f"\nmeshnode bench-scale: {args.services} services x {ENDPOINTS} endpoints "
          f"({args.services * (ENDPOINTS + 1)} mesh destinations), embedded registry, eBPF, "
          f"1 worker; {os.cpu_count()} CPUs; loaded by {load} in {load_s:.0f}s")
    print(table(args.services, samples))
    if syncs:
        print(f"capture sync (the agent's debug log, {len(syncs)} syncs during the changes): "
              f"p50 {pct(syncs, .5):.1f} ms, p99 {pct(syncs, .99):.1f} ms of each change")
    if load_calls:
        tenth = max(1, len(load_calls) // 10)
        print(f"load, service.add with 4 endpoints: p50 {pct(load_calls[:tenth], .5) * 1e3:.0f}"
              f" ms over the first {tenth} services, {pct(load_calls[-tenth:], .5) * 1e3:.0f}"
              f" ms over the last {tenth}")
    print("RSS MiB (agent / workers): "
          f"at start {rss_empty[0]:.0f} / {rss_empty[1]:.0f}, loaded {rss_loaded[0]:.0f} / "
          f"{rss_loaded[1]:.0f}, after the changes {rss_after[0]:.0f} / {rss_after[1]:.0f}")
    if profile is not None and profile.exists():
        print(top_costs(profile))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=10_000,
                   help="services to load, 4 endpoints each (default: %(default)s; 1000 for "
                        "a quick run)")
    p.add_argument("--changes", type=int, default=99,
                   help="single changes to time, a third of each kind (default: %(default)s)")
    p.add_argument("--load", choices=("api", "file"),
                   help=f"how to load (default: api up to {API_LOAD_MAX} services, else file)")
    p.add_argument("--profile", action="store_true",
                   help="run the agent under cProfile and print its top costs")
    p.add_argument("--keep", action="store_true", help="keep the logs' temporary folder")
    args = p.parse_args(argv)
    if not 1 <= args.services <= 60_000:
        p.error("--services must be 1..60000 (VIPs from 127.240.250.0 on are the bench's)")
    if os.geteuid() != 0:
        print("bench-scale needs root (a namespace, BPF): sudo make bench-scale",
              file=sys.stderr)
        return 77
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-scale-"))
    try:
        return run(args, tmp)
    except KeyboardInterrupt:
        print("interrupted: the agent and the namespace have been removed", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

