"""The kernel fast path against the proxy path, direct and HAProxy (issue 17 item 7):
`python -m tests.bench.kernel [--quick] [--out DIR] [--before REV | --no-before] [--keep]`, as
root. `make bench` runs it after tests/bench/gateway.py (`make bench-quick` a shortened form).

A Service with `datapath: kernel` is balanced by the cgroup connect hook: the application's
connect() to the VIP is rewritten to an endpoint, and no proxy is on the path. Hosts are network
namespaces holding only `lo` (tests/harness.Host, gone on success, failure or Ctrl-C), each a
real agent with one worker and no access log, and the same backend (tests/bench/backend.py):
  eBPF host      direct        a load generator not enrolled → the backend
                 haproxy-tcp   the same → HAProxy tcp mode, nbthread 1 → the backend
                 mn-ebpf       a load generator enrolled in service `client` → the VIP of Service
                               `backend` (the proxy path, as tests/bench/__main__.py measures it)
                 mn-kernel     the same → the VIP of Service `backend-k`, `datapath: kernel`
                               (its endpoint is the same backend at 127.0.0.2: an endpoint
                               belongs to one Service only; the real servers likewise)
  before host    mn-before     the proxy path (eBPF) of the code before the kernel path
                               (tests/bench/before.py: that commit installed in a venv of its own)
  iptables host  mn-iptables   the proxy path with iptables capture
                 mn-kernel-ipt the kernel path there, if the tree has it with iptables (else the
                               report says "kernel path: eBPF only")
A kernel-path variant is measured only once its connections are seen balanced in the kernel
(the agent's `kernel` counter moves by every check): a silent fall-back to the proxy would
otherwise be reported as the kernel path.

Measures (tests/bench/measures.py, the core bench's): connections per second (connect, 1-byte
exchange, close; many clients, and one in the full run), bulk throughput both ways, 1-byte
ping-pong p50/p99 on one connection, unpinned and with everything on one CPU. Then real
clients on the eBPF host, through the mesh by name (`<service>.mesh`, the agent's DNS) against
the servers dialled directly (tests/bench/app_load.py, app_servers.py): redis-benchmark
-t ping,set,get against redis-server, pgbench -S (select-only) against PostgreSQL, h2load (h2c)
against nginx; on the kernel path (Services `redis`, `pg`, `web`) and, in the full run, the
proxy path (`redis-p`, `pg-p`, `web-p`). Variants interleaved, a different one first each
repetition, medians reported; a ratio is the median of each repetition's own ratio (paired:
a drift of the shared machine between repetitions cancels out).

Targets (this run): kernel path conn/s (many clients) ≥ 0.9 x direct and ≥ 1.8 x HAProxy, bulk
≥ 0.95 x direct, 1-byte ping-pong p50 ≤ 1.1 x direct; each real client ≥ 0.9 x direct on the
kernel path (redis-benchmark: the geometric mean of its tests); the proxy path no slower than
before: mn-ebpf over mn-before at least 0.95 (5 % for noise) for conn/s, bulk and the pinned
ping-pong p50 (inverted), the worst of them.
Writes kernel-<time>-<mode>.json into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
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

import psutil

from meshnode.errors import MeshnodeError
from tests.bench import app_servers, before, measures, report, variants
from tests.bench.client import Client, ClientError
from tests.bench.procs import ALL_CPUS, interrupt_on_signals
from tests.bench.variants import LOOPBACK, MAX_CONNS, Namespace, Variant, spawn
from tests.harness import Host

REPO = Path(__file__).resolve().parents[2]
DIRECT, HAPROXY = report.DIRECT, report.HAPROXY
PROXY, KERNEL, PROXY_IPT, KERNEL_IPT = "mn-ebpf", "mn-kernel", "mn-iptables", "mn-kernel-ipt"
BEFORE = "mn-before"  # the proxy path (eBPF) of the code before the kernel path
COLUMNS = (DIRECT, HAPROXY, BEFORE, PROXY, KERNEL, PROXY_IPT, KERNEL_IPT)
SVC_PROXY, SVC_KERNEL = "backend", "backend-k"
PORT = variants.BACKEND_PORT
# The backend listens on every address: an endpoint belongs to one Service only, so the proxy
# path's Service has LOOPBACK:PORT and the kernel path's ALIAS:PORT, the same process behind both
# (and behind direct and HAProxy)
ALIAS = app_servers.ALIAS
CHECKS = 20  # 1-byte exchanges that must all be counted as kernel-balanced
# the real clients' Services: (kernel path, proxy path), the server's port, the op
APPS = {"redis": ("redis", "redis-p", app_servers.REDIS_PORT),
        "pgbench": ("pg", "pg-p", app_servers.PG_PORT),
        "h2load": ("web", "web-p", app_servers.H2C_PORT)}
REDIS_TESTS = "ping,set,get"
REDIS_ROWS = ("PING_INLINE", "PING_MBULK", "SET", "GET")  # what -t ping,set,get runs
EPSILON = 0.95  # "no slower than before": 5 % for run-to-run noise


@dataclass(frozen=True)
class Plan:
    mode: str
    tcp: measures.Plan  # reps, bulk size, round trips, connection-rate seconds
    redis_requests: int  # per test
    redis_clients: int
    pg_seconds: int
    pg_clients: int
    h2_seconds: float
    h2_clients: int
    h2_streams: int
    apps_proxy: bool  # the real clients on the proxy path too (the targets need only kernel)


def plan(quick: bool) -> Plan:
    many = max(4, 2 * len(ALL_CPUS))
    if quick:
        # five short repetitions rather than three longer ones: the paired ratios' median
        # is what the targets read, and a VM's CPUs swing by 10-20 % from second to second
        tcp = measures.Plan("quick", 5, 128 << 20, 2000, 0.5, many, 1.0, 32, 0)
        return Plan("quick", tcp, 10000, 50, 1, 8, 1.0, 8, 10, False)
    # about 5 minutes: this runs after the rest of `make bench`
    tcp = measures.Plan("full", 5, 512 << 20, 10000, 1.0, many, 1.0, 32, 0)
    return Plan("full", tcp, 50000, 50, 2, 8, 2.0, 8, 10, True)


Measure = Callable[[Variant, measures.Plan], measures.Metrics]


def steps(p: Plan) -> list[tuple[str, Measure]]:
    one = [("connection setup, 1 client", measures.connrate(many=False))]
    return [(f"connection setup, {p.tcp.many_clients} clients", measures.connrate(many=True)),
            *(one if p.mode == "full" else []),
            ("bulk", measures.bulk),
            ("ping-pong 1 B", measures.pingpong(1, pin=False)),
            # everything on one CPU: the round trip's CPU cost, without placement luck
            ("ping-pong 1 B, pinned", measures.pingpong(1, pin=True))]


@dataclass
class App:
    """A real-client variant: the driver that reaches it and the names it dials."""

    name: str
    load: Client
    hosts: dict[str, str]  # op -> the host the client is given (a name or an address)
    kernel: Host | None = None  # the host whose kernel counter proves the kernel path


@dataclass
class Bench:
    tcp: list[Variant] = field(default_factory=list)
    apps: list[App] = field(default_factory=list)
    kernel_hosts: dict[str, Host] = field(default_factory=dict)  # variant -> its host
    notes: dict[str, str] = field(default_factory=dict)  # variant -> why it is not measured
    dialled: dict[str, dict[str, str]] = field(default_factory=dict)  # app -> op -> name → VIP
    kernel_connects: dict[str, int] = field(default_factory=dict)  # counted in the app runs
    before: str = ""  # the commit BEFORE runs


# -- set-up -----------------------------------------------------------------------------------

def _driver(h: Host, d: Path, module: str, service: str | None, name: str) -> Client:
    """A load driver (tests.bench.client or app_load) in `h`, enrolled in `service`."""
    proc = spawn(h, d, [sys.executable, "-m", f"tests.bench.{module}"], f"{name}.log", service,
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return Client(proc, f"{module} ({name})")


def _host(stack: contextlib.ExitStack, d: Path, capture: str,
          make: Callable[..., Host] = Host) -> tuple[Host, Namespace]:
    """An agent with one worker and no access log, the backend, an enrolled load generator."""
    d.mkdir(parents=True, exist_ok=True)
    h = make(d, capture, workers=1, agent_args=("--access-log", "off"))
    stack.callback(h.close)  # the drivers, the servers, the agent, its kernel state, the netns
    variants._tune(h)
    h.start()
    backend = spawn(h, d, [sys.executable, "-m", "tests.bench.backend", str(PORT), "0.0.0.0"],
                    "backend.log", stdout=subprocess.PIPE, text=True)
    assert backend.stdout is not None
    if backend.stdout.readline().strip() != "listening":
        raise RuntimeError(f"the backend did not start: see {d}/backend.log")
    client = _driver(h, d, "client", "client", "client")
    return h, Namespace(h, client, backend.pid, d)


def kernel_count(h: Host) -> int:
    """Connects the host's connect hook balanced in the kernel so far (0: no such counter)."""
    return int(h.status()["capture"]["kernel"].get("kernel", 0))


