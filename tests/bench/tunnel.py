"""mTLS tunnel benchmark (issue 14 item 8, quick form): `python -m tests.bench.tunnel`.

On loopback in this namespace, one process per proxy, the same backend (tests/bench/backend.py)
and load operations (tests/bench/client.py) as `make bench`:
  direct          client → backend
  plain           client → meshnode worker (explicit) → backend
  mtls            client → worker a → mTLS tunnel → worker b (inbound) → backend
  mtls-full       the same, tickets off (every handshake full)
  haproxy-mtls    client → haproxy (TLS client, client cert, session reuse) → haproxy (TLS
                  server, client cert required) → backend
  haproxy-full    the same with no-ssl-reuse
Prints one JSON line per variant and a table: connections/s (connect, 1-byte exchange,
close), bulk MB/s each way, 1-byte ping-pong p50/p99, and the proxies' CPU per connection
and per GB. Opt-in; not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import psutil

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
from tests.bench.client import op_bulk, op_connrate, op_pingpong
from tests.bench.variants import MAX_CONNS
from tests.tls_certs import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
TD = "mesh.test"
VIP = "127.240.0.30"
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
from meshnode.proxy.worker import main
sys.exit(main(sys.argv[1:]))
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling a listener that is starting, not synchronisation


@dataclass
class Variant:
    name: str
    addr: tuple[str, int]
    pids: list[int] = field(default_factory=list)
    server: Worker | None = None  # whose handshake counters to report


class Worker:
    def __init__(self, node: str, listen: str, inbound: socket.socket | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.port = free_port(listen)
        self.addr = (listen, self.port)
        fds = [child.fileno()] + ([inbound.fileno()] if inbound is not None else [])
        config = WorkerConfig(worker_id=1, listen_host=listen, listen_port=self.port, mark=0,
                              control_fd=child.fileno(), explicit_target=f"{VIP}:80", node=node,
                              inbound_fd=inbound.fileno() if inbound is not None else -1)
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, *config.to_argv()],
                                     pass_fds=fds, cwd=REPO, env={**os.environ, **(env or {})})
        child.close()
        self._r = self.ctl.makefile("rb")
        assert json.loads(self._r.readline())["t"] == "listening"

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

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.ctl.close()


def _route(backend: int, node: str) -> AgentMessage:
    ep = Endpoint(HostPort.parse(f"127.0.0.1:{backend}"), node=node)
    return update_message(Reset(ServiceSpec.build("web", 1, IPv4Address(VIP), 80), (ep,)))


@contextlib.contextmanager
def meshnode_plain(backend: int) -> Iterator[Variant]:
    w = Worker("a", "127.0.0.3")
    try:
        w.send(_route(backend, "b"))
        yield Variant("plain", w.addr, [w.proc.pid])
    finally:
        w.stop()


@contextlib.contextmanager
def meshnode_mtls(backend: int, pki: Pki, tickets: bool) -> Iterator[Variant]:
    env = {} if tickets else {"BENCH_NO_TICKETS": "1"}
    inbound = socket.create_server(("127.0.0.2", 0))
    host, port = inbound.getsockname()
    b = Worker("b", "127.0.0.2", inbound, env)
    inbound.close()
    a = Worker("a", "127.0.0.3", None, env)
    try:
        b.send(Identities(TD, str(pki.bundle), str(pki.leaves["node-b"]), generation=1),
               Security("STRICT"), _route(backend, "b"))
        a.send(Identities(TD, str(pki.bundle), str(pki.leaves["node-a"]), generation=1),
               Peers({"b": f"{host}:{port}"}), Security("STRICT"), _route(backend, "b"))
        yield Variant("mtls" if tickets else "mtls-full", a.addr, [a.proc.pid, b.proc.pid], b)
    finally:
        a.stop()
        b.stop()


HAPROXY = """\
global
    nbthread 1
    maxconn {maxconn}
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


