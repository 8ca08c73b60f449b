"""The middles being compared. Each is a context manager yielding a `Variant`: the load generator
to drive, the address to hit, and the processes to measure. Everything runs in test network
namespaces holding only `lo` (never the host's own), with the same backend program in each:
  plain namespace   direct · meshnode explicit (standalone workers) · HAProxy tcp · nginx
  one host each     meshnode with eBPF capture · with iptables capture (a real agent,
                    tests/harness.Host, the load generator enrolled in service `client`)
Every proxy gets one worker process/thread; `meshnode_explicit(workers=k)` is for scaling.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import psutil

from meshnode.model import Endpoint, HostPort, Reset, ServiceSpec
from meshnode.wire import encode, update_message
from tests.bench.client import Client, ClientError
from tests.bench.procs import listens, stop_tree
from tests.harness import Host, wait_for

LOOPBACK = "127.0.0.1"
BACKEND_PORT = 9000
EXPLICIT_PORT = 9100  # + workers, so each scaling step has its own listener
HAPROXY_PORT = 9200
NGINX_STREAM_PORT = 9300
NGINX_HTTP_PORT = 9301
# Ephemeral ports for the connection-rate loops: the default 28k range, reused after 1 s in
# TIME_WAIT (tcp_tw_reuse on loopback), would cap the rate of the load generator, not the proxy.
PORT_RANGE = "16384 65535"
# Connections each proxy accepts: two descriptors each must fit the hard RLIMIT_NOFILE, which
# root cannot raise without CAP_SYS_RESOURCE (HAProxy refuses to start when it cannot).
MAX_CONNS = min(20000, resource.getrlimit(resource.RLIMIT_NOFILE)[1] // 2 - 200)
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@dataclass
class Variant:
    name: str
    client: Client
    tcp: tuple[str, int] | None  # None: HTTP only (nginx http)
    url: str
    proxy_pids: list[int] = field(default_factory=list)  # data path: CPU, memory per connection
    control_pids: list[int] = field(default_factory=list)  # agent, nginx master: RSS only
    backend_pid: int = 0

    @property
    def rss_pids(self) -> list[int]:
        return [*self.proxy_pids, *self.control_pids]

    @property
    def pin_pids(self) -> list[int]:
        return [self.backend_pid, *self.proxy_pids, *self.control_pids]


def spawn(h: Host, logs: Path, argv: list[str], log: str, service: str | None = None,
          **kw: Any) -> subprocess.Popen[Any]:
    """A process in `h`'s namespace, its stderr to a log file. A session of its own: Ctrl-C
    reaches the suite only, which then stops everything in order."""
    with open(logs / log, "ab") as err:
        return h.popen(argv, service, stderr=err, start_new_session=True, **kw)


@dataclass
class Namespace:
    """A network namespace with the backend and a load generator running in it."""

    host: Host
    client: Client
    backend_pid: int
    dir: Path

    def spawn(self, argv: list[str], log: str, **kw: Any) -> subprocess.Popen[Any]:
        return spawn(self.host, self.dir, argv, log, **kw)


def _tune(h: Host) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", "sysctl", "-qw",
                    f"net.ipv4.ip_local_port_range={PORT_RANGE}"], check=True)


def _namespace(h: Host, tmp: Path, service: str | None, name: str) -> Namespace:
    """The backend and the load generator in `h` (the load generator enrolled in `service`)."""
    _tune(h)
    backend = spawn(h, tmp, [sys.executable, "-m", "tests.bench.backend", str(BACKEND_PORT)],
                    "backend.log", stdout=subprocess.PIPE, text=True)
    assert backend.stdout is not None
    if backend.stdout.readline().strip() != "listening":
        raise RuntimeError(f"backend in {name} did not start: see {tmp}/backend.log")
    proc = spawn(h, tmp, [sys.executable, "-m", "tests.bench.client"], "client.log", service,
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return Namespace(h, Client(proc, name), backend.pid, tmp)


def wait_ready(client: Client, host: str, port: int, pids: Sequence[int] = (),
               timeout: float = 20.0) -> None:
    """Until a 1-byte exchange through the middle works and each of `pids` listens."""
    def ready() -> bool:
        try:
            client.ask("check", host=host, port=port, timeout=10)
        except ClientError:
            return False
        return all(listens(pid, port) for pid in pids)

    wait_for(f"{host}:{port} to answer", ready, timeout)


@contextlib.contextmanager
def plain_namespace(tmp: Path) -> Iterator[Namespace]:
    tmp.mkdir(parents=True, exist_ok=True)
    h = Host(tmp, "ebpf")  # never started: a namespace with only lo, and no agent
    try:
        yield _namespace(h, tmp, None, "plain namespace")
    finally:
        h.close()


@contextlib.contextmanager
def direct(ns: Namespace) -> Iterator[Variant]:
    yield Variant("direct", ns.client, (LOOPBACK, BACKEND_PORT),
                  f"http://{LOOPBACK}:{BACKEND_PORT}/", backend_pid=ns.backend_pid)


# The explicit proxy routes to a service like the captured ones: its fixed "original
# destination" is that service's VIP, so each connection takes the same path (service rule,
# balancer, per-pair counters) and the difference to mn-ebpf is the capture alone.
EXPLICIT_VIP = IPv4Address("127.240.0.1")


def _backend_service() -> bytes:
    """The control message a worker's agent would send for the backend service."""
    spec = ServiceSpec.build("backend", 1, EXPLICIT_VIP, BACKEND_PORT)
    ep = Endpoint(HostPort(IPv4Address(LOOPBACK), BACKEND_PORT))
    return encode(update_message(Reset(spec, (ep,))))