def _service(h: Host, name: str, endpoint: str, port: int, kernel: bool) -> str:
    """A Service whose VIP:port reaches `endpoint`:port: its VIP."""
    patch: dict[str, Any] = {"port": port}
    if kernel:
        patch["datapath"] = "kernel"
    svc = h.call("service.add", name=name, endpoints=[f"{endpoint}:{port}"], patch=patch)
    return str(svc["vip"])


def _mesh_variant(b: Bench, h: Host, ns: Namespace, name: str, kernel: bool) -> None:
    """The variant calling a Service's VIP; a kernel-path one only once it is seen taking it."""
    port = PORT
    try:
        vip = _service(h, SVC_KERNEL if kernel else SVC_PROXY, ALIAS if kernel else LOOPBACK,
                       port, kernel)
        variants.wait_ready(ns.client, vip, port)  # nothing binds the VIP: an answer is routed
        if kernel:
            count0 = kernel_count(h)
            for _ in range(CHECKS):
                ns.client.ask("check", host=vip, port=port)
            seen = kernel_count(h) - count0
            if seen < CHECKS:
                raise AssertionError(f"{seen} of {CHECKS} connections balanced in the kernel "
                                     f"(the rest went through the proxy)")
            b.kernel_hosts[name] = h
    except (AssertionError, RuntimeError, ClientError, MeshnodeError) as exc:
        b.notes[name] = (f"kernel path: eBPF only ({exc})" if name == KERNEL_IPT
                         else f"not measured: {exc}")
        print(f"  {name}: {b.notes[name]}", file=sys.stderr)
        return
    status = h.status()
    workers = [] if kernel else [w["pid"] for w in status["workers"]]
    b.tcp.append(Variant(name, ns.client, (vip, port), f"http://{vip}:{port}/", workers,
                         [int(status["pid"])], backend_pid=ns.backend_pid))


