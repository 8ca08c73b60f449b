"""The test harness shared by the integration and e2e tiers: a "host" is a network namespace
with its own agent instance (cgroup subtree, pin folder, state and run folders), and the
processes the tests run in it. Everything is torn down even when a test fails; an agent that
will not stop is killed and its ledger swept, so nothing outlives the test."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnode.agent.client import AgentClient
from meshnode.errors import MeshnodeError
from tests.integration import progs


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0,
              interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy (never a bare sleep as a barrier)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (MeshnodeError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Probe:
    """A long-lived process that connects where it is told (so enrollment can change under it)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"ready": True}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "probe died"
        result: dict[str, Any] = json.loads(line)
        return result

    def connect(self, host: str, port: int, **kw: Any) -> dict[str, Any]:
        return self.ask(op="connect", host=host, port=port, **kw)


class Host:
    def __init__(self, tmp: Path, backend: str, workers: int = 2,
                 restart_backoff: float = 0.2, netns: str | None = None,
                 agent_args: tuple[str, ...] = ()) -> None:
        self.tag = "t" + secrets.token_hex(3)
        self.own_netns = netns is None
        self.netns = netns or f"mn-{self.tag}"
        self.agent_args = agent_args
        self.node = next((agent_args[i + 1] for i, a in enumerate(agent_args[:-1])
                          if a == "--node"), self.tag)
        self.backend = backend
        self.workers = workers
        self.restart_backoff = restart_backoff
        self.python = sys.executable  # meshnode's interpreter: the agent, `run`, the CLI
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "MESHNODE_RUN_DIR": str(tmp / "run"),
                    "MESHNODE_STATE_DIR": str(tmp / "state"), "MESHNODE_LOG_DIR": str(tmp / "log"),
                    "PYTHONUNBUFFERED": "1"}
        self.agent: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[Any]] = []
        self.starts = 0
        self.client = AgentClient(tmp / "run" / self.tag / "agent.sock", timeout=30)
        if self.own_netns:
            from pyroute2 import NetNS, netns

            netns.create(self.netns)
            with NetNS(self.netns) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    # -- agent ------------------------------------------------------------------------------
    def agent_argv(self) -> list[str]:
        """How the agent is started (a subclass may run it otherwise, e.g. profiled)."""
        return [self.python, "-m", "meshnode.cli", "agent", "--instance", self.tag,
                "--netns", self.netns, "--capture", self.backend, "--workers", str(self.workers),
                "--restart-backoff", str(self.restart_backoff), "--drain-grace", "2",
                "--log-level", "debug", *self.agent_args]

    def start(self, timeout: float = 60.0, env: dict[str, str] | None = None) -> float:
        """Start the agent (again) and wait until it is ready. `env` adds to its environment,
        e.g. MESHNODE_BUILD_ID to make it look like a new code version (an upgrade)."""
        self.starts += 1
        log = open(self.tmp / f"agent-{self.starts}.log", "wb")  # noqa: SIM115
        t0 = time.monotonic()
        self.agent = subprocess.Popen(self.agent_argv(), env={**self.env, **(env or {})},
                                      stdout=log, stderr=subprocess.STDOUT)
        agent = self.agent

        def ready() -> bool:
            if agent.poll() is not None:
                raise AssertionError(f"agent exited {agent.returncode}:\n{self.log_tail()}")
            return bool(self.client.call("ping")["ready"])

        wait_for("agent ready", ready, timeout)
        return time.monotonic() - t0

    def log_tail(self, n: int = 30) -> str:
        path = self.tmp / f"agent-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: a restart's stop. The data plane (workers, capture) keeps serving."""
        assert self.agent is not None
        self.agent.send_signal(signal.SIGTERM)
        code = self.agent.wait(timeout)
        self.agent = None
        return code

    def uninstall(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`meshnode uninstall`: fail open, stop the workers, remove every kernel object (through
        the running agent, which then exits; or offline when none runs)."""
        done = self.cli("uninstall", timeout=timeout)
        if self.agent is not None:
            self.agent.wait(timeout)
            self.agent = None
        return done

    def kill(self) -> None:
        assert self.agent is not None
        self.agent.kill()
        self.agent.wait(10)
        self.agent = None

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("status")
        return result

    def service(self, name: str) -> dict[str, Any]:
        return {s["name"]: s for s in self.status()["services"]}[name]

    def call(self, op: str, **args: Any) -> Any:
        return self.client.call(op, **args)

    # -- processes in this host -----------------------------------------------------------
    def popen(self, argv: list[str], service: str | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        if service is not None:
            argv = [self.python, "-m", "meshnode.cli", "run", "--instance", self.tag,
                    "--service", service, "--", *argv]
        p: subprocess.Popen[Any] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", *argv], env=self.env, **kw)
        self.procs.append(p)
        return p

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`meshnode ARGS --instance TAG`, run inside this host as a user would."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", self.python,
                               "-m", "meshnode.cli", *args, "--instance", self.tag],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def http_get(self, path: str, port: int = 15090) -> tuple[int, str]:
        """GET http://127.0.0.1:PORT/PATH inside this host: (status, body)."""
        script = ("import sys, urllib.request, urllib.error\n"
                  "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
                  "except urllib.error.HTTPError as e:\n r = e\n"
                  "sys.stdout.write(str(r.status) + '\\n' + r.read().decode())\n")
        out = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", sys.executable, "-c",
                              script, f"http://127.0.0.1:{port}{path}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def server(self, name: str, port: int, service: str | None = None,
               host: str = "127.0.0.1") -> subprocess.Popen[Any]:
        p = self.popen([sys.executable, "-c", progs.NAME_SERVER, name, str(port), host],
                       service, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        return p

    def bulk_server(self, port: int, service: str | None = None) -> subprocess.Popen[Any]:
        p = self.popen([sys.executable, "-c", progs.BULK_SERVER, str(port)], service,
                       stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        return p

    def probe(self, service: str | None = None) -> Probe:
        p = self.popen([sys.executable, "-c", progs.PROBE], service, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
        return Probe(p)

    def wait_endpoints(self, service: str, addrs: set[str], timeout: float = 20.0) -> None:
        wait_for(f"endpoints {sorted(addrs)} of {service}",
                 lambda: addrs == {e["addr"] for e in self.service(service)["endpoints"]},
                 timeout)

    def cgroup_root(self) -> Path:
        from meshnode.host.cgroup import cgroup2_mount

        return cgroup2_mount() / f"meshnode-{self.tag}.slice"

    # -- teardown -------------------------------------------------------------------------
    def sweep(self) -> list[str]:
        """What a crashed agent left, removed the way a new agent would."""
        from meshnode.capture import undo_functions
        from meshnode.host import cgroup
        from meshnode.host.ledger import Ledger

        ledger = Ledger(self.tmp / "state" / self.tag / "ledger.json")
        return ledger.undo_all({**undo_functions(), **cgroup.UNDO})

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        # an explicit removal: a stopped agent leaves its data plane serving (a restart)
        try:
            self.uninstall(timeout=60)
        except subprocess.TimeoutExpired:
            if self.agent is not None:
                self.kill()
        # whatever a failed removal left: the workers, then what the ledger lists
        for procs in self.cgroup_root().glob("**/cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        self.sweep()
        if self.own_netns:
            from pyroute2 import netns

            with contextlib.suppress(OSError):
                netns.remove(self.netns)


def free_port() -> int:
    """A port for a server inside a test namespace (each namespace has its own port space,
    so a random high port is enough)."""
    return 20000 + secrets.randbelow(20000)


def kernel_leftovers(h: Host) -> list[str]:
    """Everything of this host's agent still in the kernel."""
    found = []
    cg = h.cgroup_root()
    if cg.exists():
        found.append(f"cgroup {cg}")
    pins = Path("/sys/fs/bpf/meshnode") / h.tag
    if pins.exists():
        found.append(f"pin dir {pins}: {sorted(os.listdir(pins))}")
    tree = subprocess.run(["bpftool", "cgroup", "tree"], capture_output=True, text=True).stdout
    found += [f"bpf attachment: {line}" for line in tree.splitlines() if h.tag in line]
    for tool in ("iptables-save", "iptables-legacy-save"):
        with contextlib.suppress(FileNotFoundError):
            out = subprocess.run([tool], capture_output=True, text=True).stdout
            found += [f"{tool}: {line}" for line in out.splitlines()
                      if h.tag.upper() in line.upper()]
    return found