@contextlib.contextmanager
def meshnode_explicit(ns: Namespace, workers: int = 1) -> Iterator[Variant]:
    """Standalone workers, each told of the backend service over its control channel, as the
    agent does; the channel stays open for the variant's life (a worker drains when it
    closes)."""
    port = EXPLICIT_PORT + workers
    channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(workers)]
    procs = []
    try:
        for i, (ours, theirs) in enumerate(channels):
            procs.append(ns.spawn(
                [sys.executable, "-m", "meshnode.proxy.worker", f"--worker-id={i}",
                 f"--listen-port={port}", "--mark=0", f"--control-fd={theirs.fileno()}",
                 f"--explicit-target={EXPLICIT_VIP}:{BACKEND_PORT}", "--access-log=",
                 "--drain-grace=1"], f"explicit-w{workers}.log", pass_fds=(theirs.fileno(),)))
            theirs.close()
            ours.sendall(_backend_service())
        pids = [p.pid for p in procs]
        wait_ready(ns.client, LOOPBACK, port, pids)
        name = "mn-explicit" if workers == 1 else f"mn-explicit-w{workers}"
        yield Variant(name, ns.client, (LOOPBACK, port), f"http://{LOOPBACK}:{port}/", pids,
                      backend_pid=ns.backend_pid)
    finally:
        for p in procs:
            stop_tree(p)
        for ours, theirs in channels:
            ours.close()
            theirs.close()


HAPROXY_CFG = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench
    bind {loopback}:{port}
    default_backend backend
backend backend
    server b1 {loopback}:{backend}
"""


@contextlib.contextmanager
def haproxy(ns: Namespace) -> Iterator[Variant]:
    cfg = ns.dir / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(loopback=LOOPBACK, port=HAPROXY_PORT,
                                      backend=BACKEND_PORT, maxconn=MAX_CONNS))
    proc = ns.spawn(["haproxy", "-f", str(cfg), "-db"], "haproxy.log")
    try:
        wait_ready(ns.client, LOOPBACK, HAPROXY_PORT, [proc.pid])
        yield Variant("haproxy-tcp", ns.client, (LOOPBACK, HAPROXY_PORT),
                      f"http://{LOOPBACK}:{HAPROXY_PORT}/", [proc.pid],
                      backend_pid=ns.backend_pid)
    finally:
        stop_tree(proc)


NGINX_MAIN = """\
{load}
user root;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {maxconn}; }}
"""
NGINX_STREAM = """\
stream {{
    server {{
        listen {loopback}:{port};
        proxy_pass {loopback}:{backend};
        proxy_half_close on;  # off by default: a client's shutdown(SHUT_WR) would end it all
    }}
}}
"""
# Keep-alive to the upstream too, as anyone running nginx in front of a service would.
NGINX_HTTP = """\
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream backend {{ server {loopback}:{backend}; keepalive 64; }}
    server {{
        listen {loopback}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(ns: Namespace, mode: str) -> Iterator[Variant]:
    port = NGINX_STREAM_PORT if mode == "stream" else NGINX_HTTP_PORT
    d = ns.dir / f"nginx-{mode}"
    d.mkdir(exist_ok=True)
    fill = {"dir": d, "loopback": LOOPBACK, "port": port, "backend": BACKEND_PORT,
            "maxconn": MAX_CONNS, "nofile": 2 * MAX_CONNS + 100,
            "load": f"load_module {NGINX_STREAM_MODULE};" if mode == "stream" else ""}
    (d / "nginx.conf").write_text(NGINX_MAIN.format(**fill) + (
        NGINX_STREAM if mode == "stream" else NGINX_HTTP).format(**fill))
    proc = ns.spawn(["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c",
                     str(d / "nginx.conf"), "-g", "daemon off;"], f"nginx-{mode}.log")
    try:
        def started() -> list[psutil.Process]:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx {mode} exited: see {d}/error.log")
            return psutil.Process(proc.pid).children()

        workers = wait_for(f"nginx {mode} workers (log: {d}/error.log)", started, 10)
        if mode == "stream":
            wait_ready(ns.client, LOOPBACK, port, [proc.pid])
        yield Variant(f"nginx-{mode}", ns.client, (LOOPBACK, port) if mode == "stream" else None,
                      f"http://{LOOPBACK}:{port}/", [w.pid for w in workers], [proc.pid],
                      backend_pid=ns.backend_pid)
    finally:
        stop_tree(proc)


@contextlib.contextmanager
def meshnode_captured(tmp: Path, capture: str) -> Iterator[Variant]:
    """A real agent (one worker, no access log) in its own namespace; the load generator is
    enrolled and calls the backend's service VIP, as an application would."""
    tmp.mkdir(parents=True, exist_ok=True)
    h = Host(tmp, capture, workers=1, agent_args=("--access-log", "off"))
    try:
        _tune(h)
        h.start()
        ns = _namespace(h, tmp, "client", f"meshnode-{capture}")
        svc = h.call("service.add", name="backend", endpoints=[f"{LOOPBACK}:{BACKEND_PORT}"],
                     patch={"port": BACKEND_PORT})
        vip = svc["vip"]
        # the VIP is bound by nothing: an answer proves the connection was captured
        wait_ready(ns.client, vip, BACKEND_PORT)
        status = h.status()
        yield Variant(f"mn-{capture}", ns.client, (vip, BACKEND_PORT),
                      f"http://{vip}:{BACKEND_PORT}/", [w["pid"] for w in status["workers"]],
                      [int(status["pid"])], backend_pid=ns.backend_pid)
    finally:
        h.close()