def _apps(b: Bench, stack: contextlib.ExitStack, h: Host, d: Path, p: Plan) -> None:
    """The real servers and their Services, and the three real-client variants."""
    def run(argv: list[str], log: str, **kw: Any) -> subprocess.Popen[Any]:
        return spawn(h, d, argv, log, **kw)

    if lacking := app_servers.missing():
        for v in (DIRECT, PROXY, KERNEL):
            b.notes.setdefault(f"{v} real clients", f"not measured: missing {', '.join(lacking)}")
        return
    started = []
    for op, server in (("redis", app_servers.redis(run, d)),
                       ("pgbench", app_servers.postgres(run, d, h)),
                       ("h2load", app_servers.h2c(run, d, MAX_CONNS))):
        try:
            stack.enter_context(server)
        except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            b.notes[f"{op} real client"] = f"not measured: its server did not start: {exc}"
            continue
        started.append(op)
    plain = _driver(h, d, "app_load", None, "apps-plain")
    enrolled = _driver(h, d, "app_load", "client", "apps-enrolled")
    b.apps.append(App(DIRECT, plain, dict.fromkeys(started, LOOPBACK)))
    for name, kernel in ((PROXY, False), (KERNEL, True)):
        if name == KERNEL and KERNEL not in b.kernel_hosts:
            continue  # the kernel path does not work here: its note says why
        if name == PROXY and not p.apps_proxy:
            continue
        hosts = {}
        try:
            for op in started:
                k_svc, p_svc, port = APPS[op]
                svc = k_svc if kernel else p_svc
                # the same server behind both Services, at an address each
                vip = _service(h, svc, ALIAS if kernel else LOOPBACK, port, kernel)
                hosts[op] = _by_name(b, name, op, enrolled, f"{svc}.mesh", vip)
        except (ClientError, MeshnodeError) as exc:
            b.notes[f"{name} real clients"] = f"not measured: {exc}"
            continue
        b.apps.append(App(name, enrolled, hosts, h if kernel else None))
    for a in b.apps:  # first connections and caches (Redis's, PostgreSQL's)
        with contextlib.suppress(ClientError, KeyError):
            a.load.ask("redis", host=a.hosts["redis"], port=app_servers.REDIS_PORT,
                       tests="ping", requests=2000, clients=p.redis_clients)
        with contextlib.suppress(ClientError, KeyError):
            a.load.ask("pgbench", host=a.hosts["pgbench"], port=app_servers.PG_PORT,
                       seconds=1, clients=p.pg_clients)


