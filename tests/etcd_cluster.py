"""Real etcd for tests: clusters of 1 or 3 members, and a TCP gate to partition one client.

`EtcdCluster(tmp_path, members=3, host="127.0.0.1")` runs Debian's etcd (3.4) with every member
on `host` at free random ports, data and logs under tmp_path. Any host address works (the
multi-host tests use a bridge address in 198.19.0.0/16). Members can be stopped and started
again (same ports, same data); close() kills whatever still runs, and is safe to call twice,
so a failing test leaves no process behind. Needs no root.

`TcpGate` forwards one port to an etcd member; `cut()` drops its connections and refuses new
ones, which cuts one agent off from a cluster that others still reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def etcd_available() -> bool:
    return os.access(ETCD, os.X_OK) and os.access(ETCDCTL, os.X_OK)


_handed_out: set[tuple[str, int]] = set()


def free_port(host: str) -> int:
    """A port nothing listens on right now (the kernel's choice, so it is random), and never
    one handed out before in this process: the kernel may choose a just-released port again,
    and two members given the same one fail to start ("address already in use")."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, port) not in _handed_out:
            _handed_out.add((host, port))
            return port


class Member:
    def __init__(self, name: str, host: str, root: Path) -> None:
        self.name = name
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.data_dir = root / name
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    def __init__(self, tmp_path: Path, members: int = 1, host: str = "127.0.0.1", *,
                 heartbeat_ms: int = 50, election_ms: int = 500) -> None:
        if members not in (1, 3, 5):
            raise ValueError("an etcd cluster has 1, 3 or 5 members here")
        self.root = tmp_path
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = host
        # short raft timers: a leader election takes well under a second on loopback
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        self.members = [Member(f"m{i}", host, tmp_path) for i in range(members)]

    # -- addresses ------------------------------------------------------------------------
    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(m.host, m.client_port) for m in self.members]

    def url(self, prefix: str = "") -> str:
        """The --registry URL of the whole cluster."""
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints) + prefix

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        for i in range(len(self.members)):
            self._spawn(i)
        self.wait_healthy(timeout=timeout)

    def start_member(self, i: int, timeout: float = 30.0) -> None:
        self._spawn(i)
        self.wait_healthy(i, timeout=timeout)

    def stop_member(self, i: int, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (a clean stop: a leader hands over first) or, with kill, SIGKILL."""
        m = self.members[i]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                m.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(timeout)
        m.proc = None

    def close(self) -> None:
        for i in range(len(self.members)):
            with contextlib.suppress(Exception):
                self.stop_member(i, kill=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _spawn(self, i: int) -> None:
        m = self.members[i]
        if m.running():
            raise RuntimeError(f"etcd member {m.name} is already running")
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"meshnode-test-{id(self)}",
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_ms),
                "--logger", "zap", "--log-outputs", "stderr"]
        with open(m.log_path, "ab") as log:
            # own session: a killed test runner's terminal signals do not reach etcd, and
            # close() still ends it
            m.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    # -- state ----------------------------------------------------------------------------
    def healthy(self, i: int) -> bool:
        """The member answers and sees a leader (etcd's /health)."""
        m = self.members[i]
        if not m.running():
            return False
        try:
            with urllib.request.urlopen(f"{m.client_url}/health", timeout=1) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, i: int | None = None, timeout: float = 30.0) -> None:
        which = range(len(self.members)) if i is None else [i]
        deadline = time.monotonic() + timeout
        while not all(self.healthy(j) for j in which):
            for j in which:
                m = self.members[j]
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited with {m.proc.returncode}; "
                                       f"log:\n{self.log_tail(j)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy within {timeout} s; log:\n"
                                   + "\n".join(self.log_tail(j) for j in which))
            time.sleep(0.05)  # polling a readiness probe with a deadline

    def log_tail(self, i: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.members[i].log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against the running members; its stdout."""
        eps = ",".join(m.client_url for m in self.members if m.running())
        out = subprocess.run([ETCDCTL, "--endpoints", eps, *args], capture_output=True,
                             text=True, timeout=20, env={**os.environ, "ETCDCTL_API": "3"},
                             check=True)
        return out.stdout


class TcpGate:
    """A TCP forwarder to one etcd member that a test can cut and mend."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = free_port(host)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    async def mend(self) -> None:
        """(Re)open: new connections go through."""
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        await self.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}
