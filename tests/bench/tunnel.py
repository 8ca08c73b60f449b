"""mTLS between two hosts (issue 14 item 8): `python -m tests.bench.tunnel [--quick] [--out DIR]`,
as root. `make bench` runs it after its own table (`make bench-quick` a shortened form).

Two network namespaces, host A and host B, joined by a veth pair (198.19.K.1/24 in A,
198.19.K.2/24 in B, K random; the machine's own namespace gains nothing, and both namespaces
go on success, failure or Ctrl-C). The load generator (tests/bench/client.py) runs in A, the
backend (tests/bench/backend.py) in B on 198.19.K.2:9000. One process/thread per proxy:
  direct        client → backend, across the veth: the reference
  plain         client → worker a (explicit listener on A's loopback) → backend: meshnode
                without mTLS, one hop
  mtls          client → worker a → mTLS tunnel → worker b (B's inbound listener) → backend
  haproxy-mtls  client → HAProxy in A (TLS client, client certificate, session reuse) →
                HAProxy in B (TLS server, client certificate required) → backend
  mtls-full     (full runs only) the same with every handshake full: meshnode's tickets off,
  haproxy-full  HAProxy's no-ssl-reuse
Measured with tests/bench/measures.py, the variants interleaved, medians of the repetitions:
connections/s (connect, 1-byte exchange, close; several clients) and the proxies' CPU per
connection, bulk each way and CPU per GB, 1-byte ping-pong p50/p99. Targets: mtls bulk and
connection rate at least haproxy-mtls; the p50 that mtls adds over plain ≤ 0.2 ms (one
host-to-host hop here). Writes tunnel-<time>-<mode>.json into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns
from pyroute2.netns import popns, pushns

from meshnode.config import WorkerConfig
from meshnode.model import Endpoint, HostPort, Reset, ServiceSpec
from meshnode.wire import (
    AgentMessage,
    Identities,
    Peers,
    Security,
    StatsReply,
    StatsRequest,
    encode,
    update_message,
    worker_codec,
)
from tests.bench import measures, report
from tests.bench.client import Client, ClientError
from tests.bench.measures import Metrics, Plan
from tests.bench.procs import ALL_CPUS, interrupt_on_signals, stop_tree
from tests.bench.variants import MAX_CONNS, PORT_RANGE, Variant, wait_ready
from tests.tls_certs import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
TD = "mesh.test"
VIP = "127.240.0.30"  # the service's address: the explicit listeners' fixed destination
LOOPBACK = "127.0.0.1"
BACKEND_PORT = 9000
WORKER_PORT = 9100  # + variant index: worker a's listener in A (worker b's in B, unused)
INBOUND_PORT = 15008  # + variant index: worker b's mTLS listener on B's veth address
HAPROXY_PORT = 9200  # + index: the client side's listener in A
HAPROXY_TLS_PORT = 9443  # + index: the server side's TLS listener on B's veth address
DIRECT, PLAIN, MTLS, HAPROXY = "direct", "plain", "mtls", "haproxy-mtls"
_WORKER = """
import os, sys
if os.environ.get("BENCH_NO_TICKETS"):
    from meshnode.proxy import tls
    made = tls._context
    def no_tickets(server, bundle, chain):
        ctx = made(server, bundle, chain)
        if server:
            ctx.num_tickets = 0
        return ctx
    tls._context = no_tickets
if os.environ.get("BENCH_PROFILE"):  # cProfile to this file, written when it exits
    import atexit, cProfile
    prof = cProfile.Profile()
    atexit.register(lambda: (prof.disable(), prof.dump_stats(os.environ["BENCH_PROFILE"])))
    prof.enable()