def _by_name(b: Bench, variant: str, op: str, load: Client, name: str, vip: str) -> str:
    """The service's name when it resolves to its VIP in the enrolled driver; else the VIP,
    with a note (the numbers still measure the path, not the resolver)."""
    try:
        got = load.ask("resolve", name=name)["addrs"]
    except ClientError as exc:
        got = [str(exc)]
    b.dialled.setdefault(variant, {})[op] = f"{name} → {', '.join(got)}"
    if got == [vip]:
        return name
    b.notes[f"{variant} {op}"] = f"dialled by VIP {vip}: {name} resolved to {got}"
    return vip


def _before(b: Bench, stack: contextlib.ExitStack, d: Path, rev: str, cache: Path) -> None:
    """The proxy path (eBPF) of the code at `rev`, on a host of its own."""
    try:
        sha, python = before.prepare(REPO, rev or before.default_rev(REPO), cache)
        b.before = sha
        h, ns = _host(stack, d, "ebpf", partial(before.BeforeHost, python=python, repo=REPO))
    except (AssertionError, RuntimeError, ClientError, MeshnodeError) as exc:
        b.notes[BEFORE] = f"not measured: {exc}"
        print(f"  {BEFORE}: {b.notes[BEFORE]}", file=sys.stderr)
        return
    _mesh_variant(b, h, ns, BEFORE, kernel=False)


@contextlib.contextmanager
def bench(tmp: Path, p: Plan, rev: str | None, cache: Path) -> Iterator[Bench]:
    """Every host, server and variant; `rev`: the code before (None: no such variant)."""
    b = Bench()
    with contextlib.ExitStack() as stack:
        h, ns = _host(stack, tmp / "ebpf", "ebpf")
        plain = _driver(h, tmp / "ebpf", "client", None, "plain")
        ref = Namespace(h, plain, ns.backend_pid, tmp / "ebpf")  # what direct/HAProxy dial from
        b.tcp.append(stack.enter_context(variants.direct(ref)))
        b.tcp.append(stack.enter_context(variants.haproxy(ref)))
        _mesh_variant(b, h, ns, PROXY, kernel=False)
        _mesh_variant(b, h, ns, KERNEL, kernel=True)
        if rev is not None:
            _before(b, stack, tmp / "before", rev, cache)
        hi, nsi = _host(stack, tmp / "iptables", "iptables")
        _mesh_variant(b, hi, nsi, PROXY_IPT, kernel=False)
        _mesh_variant(b, hi, nsi, KERNEL_IPT, kernel=True)
        _apps(b, stack, h, tmp / "ebpf", p)
        yield b


# -- measures ---------------------------------------------------------------------------------

def _rotate(items: list[Any], rep: int) -> list[Any]:
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


# variant -> metric -> repetition -> value: ratios are taken per repetition (paired), then
# their median, so that a slow drift of the machine (other work on the 2 CPUs) cancels out
Reps = dict[str, dict[str, dict[int, float]]]


def _record(reps: Reps, name: str, rep: int, metrics: measures.Metrics) -> None:
    for key, value in metrics.items():
        if value is not None:
            reps.setdefault(name, {}).setdefault(key, {})[rep] = value


def raw_of(reps: Reps) -> report.Raw:
    return {v: {k: [by[i] for i in sorted(by)] for k, by in ms.items()}
            for v, ms in reps.items()}


def paired(reps: Reps, variant: str, ref: str, key: str) -> float | None:
    """The median over repetitions of variant / ref, each repetition's own."""
    a, b = reps.get(variant, {}).get(key, {}), reps.get(ref, {}).get(key, {})
    xs = [a[i] / b[i] for i in sorted(a.keys() & b.keys()) if b[i]]
    return statistics.median(xs) if xs else None


