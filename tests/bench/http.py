"""HTTP/1.1 and HTTP/2 through an L7 proxy (issue 15 item 7): `python -m tests.bench.http
[--quick] [--out DIR] [--only NAMES] [--keep]`, as root. `make bench` runs it last (`make
bench-quick` a shortened form).

One network namespace holding only `lo` (a tests/harness.Host: it goes on success, failure or
Ctrl-C) with everything in it: two nginx backends answering `200 ok\\n` (each on an HTTP/1.1 port
and an h2c port, tests/bench/http_servers.py), and the middles, one worker process/thread each:
  direct        the load generator → backend 1: the reference
  mn-l7         meshnode as deployed: the agent with eBPF capture and one worker, the load
                generator enrolled in service `client` calling the VIP of a Service with
                `protocol: http` (HTTP/1.1) or `protocol: http2` (h2 both sides) and both
                backends as endpoints; P2C/EWMA per request, metrics and the access log on
  haproxy-http  HAProxy mode http, nbthread 1, both servers, http-reuse always; for h2
                `bind ... proto h2` and `server ... proto h2`
  nginx-http    nginx proxy_pass, worker_processes 1, upstream keepalive 32, HTTP/1.1 to the
                servers (nginx cannot proxy h2 upstream: its h2 column is h2 to the client only)
HAProxy and nginx log nothing per request; meshnode writes its access log.

Load (tests/bench/http_load.py, one thread each): wrk -t1 -c32 --latency for HTTP/1.1 keep-alive;
h2load -t1 -c8 -m10 for h2, p50/p99 from its per-request log. Each variant's CPU per request is
the utime+stime of its worker process(es) during the run over the requests completed. Variants
interleaved (round robin, a different one first each repetition), medians reported, ratios to
HAProxy and nginx, and the targets: mn-l7 HTTP/1.1 req/s at least HAProxy's with p99 at
most 1.2 times HAProxy's, h2 req/s at least nginx's. Checks printed under the table: the
requests of ONE keep-alive connection (200 of them) per backend for each proxy (per-request
balancing puts them on both),
each backend's share under load, and meshnode_requests_total against the requests sent through
meshnode (0 means meshnode relayed the connections as TCP, not per request). Writes
http-<time>-<mode>.json into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from meshnode import constants as C
from meshnode.errors import MeshnodeError
from tests.bench import http_servers as servers
from tests.bench import report
from tests.bench.client import Client, ClientError
from tests.bench.procs import ALL_CPUS, cpu_seconds, interrupt_on_signals
from tests.bench.variants import MAX_CONNS, PORT_RANGE, spawn
from tests.harness import Host, wait_for

REPO = Path(__file__).resolve().parents[2]
DIRECT, MESHNODE, HAPROXY, NGINX = "direct", "mn-l7", "haproxy-http", "nginx-http"
VARIANTS = (DIRECT, MESHNODE, HAPROXY, NGINX)
SERVICE_H1, SERVICE_H2 = "web", "web-h2"
VIP_PORT = 8080
CHECK_REQUESTS = 200  # on one keep-alive connection: where each of them lands
Metrics = dict[str, float | None]


@dataclass(frozen=True)
class Plan:
    mode: str
    reps: int
    seconds: int  # per run (wrk takes whole seconds)
    wrk_connections: int
    h2_clients: int
    h2_streams: int


def plan(quick: bool) -> Plan:
    if quick:
        return Plan("quick", 3, 1, 32, 8, 10)
    return Plan("full", 5, 3, 32, 8, 10)


@dataclass
class Variant:
    name: str
    load: Client  # the load driver that reaches it (enrolled for meshnode)
    h1_url: str
    h2_url: str
    workers: list[int] = field(default_factory=list)  # measured: CPU per request
    control: list[int] = field(default_factory=list)  # agent, nginx master: in the JSON only

    def url(self, proto: str) -> str:
        """Where the load goes for "h1" or "h2" ("": not measured)."""
        return self.h1_url if proto == "h1" else self.h2_url


@dataclass
class Bench:
    """The namespace and what runs in it, as the measures need it."""

    host: Host
    dir: Path
    plain: Client  # not enrolled: the direct/HAProxy/nginx load, the backends' stub_status
    variants: list[Variant] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # mn service -> requests sent through

    def served(self) -> tuple[int, int]:
        """Requests each backend has answered so far, this status read included."""
        counts = [servers.stub_requests(self.plain.ask(
            "get", url=f"http://{servers.LOOPBACK}:{port}/")["body"])
            for port in servers.STATUS_PORTS]
        return counts[0], counts[1]

    def mn_requests(self) -> dict[str, int]:
        """meshnode_requests_total summed per dst, from the agent's /metrics."""
        body = self.plain.ask("get", url=f"http://127.0.0.1:{C.ADMIN_PORT}/metrics")["body"]
        out: dict[str, int] = {}
        for line in body.splitlines():
            if line.startswith("meshnode_requests_total{"):
                labels, _, value = line.rpartition(" ")
                dst = labels.split('dst="', 1)[1].split('"', 1)[0] if 'dst="' in labels else "?"
                out[dst] = out.get(dst, 0) + int(float(value))
        return out


