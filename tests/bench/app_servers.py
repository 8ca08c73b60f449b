"""The real servers of tests/bench/kernel.py, started in the bench's namespace on loopback and
stopped on success, failure or Ctrl-C: Redis (no persistence), PostgreSQL (a throw-away cluster,
trust authentication, TCP only, pgbench's tables at scale 1) and an nginx answering h2c (the
backend of tests/bench/http_servers.py). One process/worker each where the server allows it.
PostgreSQL refuses to run as root: its cluster lives in a folder of its own owned by the
`postgres` user (Debian's package makes it), removed afterwards.
"""

from __future__ import annotations

import contextlib
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench import http_servers as servers
from tests.bench.procs import listens, stop_tree
from tests.harness import Host, wait_for

LOOPBACK = servers.LOOPBACK
# Every server listens on a second address too: an endpoint belongs to one Service only, and
# the kernel path's Service and the proxy path's each need one (the same server behind both).
ALIAS = "127.0.0.2"
REDIS_PORT = 6379
PG_PORT = 5432
H2C_PORT = servers.H2_PORTS[0]  # nginx's h2c (prior knowledge) port
PG_BIN = Path("/usr/lib/postgresql")  # Debian: /usr/lib/postgresql/<major>/bin


def missing() -> list[str]:
    """The servers and clients this machine lacks, as Debian package names."""
    need = [pkg for tool, pkg in (("redis-server", "redis-server"),
                                  ("redis-benchmark", "redis-tools"), ("pgbench", "postgresql"),
                                  ("nginx", "nginx"), ("h2load", "nghttp2-client"))
            if shutil.which(tool) is None]
    if pg_bin() is None and "postgresql" not in need:
        need.append("postgresql")
    return need


def pg_bin() -> Path | None:
    """The newest PostgreSQL server's bin folder, or None."""
    found = sorted(PG_BIN.glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def _wait_listening(proc: subprocess.Popen[Any], port: int, what: str, log: Path) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: see {log}")
        return listens(proc.pid, port)

    wait_for(f"{what} to listen on {port}", up, 30)


@contextlib.contextmanager
def redis(run: servers.Spawn, d: Path) -> Iterator[int]:
    """redis-server: one main thread, nothing saved; yields its pid."""
    p = run(["redis-server", "--bind", LOOPBACK, ALIAS, "--port", str(REDIS_PORT), "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
             "--logfile", str(d / "redis-server.log")], "redis.log")
    try:
        _wait_listening(p, REDIS_PORT, "redis-server", d / "redis.log")
        yield p.pid
    finally:
        stop_tree(p)


def _as_postgres(argv: list[str]) -> list[str]:
    # setpriv execs (runuser would fork): the pid we hold is the postmaster's own
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]


@contextlib.contextmanager
def postgres(run: servers.Spawn, d: Path, h: Host) -> Iterator[int]:
    """A throw-away cluster with pgbench's tables (scale 1: 100 000 accounts); yields the
    postmaster's pid."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server (apt install postgresql)")
    user = pwd.getpwnam("postgres")
    top = Path(tempfile.mkdtemp(prefix="meshnode-bench-pg-"))  # /tmp: postgres can reach it
    data = top / "data"
    p: subprocess.Popen[Any] | None = None
    try:
        shutil.chown(top, user.pw_uid, user.pw_gid)
        subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust",
                                     "-U", "postgres", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120, cwd=top)
        # TCP on loopback only (no Unix socket to place), nothing forced to disk
        p = run(_as_postgres([str(bin_dir / "postgres"), "-D", str(data),
                              "-c", f"listen_addresses={LOOPBACK},{ALIAS}", "-c", f"port={PG_PORT}",
                              "-c", "unix_socket_directories=", "-c", "max_connections=64",
                              "-c", "fsync=off", "-c", "synchronous_commit=off",
                              "-c", "full_page_writes=off", "-c", "shared_buffers=64MB"]),
                "postgres.log", cwd=top)
        _wait_listening(p, PG_PORT, "postgres", d / "postgres.log")
        subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", "pgbench", "-i", "-q",
                        "-s", "1", "-h", LOOPBACK, "-p", str(PG_PORT), "-U", "postgres",
                        "postgres"], check=True, capture_output=True, timeout=120)
        yield p.pid
    finally:
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)  # a fast shutdown: SIGTERM waits for sessions
            stop_tree(p)
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def h2c(run: servers.Spawn, d: Path, maxconn: int) -> Iterator[servers.Proc]:
    """nginx, one worker, `200 ok` on an HTTP/1.1, an h2c (on both addresses) and a
    stub_status port."""
    body = servers._BACKEND.format(lo=LOOPBACK, h1=servers.H1_PORTS[0], h2=H2C_PORT,
                                   status=servers.STATUS_PORTS[0])
    body += (f'    server {{ listen {ALIAS}:{H2C_PORT} http2; '
             f'location / {{ return 200 "ok\\n"; }} }}\n')
    p, info = servers._nginx(run, d / "h2c", body, maxconn,
                             (servers.H1_PORTS[0], H2C_PORT, servers.STATUS_PORTS[0]))
    try:
        yield info
    finally:
        stop_tree(p)