def app_measure(b: Bench, a: App, p: Plan, op: str, d: Path) -> measures.Metrics:
    """One real client's run on one variant."""
    port = APPS[op][2]
    host = a.hosts[op]
    before = kernel_count(a.kernel) if a.kernel else 0
    if op == "redis":
        r = a.load.ask("redis", host=host, port=port, tests=REDIS_TESTS,
                       requests=p.redis_requests, clients=p.redis_clients)
        out: measures.Metrics = {f"redis_{t.lower()}": r["rps"].get(t) for t in REDIS_ROWS}
    elif op == "pgbench":
        r = a.load.ask("pgbench", host=host, port=port, seconds=p.pg_seconds,
                       clients=p.pg_clients)
        if r["failed"]:
            print(f"  warning: {a.name} pgbench: {r['failed']} failed", file=sys.stderr)
        out = {"pg_tps": r["tps"], "pg_lat": r["latency_ms"]}
    else:
        r = a.load.ask("h2load", url=f"http://{host}:{port}/", seconds=p.h2_seconds,
                       clients=p.h2_clients, streams=p.h2_streams,
                       log=str(d / f"h2load-{a.name}.log"))
        if r["errors"]:
            print(f"  warning: {a.name} h2load: {r['errors']} errors of {r['requests']}",
                  file=sys.stderr)
        out = {"h2_rps": r["rps"], "h2_p50": r["p50_ms"], "h2_p99": r["p99_ms"]}
    if a.kernel:
        b.kernel_connects[a.name] = (b.kernel_connects.get(a.name, 0)
                                     + kernel_count(a.kernel) - before)
    return out


def measure_all(b: Bench, p: Plan, d: Path) -> Reps:
    reps: Reps = {}
    for rep in range(p.tcp.reps):
        for title, fn in steps(p):
            t0 = time.monotonic()
            for v in _rotate(b.tcp, rep):
                try:
                    _record(reps, v.name, rep, fn(v, p.tcp))
                except (ClientError, OSError, KeyError, ValueError) as exc:
                    print(f"  {v.name}: {title} failed: {exc}", file=sys.stderr)
            print(f"kernel [{rep + 1}/{p.tcp.reps}] {title}: {time.monotonic() - t0:.1f}s",
                  file=sys.stderr)
        for op in APPS:
            t0 = time.monotonic()
            for a in _rotate([a for a in b.apps if op in a.hosts], rep):
                try:
                    _record(reps, a.name, rep, app_measure(b, a, p, op, d))
                except (ClientError, OSError, KeyError, ValueError) as exc:
                    print(f"  {a.name}: {op} failed: {exc}", file=sys.stderr)
            print(f"kernel [{rep + 1}/{p.tcp.reps}] {op}: {time.monotonic() - t0:.1f}s",
                  file=sys.stderr)
    return reps


# -- the report -------------------------------------------------------------------------------

def table_metrics(p: Plan) -> list[report.Metric]:
    M = report.Metric
    return [
        M("conn_rate_many", f"connection setup, {p.tcp.many_clients} clients", "conn/s", True),
        M("conn_rate_1", "connection setup, 1 client", "conn/s", True),
        M("conn_rate_many_cpu", f"proxy CPU per connection, {p.tcp.many_clients} clients",
          "µs", False),
        M("bulk", "bulk, both ways", "MB/s", True),
        M("cpu_per_gb", "proxy CPU per GB relayed", "CPU-s/GB", False),
        M("pp1_p50", "ping-pong 1 B p50", "µs", False),
        M("pp1_p99", "ping-pong 1 B p99", "µs", False),
        M("pp1_pin_p50", "ping-pong 1 B pinned p50", "µs", False),
        M("pp1_pin_p99", "ping-pong 1 B pinned p99", "µs", False),
        *(M(f"redis_{t.lower()}", f"redis-benchmark {t} (-c{p.redis_clients})", "req/s", True)
          for t in REDIS_ROWS),
        M("pg_tps", f"pgbench -S select-only (-c{p.pg_clients})", "tps", True),
        M("pg_lat", "pgbench latency, mean", "ms", False),
        M("h2_rps", f"h2load h2c (-c{p.h2_clients} -m{p.h2_streams})", "req/s", True),
        M("h2_p50", "h2load latency p50", "ms", False),
        M("h2_p99", "h2load latency p99", "ms", False),
    ]


@dataclass(frozen=True)
class Goal:
    target: report.Target
    what: str
    bound: str