# -- measures ---------------------------------------------------------------------------------

def _count(b: Bench, v: Variant, proto: str, requests: int) -> None:
    if v.name == MESHNODE:
        key = SERVICE_H1 if proto == "h1" else SERVICE_H2
        b.sent[key] = b.sent.get(key, 0) + requests


def measure(b: Bench, v: Variant, p: Plan, proto: str) -> tuple[Metrics, tuple[int, int]] | None:
    """One load run: its metrics, and the requests each backend answered during it."""
    if not v.url(proto):
        return None
    served0 = b.served()
    cpu0, ctl0 = cpu_seconds(v.workers), cpu_seconds(v.control)
    if proto == "h1":
        r = v.load.ask("wrk", url=v.h1_url, seconds=p.seconds, connections=p.wrk_connections)
    else:
        r = v.load.ask("h2load", url=v.h2_url, seconds=p.seconds, clients=p.h2_clients,
                       streams=p.h2_streams, log=str(b.dir / f"h2load-{v.name}.log"))
    cpu, ctl = cpu_seconds(v.workers) - cpu0, cpu_seconds(v.control) - ctl0
    split = _between(served0, b.served())
    _count(b, v, proto, r["requests"])
    if r["errors"]:
        print(f"  warning: {v.name} {proto}: {r['errors']} errors of {r['requests']}",
              file=sys.stderr)
    n = r["requests"]
    per_req = cpu / n * 1e6 if v.workers and n else None
    return ({f"{proto}_rps": r["rps"], f"{proto}_p50": r["p50_ms"], f"{proto}_p99": r["p99_ms"],
             f"{proto}_cpu": per_req,
             # the agent's or nginx master's share: in the JSON, not the table
             f"{proto}_ctl_cpu": ctl / n * 1e6 if v.control and n else None,
             f"{proto}_errors": r["errors"]}, split)


def one_connection(b: Bench, v: Variant, proto: str) -> tuple[int, int] | None:
    """CHECK_REQUESTS requests on one keep-alive connection: how many each backend got."""
    if not (url := v.url(proto)):
        return None
    before = b.served()
    r = v.load.ask("h2load", url=url, clients=1, streams=1, requests=CHECK_REQUESTS,
                   h1=proto == "h1", log=str(b.dir / f"check-{v.name}.log"))
    _count(b, v, proto, r["requests"])
    return _between(before, b.served())