from meshnode.proxy.worker import main
sys.exit(main(sys.argv[1:]))
"""


# -- two hosts --------------------------------------------------------------------------------

@dataclass
class TwoHosts:
    """Host A and host B: network namespaces joined by a veth pair, and what runs in them."""

    dir: Path
    k: int
    a: str
    b: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def a_ip(self) -> str:
        return f"198.19.{self.k}.1"

    @property
    def b_ip(self) -> str:
        return f"198.19.{self.k}.2"

    def popen(self, ns: str, argv: list[str], log: str, **kw: Any) -> subprocess.Popen[Any]:
        """A process in namespace `ns`, its stderr to a log file, in a session of its own."""
        with open(self.dir / log, "ab") as err:
            p: subprocess.Popen[Any] = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", *argv], cwd=REPO, stderr=err,
                start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def listener(self, ns: str, host: str, port: int) -> socket.socket:
        """A listening socket made in namespace `ns` (for a worker to inherit)."""
        pushns(ns)
        try:
            return socket.create_server((host, port), backlog=4096)
        finally:
            popns()


@contextlib.contextmanager
def two_hosts(tmp: Path) -> Iterator[TwoHosts]:
    tag = secrets.token_hex(2)
    h = TwoHosts(tmp, 1 + secrets.randbelow(250), f"mn-{tag}-a", f"mn-{tag}-b")
    made: list[str] = []
    try:
        for name in (h.a, h.b):
            netns.create(name)
            made.append(name)
        with NetNS(h.a) as ns:
            ns.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": h.b})
        for name, ip in ((h.a, h.a_ip), (h.b, h.b_ip)):
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                eth = ns.link_lookup(ifname="eth0")[0]
                ns.addr("add", index=eth, address=ip, prefixlen=24)
                ns.link("set", index=eth, state="up")
            # the rate loops: a wide ephemeral range, and TIME_WAIT ports reused after 1 s on
            # the veth too (the default reuses them on loopback only)
            subprocess.run(["nsenter", f"--net=/run/netns/{name}", "sysctl", "-qw",
                            f"net.ipv4.ip_local_port_range={PORT_RANGE}",
                            "net.ipv4.tcp_tw_reuse=1"], check=True)
        yield h
    finally:
        for p in reversed(h.procs):
            with contextlib.suppress(Exception):
                stop_tree(p)
        for name in made:
            with contextlib.suppress(OSError):
                netns.remove(name)


# -- meshnode workers -------------------------------------------------------------------------

class Worker:
    """A standalone worker in one namespace, told what an agent would tell it over its
    control channel."""

    def __init__(self, hosts: TwoHosts, ns: str, node: str, port: int, log: str,
                 inbound: socket.socket | None = None, env: dict[str, str] | None = None) -> None:
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [child.fileno()] + ([inbound.fileno()] if inbound is not None else [])
        config = WorkerConfig(worker_id=1, listen_host=LOOPBACK, listen_port=port, mark=0,
                              control_fd=child.fileno(), explicit_target=f"{VIP}:80", node=node,
                              inbound_fd=inbound.fileno() if inbound is not None else -1,
                              drain_grace=0.5)
        self.proc = hosts.popen(ns, [sys.executable, "-c", _WORKER, *config.to_argv()], log,
                                pass_fds=fds, env={**os.environ, **(env or {})})
        child.close()
        self._r = self.ctl.makefile("rb")
        hello = json.loads(self._r.readline() or "{}")
        if hello.get("t") != "listening":
            raise RuntimeError(f"worker {node} did not start: see {hosts.dir / log}")

    def send(self, *msgs: AgentMessage) -> None:
        for m in msgs:
            self.ctl.sendall(encode(m))
        self.ctl.sendall(b'{"t":"sync","seq":1}\n')
        assert json.loads(self._r.readline())["t"] == "synced"

    def handshakes(self) -> dict[str, int]:
        """This worker's TLS handshake counters (side/result -> count)."""
        self.ctl.sendall(encode(StatsRequest(2)))
        reply = worker_codec().decode(self._r.readline())
        assert isinstance(reply, StatsReply)
        return {"/".join(r.labels): r.value for r in reply.labelled.get("tls_handshakes", ())}


def _route(backend: str, node: str) -> AgentMessage:
    ep = Endpoint(HostPort.parse(f"{backend}:{BACKEND_PORT}"), node=node)
    return update_message(Reset(ServiceSpec.build("web", 1, IPv4Address(VIP), 80), (ep,)))


@dataclass
class Setup:
    """What a variant is made of, beyond the measured `Variant`: who counts its handshakes."""

    variant: Variant
    handshakes: Callable[[], dict[str, Any]] | None = None
    workers: tuple[Worker, ...] = ()  # held: a worker whose channel closes drains and exits


