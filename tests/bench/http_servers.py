"""The servers of tests/bench/http.py other than meshnode: the two nginx backends and the two
reference proxies (HAProxy `mode http`, nginx `proxy_pass`), their configurations, and starting
and stopping them in the bench's namespace. One worker process/thread each.

Each backend is its own nginx (so each counts its own requests: stub_status on a third port)
answering `200 ok\\n` on an HTTP/1.1 port and on an h2c (prior knowledge) port. Keep-alive limits
are lifted everywhere: nginx closes a keep-alive connection after 1000 requests by default, which
would measure reconnections instead of requests.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.bench.procs import listens, stop_tree
from tests.harness import wait_for

Spawn = Callable[..., subprocess.Popen[Any]]  # (argv, log file name, **Popen kw)
LOOPBACK = "127.0.0.1"
H1_PORTS = (9001, 9002)  # backend i's HTTP/1.1 port
H2_PORTS = (9011, 9012)  # backend i's h2c port
STATUS_PORTS = (9021, 9022)  # backend i's stub_status
HAPROXY_H1, HAPROXY_H2 = 9201, 9202
NGINX_H1, NGINX_H2 = 9301, 9302
FOREVER = 1_000_000  # keepalive_requests: never close a keep-alive connection for its count

_NGINX_MAIN = """\
user root;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {maxconn}; }}
http {{
    access_log off;
    keepalive_requests {forever};
    keepalive_timeout 300s;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
{body}}}
"""
_BACKEND = """\
    server {{ listen {lo}:{h1}; location / {{ return 200 "ok\\n"; }} }}
    server {{ listen {lo}:{h2} http2; location / {{ return 200 "ok\\n"; }} }}
    server {{ listen {lo}:{status}; location / {{ stub_status; }} }}
"""
# HTTP/1.1 upstream only: nginx's proxy module cannot speak h2 to a server.
_PROXY = """\
    upstream backends {{
        server {lo}:{b1}; server {lo}:{b2};
        keepalive 32; keepalive_requests {forever}; keepalive_timeout 300s;
    }}
    server {{
        listen {lo}:{h1};
        location / {{ proxy_pass http://backends; proxy_http_version 1.1;
                      proxy_set_header Connection ""; }}
    }}
    server {{
        listen {lo}:{h2} http2;
        location / {{ proxy_pass http://backends; proxy_http_version 1.1;
                      proxy_set_header Connection ""; }}
    }}
"""
_HAPROXY = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s
frontend h1
    bind {lo}:{h1}
    default_backend h1
backend h1
    server b1 {lo}:{b1_h1}
    server b2 {lo}:{b2_h1}
frontend h2
    bind {lo}:{h2} proto h2
    default_backend h2
backend h2
    server b1 {lo}:{b1_h2} proto h2
    server b2 {lo}:{b2_h2} proto h2
"""


@dataclass(frozen=True)
class Proc:
    """A started server: what to measure (workers) and what only runs it (a master)."""

    workers: list[int]
    control: list[int]


def _nginx(spawn: Spawn, d: Path, body: str, maxconn: int, ports: tuple[int, ...]) -> \
        tuple[subprocess.Popen[Any], Proc]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(_NGINX_MAIN.format(
        dir=d, nofile=2 * maxconn + 100, maxconn=maxconn, forever=FOREVER, body=body))
    proc = spawn(["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"),
                  "-g", "daemon off;"], f"{d.name}.log")

    def started() -> list[int]:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: see {d}/error.log")
        kids = [c.pid for c in psutil.Process(proc.pid).children()]
        # the worker holds the listeners it inherited: listening in its namespace proves it up
        return kids if kids and all(listens(kids[0], p) for p in ports) else []

    workers = wait_for(f"nginx in {d} (log: {d}/error.log)", started, 15)
    return proc, Proc(workers, [proc.pid])


@contextlib.contextmanager
def backends(spawn: Spawn, dir: Path, maxconn: int) -> Iterator[list[Proc]]:
    """The two backends, each its own nginx with one worker."""
    started: list[subprocess.Popen[Any]] = []
    try:
        procs = []
        for i in range(2):
            body = _BACKEND.format(lo=LOOPBACK, h1=H1_PORTS[i], h2=H2_PORTS[i],
                                   status=STATUS_PORTS[i])
            p, info = _nginx(spawn, dir / f"backend{i + 1}", body, maxconn,
                             (H1_PORTS[i], H2_PORTS[i], STATUS_PORTS[i]))
            started.append(p)
            procs.append(info)
        yield procs
    finally:
        for p in started:
            stop_tree(p)


@contextlib.contextmanager
def nginx_proxy(spawn: Spawn, dir: Path, maxconn: int) -> Iterator[Proc]:
    """nginx proxy_pass to both backends over HTTP/1.1 with upstream keep-alive; HTTP/1.1 and
    h2c to the client."""
    body = _PROXY.format(lo=LOOPBACK, b1=H1_PORTS[0], b2=H1_PORTS[1], h1=NGINX_H1, h2=NGINX_H2,
                         forever=FOREVER)
    p, info = _nginx(spawn, dir / "nginx-proxy", body, maxconn, (NGINX_H1, NGINX_H2))
    try:
        yield info
    finally:
        stop_tree(p)


@contextlib.contextmanager
def haproxy(spawn: Spawn, dir: Path, maxconn: int) -> Iterator[Proc]:
    """HAProxy mode http, one thread, both servers, connections to them kept and shared;
    HTTP/1.1 on one frontend, h2 on both sides on the other."""
    cfg = dir / "haproxy-http.cfg"
    cfg.write_text(_HAPROXY.format(lo=LOOPBACK, maxconn=maxconn, h1=HAPROXY_H1, h2=HAPROXY_H2,
                                   b1_h1=H1_PORTS[0], b2_h1=H1_PORTS[1], b1_h2=H2_PORTS[0],
                                   b2_h2=H2_PORTS[1]))
    p = spawn(["haproxy", "-f", str(cfg), "-db"], "haproxy-http.log")
    try:
        def up() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"haproxy exited: see {dir}/haproxy-http.log")
            return listens(p.pid, HAPROXY_H1) and listens(p.pid, HAPROXY_H2)

        wait_for("haproxy http", up, 15)
        yield Proc([p.pid], [])
    finally:
        stop_tree(p)


def stub_requests(body: str) -> int:
    """The `requests` count of an nginx stub_status page."""
    m = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", body, re.M)
    if m is None:
        raise ValueError(f"unreadable stub_status: {body!r}")
    return int(m[1])