def _between(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
    """What each backend answered between two status reads (the second counts itself)."""
    return after[0] - before[0] - 1, after[1] - before[1] - 1


def warm_up(b: Bench, v: Variant, p: Plan) -> None:
    """Pools, caches and the allocators' first growth, at the measured concurrency."""
    for proto, url in (("h1", v.h1_url), ("h2", v.h2_url)):
        if not url:
            continue
        r = v.load.ask("h2load", url=url, clients=p.h2_clients if proto == "h2" else 8,
                       streams=p.h2_streams if proto == "h2" else 1, requests=3000,
                       h1=proto == "h1", log=str(b.dir / f"warm-{v.name}.log"))
        _count(b, v, proto, r["requests"])


# -- set-up -----------------------------------------------------------------------------------

def _driver(h: Host, d: Path, name: str, service: str | None) -> Client:
    proc = spawn(h, d, [sys.executable, "-m", "tests.bench.http_load"], f"load-{name}.log",
                 service, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return Client(proc, f"http load ({name})")


def _answers(load: Client, url: str, h1: bool, log: Path) -> bool:
    try:
        r = load.ask("h2load", url=url, clients=1, streams=1, requests=1, h1=h1, log=str(log),
                     timeout=2)
    except ClientError:  # h2load failed (refused, reset): not yet
        return False
    return r["requests"] == 1 and not r["errors"]


def meshnode(h: Host, d: Path) -> Variant:
    """The agent (eBPF capture, one worker, access log on) and the two L7 services. A protocol
    meshnode does not answer gets no URL: its rows stay empty, the other is still measured."""
    h.start()
    load = _driver(h, d, "enrolled", "client")
    lo = servers.LOOPBACK
    urls: list[str] = []
    for name, protocol, ports in ((SERVICE_H1, "http", servers.H1_PORTS),
                                  (SERVICE_H2, "http2", servers.H2_PORTS)):
        svc = h.call("service.add", name=name, endpoints=[f"{lo}:{p}" for p in ports],
                     patch={"port": VIP_PORT, "protocol": protocol})
        url = f"http://{svc['vip']}:{VIP_PORT}/"
        # the VIP is bound by nothing: an answer proves the connection was captured. The first
        # waits for the capture to be in place; once one answered, a few seconds are plenty.
        try:
            wait_for(f"meshnode to answer {protocol}", partial(
                _answers, load, url, protocol == "http", d / "ready.log"), 5 if urls else 20)
        except AssertionError as exc:
            print(f"  {MESHNODE}: {protocol} not measured: {exc}", file=sys.stderr)
            url = ""
        urls.append(url)
    if not any(urls):
        raise AssertionError("meshnode answered neither HTTP/1.1 nor h2")
    status = h.status()
    return Variant(MESHNODE, load, urls[0], urls[1], [w["pid"] for w in status["workers"]],
                   [int(status["pid"])])


@contextlib.contextmanager
def bench(tmp: Path, only: set[str]) -> Iterator[Bench]:
    h = Host(tmp / "mesh", "ebpf", workers=1, agent_args=("--log-level", "info"))
    try:
        subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", "sysctl", "-qw",
                        f"net.ipv4.ip_local_port_range={PORT_RANGE}"], check=True)

        def run(argv: list[str], log: str, **kw: Any) -> subprocess.Popen[Any]:
            return spawn(h, tmp, argv, log, **kw)

        with contextlib.ExitStack() as stack:
            stack.enter_context(servers.backends(run, tmp, MAX_CONNS))
            b = Bench(h, tmp, _driver(h, tmp, "plain", None))
            lo = servers.LOOPBACK
            want = only or set(VARIANTS)
            if DIRECT in want:  # backend 1 alone: no middle, no CPU figure
                b.variants.append(Variant(DIRECT, b.plain, f"http://{lo}:{servers.H1_PORTS[0]}/",
                                          f"http://{lo}:{servers.H2_PORTS[0]}/"))
            if MESHNODE in want:
                try:
                    b.variants.append(meshnode(h, tmp))
                except (AssertionError, ClientError, MeshnodeError) as exc:
                    # the others are still worth their table: this column stays empty
                    print(f"  {MESHNODE}: not measured: {exc}", file=sys.stderr)
            if HAPROXY in want:
                ha = stack.enter_context(servers.haproxy(run, tmp, MAX_CONNS))
                b.variants.append(Variant(HAPROXY, b.plain, f"http://{lo}:{servers.HAPROXY_H1}/",
                                          f"http://{lo}:{servers.HAPROXY_H2}/", ha.workers))
            if NGINX in want:
                ng = stack.enter_context(servers.nginx_proxy(run, tmp, MAX_CONNS))
                b.variants.append(Variant(NGINX, b.plain, f"http://{lo}:{servers.NGINX_H1}/",
                                          f"http://{lo}:{servers.NGINX_H2}/", ng.workers,
                                          ng.control))
            yield b
    finally:
        h.close()  # the load drivers, the agent and its kernel state, the namespace


# -- the report -------------------------------------------------------------------------------