def _goal(name: str, what: str, value: float | None, bound: float, at_least: bool) -> Goal:
    met = None if value is None else value >= bound if at_least else value <= bound
    return Goal(report.Target(name, value, met), what,
                f"target {'>=' if at_least else '<='} {bound:g}")


def table_text(t: report.Table, reps: Reps, names: list[str], ms: list[report.Metric]) -> str:
    """report.table_text, with paired ratios (see `paired`) in the ratio rows."""
    return report.table_text(t, names, ms, ratio_of=lambda v, ref, key: paired(reps, v, ref, key))


# "no slower than before": connection setup, bulk and the pinned round trip (its CPU cost; the
# unpinned one swings with where the scheduler puts the three processes)
PROXY_KEYS = ("conn_rate_many", "conn_rate_1", "bulk", "pp1_pin_p50")


def proxy_vs_before(reps: Reps) -> dict[str, float]:
    """The proxy path now over before, per PROXY_KEYS (a latency inverted: above 1 is faster
    either way)."""
    out = {}
    for key in PROXY_KEYS:
        x = (paired(reps, PROXY, BEFORE, key) if not key.endswith("_p50")
             else paired(reps, BEFORE, PROXY, key))
        if x is not None:
            out[key] = x
    return out


def goals(reps: Reps) -> list[Goal]:
    x = report.TIMES

    def r(key: str, ref: str = DIRECT) -> float | None:
        return paired(reps, KERNEL, ref, key)

    # redis-benchmark's tests (PING_INLINE, PING_MBULK, SET, GET) as one client: their
    # geometric mean (the worst of four noisy figures would be biased low)
    redis = [v for k in REDIS_ROWS if (v := r(f"redis_{k.lower()}")) is not None]
    return [
        _goal(f"kernel-conn/s≥0.9{x}direct", "kernel conn/s vs direct", r("conn_rate_many"),
              0.9, True),
        _goal(f"kernel-conn/s≥1.8{x}haproxy", "kernel conn/s vs haproxy",
              r("conn_rate_many", HAPROXY), 1.8, True),
        _goal(f"kernel-bulk≥0.95{x}direct", "kernel bulk vs direct", r("bulk"), 0.95, True),
        _goal(f"kernel-pp1B-p50≤1.1{x}direct", "kernel ping-pong 1 B p50 vs direct",
              r("pp1_p50"), 1.1, False),
        _goal(f"kernel-redis≥0.9{x}direct", "kernel redis-benchmark (geometric mean of its "
              "tests) vs direct", statistics.geometric_mean(redis) if redis else None, 0.9, True),
        _goal(f"kernel-pgbench≥0.9{x}direct", "kernel pgbench tps vs direct", r("pg_tps"),
              0.9, True),
        _goal(f"kernel-h2load≥0.9{x}direct", "kernel h2load req/s vs direct", r("h2_rps"),
              0.9, True),
        _goal(f"proxy-path≥{EPSILON}{x}before", "proxy path (worst of conn/s, bulk, pinned p50) "
              "vs before", min(proxy_vs_before(reps).values(), default=None), EPSILON, True),
    ]


def others_busy() -> list[str]:
    """Test runs and benchmarks of others on this machine (the 2 CPUs are shared: their load
    shows in every figure)."""
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents()), *(c.pid for c in me.children(recursive=True))}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []
        cmd = " ".join(argv)
        if (proc.info["pid"] not in mine and argv[:1] != ["timeout"]
                and any(f"-m {m}" in cmd for m in ("pytest", "tests.bench", "tests.drill"))):
            found.append(f"{proc.info['pid']} {cmd[:80]}")
    return found


def _verdict(t: report.Target) -> str:
    return "n/a" if t.met is None else "MET" if t.met else "NOT MET"


# -- the run ----------------------------------------------------------------------------------