def meshnode_plain(h: TwoHosts, client: Client, backend_pid: int, i: int) -> Setup:
    w = Worker(h, h.a, "a", WORKER_PORT + i, "worker-plain.log")
    w.send(_route(h.b_ip, "b"))  # another host's endpoint, no mTLS: plaintext, one hop
    wait_ready(client, LOOPBACK, WORKER_PORT + i)
    return Setup(Variant(PLAIN, client, (LOOPBACK, WORKER_PORT + i), "", [w.proc.pid],
                         backend_pid=backend_pid), workers=(w,))


def meshnode_mtls(h: TwoHosts, client: Client, backend_pid: int, pki: Pki, i: int,
                  tickets: bool) -> Setup:
    name = MTLS if tickets else "mtls-full"
    env = {} if tickets else {"BENCH_NO_TICKETS": "1"}

    def env_of(side: str) -> dict[str, str]:  # BENCH_PROFILE_A/_B=FILE: cProfile that worker
        prof = os.environ.get(f"BENCH_PROFILE_{side}") if tickets else None
        return {**env, "BENCH_PROFILE": prof} if prof else env

    inbound = h.listener(h.b, h.b_ip, INBOUND_PORT + i)
    try:
        b = Worker(h, h.b, "b", WORKER_PORT + i, f"worker-{name}-b.log", inbound, env_of("B"))
    finally:
        inbound.close()
    a = Worker(h, h.a, "a", WORKER_PORT + i, f"worker-{name}-a.log", None, env_of("A"))
    b.send(Identities(TD, str(pki.bundle), str(pki.leaves["node-b"]), generation=1),
           Security("STRICT"), _route(h.b_ip, "b"))
    a.send(Identities(TD, str(pki.bundle), str(pki.leaves["node-a"]), generation=1),
           Peers({"b": f"{h.b_ip}:{INBOUND_PORT + i}"}), Security("STRICT"), _route(h.b_ip, "b"))
    wait_ready(client, LOOPBACK, WORKER_PORT + i)
    return Setup(Variant(name, client, (LOOPBACK, WORKER_PORT + i), "",
                         [a.proc.pid, b.proc.pid], backend_pid=backend_pid), b.handshakes,
                 (a, b))


# -- HAProxy ----------------------------------------------------------------------------------

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn {maxconn}
    stats socket {stats} mode 600 level user
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {bind}{tls_bind}
    default_backend be
backend be
    server s1 {server}{tls_server}
"""


def _haproxy_info(path: Path) -> dict[str, str]:
    """`show info` on a stats socket (the SSL key and reuse rates among it)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return dict(line.split(": ", 1) for line in data.decode().splitlines() if ": " in line)


def haproxy_mtls(h: TwoHosts, client: Client, backend_pid: int, pki: Pki, i: int,
                 reuse: bool) -> Setup:
    name = HAPROXY if reuse else "haproxy-full"
    server_stats, client_stats = h.dir / f"{name}-b.sock", h.dir / f"{name}-a.sock"
    server_cfg = h.dir / f"{name}-b.cfg"
    server_cfg.write_text(HAPROXY_CFG.format(
        bind=f"{h.b_ip}:{HAPROXY_TLS_PORT + i}", stats=server_stats,
        tls_bind=f" ssl crt {pki.leaves['node-b']} ca-file {pki.bundle} verify required",
        server=f"{h.b_ip}:{BACKEND_PORT}", tls_server="", maxconn=MAX_CONNS))
    client_cfg = h.dir / f"{name}-a.cfg"
    client_cfg.write_text(HAPROXY_CFG.format(
        bind=f"{LOOPBACK}:{HAPROXY_PORT + i}", tls_bind="", stats=client_stats,
        server=f"{h.b_ip}:{HAPROXY_TLS_PORT + i}",
        tls_server=f" ssl crt {pki.leaves['node-a']} ca-file {pki.bundle} verify required"
                   + ("" if reuse else " no-ssl-reuse"), maxconn=MAX_CONNS))
    server = h.popen(h.b, ["haproxy", "-f", str(server_cfg), "-db"], f"{name}-b.log")
    clientside = h.popen(h.a, ["haproxy", "-f", str(client_cfg), "-db"], f"{name}-a.log")
    wait_ready(client, LOOPBACK, HAPROXY_PORT + i, [clientside.pid])

    def reuse_info() -> dict[str, Any]:  # rates over the last second
        keys = ("SslFrontendKeyRate", "SslFrontendSessionReuse_pct")
        info = _haproxy_info(server_stats)
        return {k: info.get(k) for k in keys}

    return Setup(Variant(name, client, (LOOPBACK, HAPROXY_PORT + i), "",
                         [clientside.pid, server.pid], backend_pid=backend_pid), reuse_info)