def table_metrics(p: Plan) -> list[report.Metric]:
    h1 = f"HTTP/1.1 keep-alive (wrk -c{p.wrk_connections})"
    h2 = f"h2 (h2load -c{p.h2_clients} -m{p.h2_streams})"
    return [
        report.Metric("h1_rps", h1, "req/s", True),
        report.Metric("h1_p50", "HTTP/1.1 latency p50", "ms", False),
        report.Metric("h1_p99", "HTTP/1.1 latency p99", "ms", False),
        report.Metric("h1_cpu", "HTTP/1.1 proxy CPU per request", "µs", False),
        report.Metric("h2_rps", h2, "req/s", True),
        report.Metric("h2_p50", "h2 latency p50", "ms", False),
        report.Metric("h2_p99", "h2 latency p99", "ms", False),
        report.Metric("h2_cpu", "h2 proxy CPU per request", "µs", False),
    ]


def targets(t: report.Table, per_request: bool) -> list[report.Target]:
    """Issue 15's targets for mn-l7; not judged (n/a) when meshnode did not handle the requests
    one by one: a TCP relay's figures say nothing of the L7 proxy."""
    x = report.TIMES
    rps = report.ratio(t, MESHNODE, HAPROXY, "h1_rps")
    p99 = report.ratio(t, MESHNODE, HAPROXY, "h1_p99")
    h2 = report.ratio(t, MESHNODE, NGINX, "h2_rps")

    def judge(value: float | None, ok: Callable[[float], bool]) -> bool | None:
        return None if value is None or not per_request else ok(value)

    return [
        report.Target(f"http1-req/s≥1.0{x}haproxy", rps, judge(rps, lambda r: r >= 1.0)),
        report.Target(f"http1-p99≤1.2{x}haproxy", p99, judge(p99, lambda r: r <= 1.2)),
        report.Target(f"h2-req/s≥1.0{x}nginx", h2, judge(h2, lambda r: r >= 1.0)),
    ]


def _split_text(split: tuple[int, int] | list[tuple[int, int]]) -> str:
    """`b1/b2 (share on the less used)`; a list of splits is summed first."""
    if isinstance(split, list):
        split = (sum(s[0] for s in split), sum(s[1] for s in split))
    total = sum(split)
    return f"{split[0]}/{split[1]}" + (f" ({100 * min(split) / total:.0f}% on the less used)"
                                       if total else "")


# -- the run ----------------------------------------------------------------------------------

def _rotate(items: list[Variant], rep: int) -> list[Variant]:
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _attempt(fn: Callable[[], Any], what: str) -> Any:
    """One measurement; a failure is reported and leaves a gap, not a dead run."""
    try:
        return fn()
    except (ClientError, OSError, KeyError, ValueError) as exc:
        print(f"  {what} failed: {exc}", file=sys.stderr)
        return None


