"""A host under drill: its agent (tests/harness.py's Host), the `echo` service with two echo
backends enrolled as its instances, an optional etcd cluster inside the host's namespace, and
the load generator (load.py) enrolled as `client` and read continuously.

The load reports per time bucket on the shared monotonic clock; `Load.tally(start, end)` adds
up the buckets of one phase's window.
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.fabric import inside
from tests.etcd_cluster import EtcdCluster
from tests.harness import Host, wait_for

LOAD = Path(__file__).with_name("load.py")
ECHO = Path(__file__).with_name("echo.py")
SERVICE, SERVICE_PORT = "echo", 7000
CLOCK = time.monotonic


@dataclass(frozen=True)
class LoadPlan:
    threads: int = 4
    rate: float = 400.0  # short calls per second, all threads together
    streams: int = 4
    interval: float = 0.05  # seconds between a stream's messages
    timeout: float = 2.0  # seconds a call (or a stream's echo) may take
    bucket: float = 0.1  # seconds per report line

    def argv(self) -> list[str]:
        return ["--threads", str(self.threads), "--rate", str(self.rate), "--streams",
                str(self.streams), "--interval", str(self.interval), "--timeout",
                str(self.timeout), "--bucket", str(self.bucket)]


def kinds_text(kinds: dict[str, int]) -> str:
    """{"refused": 3, "reset": 1} as "refused 3, reset 1"."""
    return ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))


def _merge(into: dict[str, int], more: dict[str, int]) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


@dataclass
class Tally:
    """What the load saw in one window."""

    seconds: float
    ok: int = 0
    failed: int = 0
    held: int = 0  # failed calls under way when the fault took effect (see Load.tally)
    kinds: dict[str, int] = field(default_factory=dict)
    broken: int = 0
    broken_kinds: dict[str, int] = field(default_factory=dict)
    reopen_fail: int = 0  # failed attempts to reopen a broken stream
    first_fail: float | None = None
    last_fail: float | None = None
    stall: float = 0.0  # longest time without a successful call
    lat_max: float = 0.0
    msgs: int = 0

    @property
    def failed_new(self) -> int:
        """Failed calls that started at or after the fault (new connections)."""
        return self.failed - self.held

    @property
    def recover(self) -> float:
        """First failure to last failure (0 without any): how long clients saw the fault."""
        if self.first_fail is None or self.last_fail is None:
            return 0.0
        return self.last_fail - self.first_fail

    def add(self, b: dict[str, Any], held_before: float, faults: tuple[float, ...] = (),
            reach: float = 0.0) -> None:
        """`faults`: later faults of the window; a failed call that started at most `reach`
        (a call's timeout) before one of them was under way at it, so held too."""
        fails = sum(b["fail"].values())
        self.ok += b["ok"]
        self.failed += fails
        self.held += sum(1 for s in b["fs"]
                         if s < held_before or any(f - reach <= s < f for f in faults))
        _merge(self.kinds, b["fail"])
        self.broken += sum(b["broken"].values())
        _merge(self.broken_kinds, b["broken"])
        self.reopen_fail += b["reopen_fail"]
        if b["ff"] is not None:
            self.first_fail = b["ff"] if self.first_fail is None else min(self.first_fail, b["ff"])
            self.last_fail = b["lf"] if self.last_fail is None else max(self.last_fail, b["lf"])
        self.stall = max(self.stall, b["stall"])
        self.lat_max = max(self.lat_max, b["lat_max"])
        self.msgs += b["msgs"]


class LoadError(RuntimeError):
    """The load generator died or stopped answering."""


class Load:
    """The drill's handle on one load generator: its buckets, read by a thread as they come."""

    def __init__(self, host: Host, vip: str, port: int, plan: LoadPlan) -> None:
        self.plan = plan
        argv = [sys.executable, str(LOAD), "--host", vip, "--port", str(port), *plan.argv()]
        self.proc: subprocess.Popen[str] = host.popen(
            argv, service="client", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line or not json.loads(line).get("ready"):
            self.proc.kill()
            raise LoadError(f"the load generator did not start (exit {self.proc.poll()})")
        self.buckets: list[dict[str, Any]] = []
        self.acks: queue.Queue[str] = queue.Queue()
        self.done: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            rec = json.loads(line)
            if "t" in rec:
                self.buckets.append(rec)  # list.append is atomic: readers index a prefix
            elif "ack" in rec:
                self.acks.put(rec["ack"])
            elif rec.get("done"):
                self.done = rec

    def command(self, op: str, **args: Any) -> None:
        if self.proc.poll() is not None or self.proc.stdin is None:
            raise LoadError(f"the load generator exited ({self.proc.returncode})")
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            ack = self.acks.get(timeout=10)
        except queue.Empty as exc:
            raise LoadError(f"the load generator did not acknowledge {op}") from exc
        if ack != op:
            raise LoadError(f"the load generator acknowledged {ack}, not {op}")

    def recycle(self) -> None:
        self.command("recycle")

    def wait_past(self, t: float, timeout: float = 10.0) -> None:
        """Until a bucket ending after `t` arrived (the window's last one is in)."""
        wait_for("load report", lambda: self.buckets and self.buckets[-1]["t"] >= t, timeout)

    def tally(self, start: float, end: float, held_before: float | None = None,
              faults: tuple[float, ...] = ()) -> Tally:
        """The buckets of [start, end]. Failed calls that had started before `held_before`
        (default: start) were under way when the fault took effect: they are `held`; so are
        those under way at one of the later `faults` (a fault repeated within the window)."""
        self.wait_past(end)
        tally = Tally(seconds=end - start)
        for b in list(self.buckets):
            if start <= (b["t0"] + b["t"]) / 2 <= end:
                tally.add(b, start if held_before is None else held_before, faults,
                          self.plan.timeout)
        return tally

    def quiet(self, seconds: float) -> bool:
        """No failure of any kind for `seconds`, calls succeeding and every stream up."""
        now = CLOCK()
        recent = [b for b in list(self.buckets) if b["t"] >= now - seconds]
        if not recent or recent[0]["t0"] > now - seconds + 2 * self.plan.bucket:
            return False
        return (all(not b["fail"] and not b["broken"] and not b["reopen_fail"] for b in recent)
                and sum(b["ok"] for b in recent) > 0 and recent[-1]["up"] == self.plan.streams)

    def stop(self, timeout: float = 15.0) -> dict[str, Any] | None:
        with contextlib.suppress(LoadError):
            self.command("stop")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reader.join(5)
        return self.done


class Rig:
    """One host under drill. `close()` removes everything, whatever state it is in."""

    def __init__(self, tmp: Path, backend: str, plan: LoadPlan, workers: int,
                 drain_grace: float, etcd_members: int = 0,
                 agent_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.plan = plan
        self.drain_grace = drain_grace
        self.etcd_members = etcd_members
        self.etcd: EtcdCluster | None = None
        self.load: Load | None = None
        self.backends: dict[int, subprocess.Popen[Any]] = {}
        self.vip = ""
        # the harness says --drain-grace 2 before these; the agent's option parser keeps the
        # last one given
        self.host = Host(tmp, backend, workers=workers,
                         agent_args=(*agent_args, "--drain-grace", str(drain_grace)))

    # -- set-up ---------------------------------------------------------------------------
    def up(self) -> None:
        if self.etcd_members:
            with inside(self.host.netns):  # etcd on the host's own loopback
                self.etcd = EtcdCluster(self.tmp / "etcd", members=self.etcd_members)
                self.etcd.start()
            self.host.agent_args = (*self.host.agent_args, "--registry", self.etcd.url())
        self.host.start()
        self.vip = self.host.call("service.add", name=SERVICE,
                                  patch={"port": SERVICE_PORT})["vip"]
        for _ in range(2):
            self.start_backend()
        self.wait_backends()
        self.load = Load(self.host, self.vip, SERVICE_PORT, self.plan)

    def start_backend(self) -> int:
        """A new echo backend on a port of its own; its port. Below the ephemeral range: the
        load leaves thousands of connections there, whose local ports a bind could hit."""
        for _ in range(5):
            port = 20000 + secrets.randbelow(12000)
            if port in self.backends:
                continue
            p = self.host.popen([sys.executable, str(ECHO), str(port)], service=SERVICE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert p.stdout is not None
            if p.stdout.readline().strip() == "listening":
                self.backends[port] = p
                return port
            p.wait(5)
        raise RuntimeError("no echo backend would start (5 ports tried)")

    def wait_backends(self, timeout: float = 20.0) -> None:
        self.host.wait_endpoints(SERVICE, {f"127.0.0.1:{p}" for p in self.backends}, timeout)

    def kill_backend(self) -> tuple[int, subprocess.Popen[Any]]:
        port = min(self.backends)
        p = self.backends.pop(port)
        p.send_signal(signal.SIGKILL)
        return port, p

    def etcd_call(self, what: str, i: int = 0) -> None:
        """Stop or start etcd member i (inside the host's namespace, where it listens)."""
        assert self.etcd is not None
        with inside(self.host.netns):
            if what == "stop":
                self.etcd.stop_member(i)
            else:
                self.etcd.start_member(i)

    def workers(self) -> list[dict[str, Any]]:
        return [w for w in self.host.status()["workers"] if w.get("alive")]

    def agent_alive(self) -> bool:
        return self.host.agent is not None and self.host.agent.poll() is None

    def settle(self, timeout: float = 30.0) -> str:
        """Wait for a steady state before a fault: both backends registered, the load quiet
        for a second with every stream up. '' or what did not settle (the drill goes on)."""
        assert self.load is not None
        try:
            if self.agent_alive():
                self.wait_backends(timeout)
            wait_for("quiet load", lambda: self.load is not None and self.load.quiet(1.0),
                     timeout)
        except AssertionError as exc:
            return f"not settled before the fault: {exc}"
        return ""

    def log_tail(self, n: int = 15) -> str:
        return self.host.log_tail(n) if self.host.starts else ""

    def close(self) -> None:
        if self.load is not None:
            self.load.stop(timeout=5)
        try:
            self.host.close()
        finally:
            if self.etcd is not None:
                self.etcd.close()
