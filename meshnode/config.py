"""Typed, validated configuration (frozen dataclasses).

`AgentConfig` derives every per-instance path from the instance name, so several agents can run
side by side (tests run hosts as network namespaces). `WorkerConfig` is what the agent hands a
proxy worker on its command line.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from meshnode import constants as C
from meshnode.errors import ConfigError, UsageError

_INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def instance_name(name: str) -> str:
    if not _INSTANCE_RE.match(name):
        raise UsageError(f"invalid instance name {name!r}",
                         "use up to 32 lowercase letters, digits, '-' or '_'")
    return name


def run_dir(instance: str) -> Path:
    base = Path(os.environ.get("MESHNODE_RUN_DIR", C.RUN_DIR))
    return base if instance == C.DEFAULT_INSTANCE else base / instance


def control_socket_path(instance: str) -> Path:
    return run_dir(instance) / "agent.sock"


@dataclass(frozen=True)
class WorkerConfig:
    """One proxy worker's settings; travels as argv (`to_argv` / `from_argv`)."""

    worker_id: int = 0
    listen_host: str = C.PROXY_ADDR
    listen_port: int = C.OUTBOUND_PORT
    mark: int = C.PROXY_MARK
    connect_timeout: float = C.CONNECT_TIMEOUT
    idle_timeout: float = C.IDLE_TIMEOUT
    drain_grace: float = C.DRAIN_GRACE
    control_fd: int = -1  # -1: no agent channel (standalone explicit proxy, benchmarks)
    # Explicit (non-transparent) listener: "IPv4:PORT" taken as the original destination of
    # every accepted connection instead of asking the kernel (tests, benchmarks, a plain proxy).
    explicit_target: str | None = None

    def to_argv(self) -> list[str]:
        argv = [
            f"--worker-id={self.worker_id}", f"--listen-host={self.listen_host}",
            f"--listen-port={self.listen_port}", f"--mark={self.mark}",
            f"--connect-timeout={self.connect_timeout}", f"--idle-timeout={self.idle_timeout}",
            f"--drain-grace={self.drain_grace}", f"--control-fd={self.control_fd}",
        ]
        if self.explicit_target is not None:
            argv.append(f"--explicit-target={self.explicit_target}")
        return argv

    @classmethod
    def from_argv(cls, argv: list[str]) -> WorkerConfig:
        p = argparse.ArgumentParser(prog="meshnode-proxy")
        p.add_argument("--worker-id", type=int, default=0)
        p.add_argument("--listen-host", default=C.PROXY_ADDR)
        p.add_argument("--listen-port", type=int, default=C.OUTBOUND_PORT)
        p.add_argument("--mark", type=int, default=C.PROXY_MARK)
        p.add_argument("--connect-timeout", type=float, default=C.CONNECT_TIMEOUT)
        p.add_argument("--idle-timeout", type=float, default=C.IDLE_TIMEOUT)
        p.add_argument("--drain-grace", type=float, default=C.DRAIN_GRACE)
        p.add_argument("--control-fd", type=int, required=True)
        p.add_argument("--explicit-target", default=None, metavar="IPv4:PORT")
        a = p.parse_args(argv)
        return cls(a.worker_id, a.listen_host, a.listen_port, a.mark, a.connect_timeout,
                   a.idle_timeout, a.drain_grace, a.control_fd, a.explicit_target)


@dataclass(frozen=True)
class AgentConfig:
    instance: str = C.DEFAULT_INSTANCE
    capture: str = "auto"  # ebpf | iptables | auto
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    netns: str | None = None  # run inside this named network namespace (/run/netns/NAME)
    host_address: str = "127.0.0.1"  # endpoints of wildcard listeners are registered here
    outbound_port: int = C.OUTBOUND_PORT
    proxy_mark: int = C.PROXY_MARK
    connect_timeout: float = C.CONNECT_TIMEOUT
    idle_timeout: float = C.IDLE_TIMEOUT
    drain_grace: float = C.DRAIN_GRACE
    restart_backoff: float = C.WORKER_RESTART_BACKOFF
    scan_interval: float = 0.5  # how often enrolled processes' listening ports are read
    state_dir: Path | None = None
    pin_dir: Path | None = None

    def __post_init__(self) -> None:
        instance_name(self.instance)
        if self.capture not in ("ebpf", "iptables", "auto"):
            raise ConfigError(f"unknown capture mode {self.capture!r}",
                              "use --capture ebpf, iptables or auto")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be 1..64, not {self.workers}", "use --workers N")
        if not 0 < self.outbound_port < 65536:
            raise ConfigError(f"invalid outbound port {self.outbound_port}", "use 1..65535")

    @property
    def suffix(self) -> str:
        return "" if self.instance == C.DEFAULT_INSTANCE else f"-{self.instance}"

    @property
    def run_dir(self) -> Path:
        return run_dir(self.instance)

    @property
    def control_socket(self) -> Path:
        return control_socket_path(self.instance)

    @property
    def state_path(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        base = Path(os.environ.get("MESHNODE_STATE_DIR", C.STATE_DIR))
        return base if self.instance == C.DEFAULT_INSTANCE else base / self.instance

    @property
    def pin_path(self) -> Path:
        return self.pin_dir if self.pin_dir is not None else Path(C.PIN_ROOT) / self.instance

    @property
    def cgroup_name(self) -> str:
        return f"meshnode{self.suffix}.slice"

    def worker(self, worker_id: int, control_fd: int) -> WorkerConfig:
        return WorkerConfig(worker_id, C.PROXY_ADDR, self.outbound_port, self.proxy_mark,
                            self.connect_timeout, self.idle_timeout, self.drain_grace, control_fd)