def run(quick: bool, out: Path, only: str = "", keep: bool = False) -> int:
    """Set up, check, measure; print the table, the checks and the targets line; write JSON."""
    p = plan(quick)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-http-bench-"))
    raw: report.Raw = {}
    checks: dict[str, dict[str, Any]] = {}
    loads: dict[str, dict[str, list[tuple[int, int]]]] = {}
    counted: dict[str, Any] = {}
    try:
        with bench(tmp, set(filter(None, only.split(",")))) as b:
            print(f"http: set up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            for v in b.variants:
                if v.name != DIRECT:
                    for proto in ("h1", "h2"):
                        split = _attempt(partial(one_connection, b, v, proto),
                                         f"{v.name} {proto} one-connection check")
                        checks.setdefault(v.name, {})[proto] = split
                _attempt(partial(warm_up, b, v, p), f"{v.name} warm-up")
            for rep in range(p.reps):
                for proto in ("h1", "h2"):
                    t0 = time.monotonic()
                    for v in _rotate(b.variants, rep):
                        got = _attempt(partial(measure, b, v, p, proto), f"{v.name} {proto}")
                        if got is None:
                            continue
                        metrics, split = got
                        for key, value in metrics.items():
                            if value is not None:
                                raw.setdefault(v.name, {}).setdefault(key, []).append(value)
                        loads.setdefault(v.name, {}).setdefault(proto, []).append(split)
                    print(f"http [{rep + 1}/{p.reps}] {proto}: {time.monotonic() - t0:.1f}s",
                          file=sys.stderr)
            if any(v.name == MESHNODE for v in b.variants):
                counted = _mn_counted(b)
            names = [v.name for v in b.variants]
            pids = {v.name: {"workers": v.workers, "control": v.control} for v in b.variants}
    except KeyboardInterrupt:
        print("interrupted: every process and the namespace have been removed", file=sys.stderr)
        return 130
    finally:
        report.release(tmp, keep)
    wall = time.monotonic() - started
    table = report.medians(raw)
    ms = table_metrics(p)
    per_request = bool(counted.get("per_request"))
    ts = targets(table, per_request)
    now = datetime.now(UTC)
    version = report.source_version(REPO)
    head = (f"meshnode http bench ({p.mode}): one namespace, {len(ALL_CPUS)} CPUs shared by the "
            f"load generator, the proxy and the backends, Linux {platform.release()}, "
            f"{version.get('commit', 'unknown commit')}; median of {p.reps} runs of "
            f"{p.seconds}s; one worker/thread per proxy; {wall:.0f}s")
    path = out / f"http-{now:%Y%m%d-%H%M%S}-{p.mode}.json"
    report.write_json(path, {
        "when": now.isoformat(), "source": version, "mode": p.mode, "wall_s": wall,
        "machine": {"cpus": len(ALL_CPUS), "kernel": platform.release()},
        "plan": p.__dict__, "variants": names, "pids": pids, "raw": raw, "median": table,
        "one_connection": checks, "split_under_load": loads, "meshnode_requests": counted,
        "ratio_to_haproxy": {v: {m.key: report.ratio(table, v, HAPROXY, m.key) for m in ms}
                             for v in names},
        "ratio_to_nginx": {v: {m.key: report.ratio(table, v, NGINX, m.key) for m in ms}
                           for v in names},
        "targets": [{"name": t.name, "value": t.value, "met": t.met} for t in ts]})
    print(head)
    print(report.table_text(table, names, ms, refs=(HAPROXY, NGINX)))
    print("  direct: one backend, no middle. nginx h2: h2 to the client, HTTP/1.1 to the servers "
          "(nginx cannot proxy h2 upstream); HAProxy and meshnode: h2 both sides. Access log: "
          "meshnode on, HAProxy and nginx off.")
    for name in names:
        c = checks.get(name, {})
        under = {proto: _split_text(s) for proto, s in loads.get(name, {}).items() if s}
        if c or under:
            one = ", ".join(f"{proto} {_split_text(s)}" for proto, s in c.items() if s)
            print(f"  {name}: backends 1/2, {CHECK_REQUESTS} requests on one connection: "
                  f"{one or '-'}; under load: "
                  f"{', '.join(f'{k} {t}' for k, t in under.items()) or '-'}")
    if counted:
        print(f"  mn-l7 meshnode_requests_total by dst: {counted['seen']} for "
              f"{counted['sent']} requests sent through meshnode; access log: "
              f"{counted['access_log_lines']} lines"
              + ("" if counted["per_request"] else
                 " (NOT proxied per request: the connections were relayed as TCP)"))
    print(f"wrote {path}")
    print(report.targets_line(ts) + ("" if per_request or MESHNODE not in names else
                                      " · (mn-l7 not judged: not proxied per request)"))
    return 0


def _mn_counted(b: Bench) -> dict[str, Any]:
    """meshnode_requests_total against what was sent (workers report about once a second)."""
    seen: dict[str, int] = {}

    def caught_up() -> bool:
        nonlocal seen
        seen = b.mn_requests()
        return all(seen.get(k, 0) >= n for k, n in b.sent.items())

    with contextlib.suppress(AssertionError, ClientError):
        wait_for("meshnode_requests_total to count the requests sent", caught_up, 5)
    log = b.host.tmp / "log" / b.host.tag / "access.log"
    lines = sum(1 for _ in log.open("rb")) if log.exists() else 0
    return {"seen": seen, "sent": dict(b.sent), "access_log_lines": lines,
            "per_request": bool(b.sent) and all(seen.get(k, 0) >= n for k, n in b.sent.items())}




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.http",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short form (make bench-quick)")
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench")
    ap.add_argument("--only", default="",
                    help=f"variants, comma-separated, of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the logs' temporary folder")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a network namespace, BPF)", file=sys.stderr)
        return 77
    if missing := [t for t in ("haproxy", "nginx", "wrk", "h2load") if shutil.which(t) is None]:
        print(f"missing: {', '.join(missing)}; install with: sudo ./setup.sh bench",
              file=sys.stderr)
        return 69
    os.environ["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    interrupt_on_signals()
    return run(args.quick, args.out, args.only, args.keep)


if __name__ == "__main__":
    sys.exit(main())