# -- the run ----------------------------------------------------------------------------------

def plan(quick: bool) -> Plan:
    many = max(4, 2 * len(ALL_CPUS))  # as `make bench`'s "connection setup, many clients"
    if quick:
        return Plan("quick", 3, 128 << 20, 2000, 0.5, many, 0.0, 0, 0)
    return Plan("full", 3, 512 << 20, 10000, 2.0, many, 0.0, 0, 0)


STEPS: list[tuple[str, Callable[[Variant, Plan], Metrics]]] = [
    ("connection setup", measures.connrate(many=True)),
    ("bulk", measures.bulk),
    ("ping-pong 1 B", measures.pingpong(1, pin=False)),
]
KEYS = ("conn_rate_many", "conn_rate_many_cpu", "bulk_up", "bulk_down", "bulk", "cpu_per_gb",
        "pp1_p50", "pp1_p99")


def table_metrics(p: Plan) -> list[report.Metric]:
    by_key = {m.key: m for m in report.metrics(p.many_clients, 1)}
    return [by_key[k] for k in KEYS]


def targets(t: report.Table) -> list[report.Target]:
    times = report.TIMES
    bulk = report.ratio(t, MTLS, HAPROXY, "bulk")
    rate = report.ratio(t, MTLS, HAPROXY, "conn_rate_many")
    p_mtls, p_plain = t.get(MTLS, {}).get("pp1_p50"), t.get(PLAIN, {}).get("pp1_p50")
    added = (p_mtls - p_plain) / 1000 if p_mtls is not None and p_plain is not None else None
    return [
        report.Target(f"mtls-bulk≥1.0{times}haproxy-mtls", bulk,
                      None if bulk is None else bulk >= 1.0),
        report.Target(f"mtls-conn/s≥1.0{times}haproxy-mtls", rate,
                      None if rate is None else rate >= 1.0),
        report.Target("mtls-added-p50≤0.2ms/hop", added, None if added is None else added <= 0.2),
    ]


def _attempt(v: Variant, fn: Callable[[Variant, Plan], Metrics], p: Plan, title: str) -> Metrics:
    try:
        return fn(v, p)
    except (ClientError, OSError, KeyError, ValueError) as exc:
        print(f"  {v.name}: {title} failed: {exc}", file=sys.stderr)
        return {}