def run(quick: bool, out: Path, keep: bool = False, rev: str | None = "") -> int:
    """Set up, check, measure; print the table, the notes and the targets; write JSON.
    `rev`: the code "before" ("": before.default_rev, None: not measured)."""
    p = plan(quick)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-kernel-bench-"))
    busy = others_busy()
    try:
        with bench(tmp, p, rev, out / ".before") as b:
            print(f"kernel: set up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            reps = measure_all(b, p, tmp)
            busy += others_busy()
            names = [c for c in COLUMNS if c in {v.name for v in b.tcp} | {a.name for a in b.apps}]
            pids = {v.name: {"proxy": v.proxy_pids, "control": v.control_pids} for v in b.tcp}
    except KeyboardInterrupt:
        print("interrupted: every process and namespace has been removed", file=sys.stderr)
        return 130
    finally:
        report.release(tmp, keep)
    wall = time.monotonic() - started
    raw = raw_of(reps)
    table = report.medians(raw)
    ms = table_metrics(p)
    version = report.source_version(REPO)
    gs = goals(reps)
    vs_before = proxy_vs_before(reps)
    now = datetime.now(UTC)
    head = (f"meshnode kernel-path bench ({p.mode}): {len(ALL_CPUS)} CPUs shared by the load "
            f"generator, the middles and the servers, Linux {platform.release()}, "
            f"{version.get('commit', 'unknown commit')}; median of {p.tcp.reps}; bulk "
            f"{p.tcp.bulk_bytes >> 20} MiB each way; one worker per proxy; {wall:.0f}s")
    path = out / f"kernel-{now:%Y%m%d-%H%M%S}-{p.mode}.json"
    report.write_json(path, {
        "when": now.isoformat(), "source": version, "mode": p.mode, "wall_s": wall,
        "machine": {"cpus": len(ALL_CPUS), "kernel": platform.release()},
        "plan": {**p.__dict__, "tcp": p.tcp.__dict__}, "variants": names, "pids": pids,
        "raw": raw, "median": table, "notes": b.notes, "dialled": b.dialled,
        "kernel_connects_in_app_runs": b.kernel_connects, "before": b.before,
        "others_busy": busy,
        "proxy_vs_before": vs_before,
        "ratio_to_direct": {v: {m.key: paired(reps, v, DIRECT, m.key) for m in ms}
                            for v in names},
        "ratio_to_haproxy": {v: {m.key: paired(reps, v, HAPROXY, m.key) for m in ms}
                             for v in names},
        "targets": [{"name": g.target.name, "value": g.target.value, "met": g.target.met}
                    for g in gs]})
    print(head)
    print(table_text(table, reps, names, ms))
    if KERNEL_IPT not in names:
        print(f"{KERNEL_IPT:<46}{'':>9}  "
              + b.notes.get(KERNEL_IPT, "kernel path: eBPF only"))
    for what, note in b.notes.items():
        if what != KERNEL_IPT:
            print(f"  {what}: {note}")
    for name, dialled in b.dialled.items():
        print(f"  {name} real clients dialled " + "; ".join(dialled.values()))
    for name, n in b.kernel_connects.items():
        print(f"  {name}: {n} connects balanced in the kernel during the real clients' runs")
    print("  direct and haproxy-tcp: a load generator not enrolled; mn-*: one enrolled in "
          "service `client`. proxy CPU: the worker's (none on the kernel path). Ratios: the "
          "median of each repetition's own ratio.")
    if b.before:
        print(f"  {BEFORE}: the proxy path (eBPF) of {b.before[:12]}, the code before the kernel "
              "path; mn-ebpf over it: " + ", ".join(
                  f"{k} {report._fmt(v)}" for k, v in vs_before.items()) + " (p50 inverted)")
    if busy:
        print(f"  warning: other work ran on this machine meanwhile (figures are noisy): "
              f"{'; '.join(dict.fromkeys(busy))}")
    print(f"wrote {path}")
    for g in gs:
        print(f"{g.what}: {report._fmt(g.target.value)} ({g.bound}) {_verdict(g.target)}")
    print(report.targets_line([g.target for g in gs]))
    return 0




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.kernel",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short form (make bench-quick)")
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench")
    ap.add_argument("--before", default="", metavar="REV",
                    help="the commit whose proxy path is 'before' (default: the parent of the "
                         f"commit adding {before.MARKER}, HEAD until it is committed); built "
                         "once into --out/.before")
    ap.add_argument("--no-before", action="store_true", help="do not measure the code before")
    ap.add_argument("--keep", action="store_true", help="keep the logs' temporary folder")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, BPF, iptables)", file=sys.stderr)
        return 77
    if missing := [t for t in ("haproxy", "nsenter", "setpriv") if shutil.which(t) is None]:
        print(f"missing: {', '.join(missing)}; install with: sudo ./setup.sh bench",
              file=sys.stderr)
        return 69
    os.environ["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    interrupt_on_signals()
    return run(args.quick, args.out, args.keep, None if args.no_before else args.before)


if __name__ == "__main__":
    sys.exit(main())