@contextlib.contextmanager
def haproxy_mtls(backend: int, pki: Pki, reuse: bool, tmp: Path) -> Iterator[Variant]:
    client_port, server_port = free_port("127.0.0.3"), free_port("127.0.0.2")
    server_cfg = tmp / "haproxy-server.cfg"
    server_cfg.write_text(HAPROXY.format(
        bind=f"127.0.0.2:{server_port}",
        tls_bind=f" ssl crt {pki.leaves['node-b']} ca-file {pki.bundle} verify required",
        server=f"127.0.0.1:{backend}", tls_server="", maxconn=MAX_CONNS))
    client_cfg = tmp / "haproxy-client.cfg"
    client_cfg.write_text(HAPROXY.format(
        bind=f"127.0.0.3:{client_port}", tls_bind="",
        server=f"127.0.0.2:{server_port}",
        tls_server=f" ssl crt {pki.leaves['node-a']} ca-file {pki.bundle} verify required"
                   + ("" if reuse else " no-ssl-reuse"), maxconn=MAX_CONNS))
    procs = [subprocess.Popen(["haproxy", "-f", str(c), "-db"], stdout=subprocess.DEVNULL)
             for c in (server_cfg, client_cfg)]
    try:
        wait_port("127.0.0.2", server_port)
        wait_port("127.0.0.3", client_port)
        yield Variant("haproxy-mtls" if reuse else "haproxy-full", ("127.0.0.3", client_port),
                      [p.pid for p in procs])
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def measure(v: Variant, seconds: float, clients: int, bulk: int, pings: int) -> dict[str, Any]:
    host, port = v.addr
    out: dict[str, Any] = {"variant": v.name}
    op_connrate(host, port, 0.5, clients)  # warm-up (first tickets, caches)
    time.sleep(1.0)  # let TIME_WAIT of the warm-up settle: the rate loop needs ports
    c0 = _cpu(v.pids)
    rate = op_connrate(host, port, seconds, clients)
    c1 = _cpu(v.pids)
    out["conn_per_s"] = round(rate["rate"])
    out["conn_errors"] = rate["errors"]
    out["cpu_us_per_conn"] = round((c1 - c0) / max(rate["connections"], 1) * 1e6) \
        if v.pids else None
    for direction in ("up", "down"):
        c0 = _cpu(v.pids)
        r = op_bulk(host, port, bulk, direction)
        c1 = _cpu(v.pids)
        out[f"bulk_{direction}_MBps"] = round(bulk / r["seconds"] / 1e6)
        if v.pids:
            out[f"cpu_s_per_GB_{direction}"] = round((c1 - c0) / (bulk / 1e9), 2)
    pp = op_pingpong(host, port, 1, pings)
    out["p50_us"], out["p99_us"] = round(pp["p50_us"], 1), round(pp["p99_us"], 1)
    if v.server is not None:
        out["server_handshakes"] = v.server.handshakes()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--bulk-mb", type=int, default=512)
    ap.add_argument("--pings", type=int, default=5000)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mn-tunnel-bench-"))
    pki = make_pki(tmp / "pki", TD)
    pki.node("a")
    pki.node("b")
    port = free_port()
    backend = subprocess.Popen([sys.executable, "-m", "tests.bench.backend", str(port)],
                               cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert backend.stdout is not None and "listening" in backend.stdout.readline()
    makers = {
        "direct": lambda: contextlib.nullcontext(Variant("direct", ("127.0.0.1", port))),
        "plain": lambda: meshnode_plain(port),
        "mtls": lambda: meshnode_mtls(port, pki, True),
        "mtls-full": lambda: meshnode_mtls(port, pki, False),
        "haproxy-mtls": lambda: haproxy_mtls(port, pki, True, tmp),
        "haproxy-full": lambda: haproxy_mtls(port, pki, False, tmp),
    }
    rows = []
    try:
        for name, make in makers.items():
            if args.only and name not in args.only.split(","):
                continue
            with make() as v:
                row = measure(v, args.seconds, args.clients, args.bulk_mb * 1_000_000,
                              args.pings)
            print(json.dumps(row), flush=True)
            rows.append(row)
            time.sleep(2.0)  # TIME_WAIT from the last variant's rate loop
    finally:
        backend.kill()
    cols = ["variant", "conn_per_s", "cpu_us_per_conn", "bulk_up_MBps", "bulk_down_MBps",
            "cpu_s_per_GB_up", "p50_us", "p99_us", "conn_errors"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))


if __name__ == "__main__":
    main()