def _set_up(h: TwoHosts, p: Plan, only: set[str]) -> list[Setup]:
    pki = make_pki(h.dir / "pki", TD)
    pki.node("a")
    pki.node("b")
    backend = h.popen(h.b, [sys.executable, "-m", "tests.bench.backend", str(BACKEND_PORT),
                            h.b_ip], "backend.log", stdout=subprocess.PIPE, text=True)
    assert backend.stdout is not None
    if backend.stdout.readline().strip() != "listening":
        raise RuntimeError(f"the backend did not start: see {h.dir}/backend.log")
    gen = h.popen(h.a, [sys.executable, "-m", "tests.bench.client"], "client.log",
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = Client(gen, "host A")
    bp = backend.pid
    makers: list[tuple[str, Callable[[int], Setup]]] = [
        (DIRECT, lambda i: Setup(Variant(DIRECT, client, (h.b_ip, BACKEND_PORT), "",
                                         backend_pid=bp))),
        (PLAIN, lambda i: meshnode_plain(h, client, bp, i)),
        (MTLS, lambda i: meshnode_mtls(h, client, bp, pki, i, True)),
        (HAPROXY, lambda i: haproxy_mtls(h, client, bp, pki, i, True)),
    ]
    if p.mode == "full":  # every handshake full: cheap enough for the full run only
        makers += [("mtls-full", lambda i: meshnode_mtls(h, client, bp, pki, i, False)),
                   ("haproxy-full", lambda i: haproxy_mtls(h, client, bp, pki, i, False))]
    setups = [make(i) for i, (name, make) in enumerate(makers) if not only or name in only]
    for s in setups:  # first tickets, caches, the allocators' first growth
        _attempt(s.variant, measures.connrate(True), dataclasses.replace(p, connrate_seconds=0.3),
                 "warm-up")
    return setups


def _rotate(items: list[Setup], rep: int) -> list[Setup]:
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


def run(quick: bool, out: Path, only: str = "", keep: bool = False) -> int:
    """Set up, measure, print the table and the targets line, write the JSON record."""
    p = plan(quick)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-tunnel-bench-"))
    raw: report.Raw = {}
    checks: dict[str, Any] = {}
    try:
        with two_hosts(tmp) as h:
            setups = _set_up(h, p, set(filter(None, only.split(","))))
            print(f"tunnel: two hosts set up in {time.monotonic() - started:.1f}s",
                  file=sys.stderr)
            for rep in range(p.reps):
                for title, fn in STEPS:
                    t0 = time.monotonic()
                    for s in _rotate(setups, rep):
                        for key, value in _attempt(s.variant, fn, p, title).items():
                            if value is not None:
                                raw.setdefault(s.variant.name, {}).setdefault(key, []).append(
                                    value)
                        if fn is STEPS[0][1] and s.handshakes is not None:
                            # right after the rate loop: HAProxy's reuse is a 1-second rate
                            with contextlib.suppress(OSError, ValueError, AssertionError):
                                checks[s.variant.name] = s.handshakes()
                    print(f"tunnel [{rep + 1}/{p.reps}] {title}: "
                          f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
            names = [s.variant.name for s in setups]
            net = f"198.19.{h.k}.0/24"
    except KeyboardInterrupt:
        print("interrupted: every process and both namespaces have been removed",
              file=sys.stderr)
        return 130
    finally:
        report.release(tmp, keep)
    wall = time.monotonic() - started
    table = report.medians(raw)
    ms = table_metrics(p)
    ts = targets(table)
    now = datetime.now(UTC)
    version = report.source_version(REPO)
    head = (f"meshnode tunnel bench ({p.mode}): two hosts (namespaces, veth {net}), "
            f"{len(ALL_CPUS)} CPUs, Linux {platform.release()}, "
            f"{version.get('commit', 'unknown commit')}; median of {p.reps}; bulk "
            f"{p.bulk_bytes >> 20} MiB each way; one worker/thread per proxy; {wall:.0f}s")
    path = out / f"tunnel-{now:%Y%m%d-%H%M%S}-{p.mode}.json"
    report.write_json(path, {
        "when": now.isoformat(), "source": version, "mode": p.mode, "wall_s": wall,
        "machine": {"cpus": len(ALL_CPUS), "kernel": platform.release()},
        "plan": p.__dict__, "variants": names, "raw": raw, "median": table,
        "handshakes": checks,
        "added_p50_us": {v: _diff(table, v, PLAIN, "pp1_p50") for v in names},
        "ratio_to_haproxy_mtls": {v: {k: report.ratio(table, v, HAPROXY, k) for k in KEYS}
                                  for v in names},
        "targets": [{"name": t.name, "value": t.value, "met": t.met} for t in ts]})
    print(head)
    print(report.table_text(table, names, ms, refs=(DIRECT, HAPROXY)))
    for name, seen in checks.items():
        print(f"  {name} server side, after its last rate loop: {json.dumps(seen, sort_keys=True)}")
    print(f"wrote {path}")
    print(report.targets_line(ts))
    return 0


def _diff(t: report.Table, v: str, ref: str, key: str) -> float | None:
    a, b = t.get(v, {}).get(key), t.get(ref, {}).get(key)
    return a - b if a is not None and b is not None else None




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.tunnel",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short form (make bench-quick)")
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench")
    ap.add_argument("--only", default="", help="variants, comma-separated (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the logs' temporary folder")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 77
    if shutil.which("haproxy") is None:
        print("missing: haproxy; install with: sudo ./setup.sh bench", file=sys.stderr)
        return 69
    os.environ["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    interrupt_on_signals()
    return run(args.quick, args.out, args.only, args.keep)


if __name__ == "__main__":
    sys.exit(main())
