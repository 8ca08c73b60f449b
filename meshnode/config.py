"""Typed, validated configuration (frozen dataclasses).

`AgentConfig` derives every per-instance path from the instance name, so several agents can run
side by side (tests run hosts as network namespaces). `WorkerConfig` is what the agent hands a
proxy worker on its command line.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

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


def log_dir(instance: str) -> Path:
    base = Path(os.environ.get("MESHNODE_LOG_DIR", C.LOG_DIR))
    return base if instance == C.DEFAULT_INSTANCE else base / instance


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
    control_fd: int = -1  # an inherited channel to the agent (tests); -1: none
    # The agent's worker socket: connected at start and again whenever the channel closes, so
    # a worker outlives its agent and a restarted one finds it. "": no agent (standalone
    # explicit proxy, benchmarks), and a closed channel means drain and exit.
    agent_socket: str = ""
    # The listening socket, inherited from the agent (every worker accepts from the one
    # socket, so a worker's exit loses nothing queued); -1: bind one (the first worker).
    listen_fd: int = -1
    # Descriptors held for the agent, so they outlive it: "name=fd,..." (its DNS sockets).
    held_fds: tuple[str, ...] = ()
    build: str = ""  # the starting agent's code build, reported back in Hello
    node: str = ""  # this host's node name and zone: locality-aware balancing prefers them
    zone: str = ""
    # Explicit (non-transparent) listener: "IPv4:PORT" taken as the original destination of
    # every accepted connection instead of asking the kernel (tests, benchmarks, a plain proxy).
    explicit_target: str | None = None
    access_log: str = ""  # a path, "-" for stdout, "" for none
    access_log_sample: float = 1.0
    # The inbound mTLS listener (host address:15008), inherited from the agent like the
    # outbound one; -1: none (this host serves no mTLS).
    inbound_fd: int = -1
    handshake_timeout: float = C.HANDSHAKE_TIMEOUT  # a TLS peer that stalls longer is cut

    def to_argv(self) -> list[str]:
        return _to_argv(self)

    @classmethod
    def from_argv(cls, argv: list[str]) -> WorkerConfig:
        return cls(**_from_argv(cls, "meshnode-proxy", argv))


# Configs that travel as argv (a worker's, and the agent's from the CLI to its lean entry
# point): the parser is derived from the fields, so a new setting cannot be half-wired.
# Tuples travel comma-joined; None stays the default.
def _to_argv(config: object) -> list[str]:
    out = []
    for f in fields(config):  # type: ignore[arg-type]
        v = getattr(config, f.name)
        if v is not None:
            out.append(f"--{f.name.replace('_', '-')}="
                       + (",".join(map(str, v)) if isinstance(v, tuple) else str(v)))
    return out


def _from_argv(cls: type, prog: str, argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog=prog)
    hints = get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        kind: Callable[[str], object] = {int: int, float: float}.get(hint, str)
        if hint in (Path, Path | None):
            kind = Path
        elif getattr(hint, "__origin__", None) is tuple:
            kind = _comma_tuple
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[operator]
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default)
    return vars(p.parse_args(argv))


def _comma_tuple(raw: str) -> tuple[str, ...]:
    return tuple(x for x in raw.split(",") if x)


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
    registry: str = "embedded"  # embedded | etcd://HOST:PORT[,HOST:PORT...]
    registry_ttl: int = 10  # etcd lease: a dead agent's endpoints vanish within this
    node: str | None = None  # this host's name in the mesh (default: hostname[-instance])
    zone: str = ""
    dns_port: int = C.DNS_PORT  # the agent answers <service>.<dns_suffix> here (127.0.0.1)
    dns_suffix: str = "mesh"
    dns_upstreams: tuple[str, ...] = ()  # IPv4[:PORT] resolvers for other names; () = resolv.conf
    admin_port: int = C.ADMIN_PORT  # /metrics, the dashboard and its API (127.0.0.1); 0: off
    access_log: str = ""  # a file, "-" for stdout, "off"; "": access.log in the log folder
    access_log_sample: float = 1.0  # share of connections logged
    # Seconds of once-a-second counter samples kept for stat/top/dashboard windows: the
    # agent's memory grows by a few KiB per sample until the history is full.
    history_seconds: float = 600.0
    # mTLS between hosts: the inbound listener's port on host_address (0: none), and how
    # this host gets its node identity when it has none yet: a join token from
    # `meshnode ca token create` (or a file holding one), or a pre-provisioned certificate
    # and key signed by the mesh CA.
    inbound_port: int = C.TUNNEL_PORT
    join_token: str = ""
    node_cert: Path | None = None
    node_key: Path | None = None

    def __post_init__(self) -> None:
        instance_name(self.instance)
        if self.capture not in ("ebpf", "iptables", "auto"):
            raise ConfigError(f"unknown capture mode {self.capture!r}",
                              "use --capture ebpf, iptables or auto")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be 1..64, not {self.workers}", "use --workers N")
        if not 0 < self.outbound_port < 65536:
            raise ConfigError(f"invalid outbound port {self.outbound_port}", "use 1..65535")
        if not 0 <= self.inbound_port < 65536:
            raise ConfigError(f"invalid inbound port {self.inbound_port}",
                              "use --inbound-port 1..65535, or 0 for no mTLS listener")
        if (self.node_cert is None) != (self.node_key is None):
            raise ConfigError("--node-cert and --node-key go together",
                              "give both, or neither (then --join-token)")
        if not 0 <= self.admin_port < 65536:
            raise ConfigError(f"invalid admin port {self.admin_port}",
                              "use 1..65535, or 0 for none")
        if not 10.0 <= self.history_seconds <= 3600.0:
            raise ConfigError(f"history of {self.history_seconds:g} s is out of range",
                              "use --history-seconds between 10 and 3600")
        if not 0.0 <= self.access_log_sample <= 1.0:
            raise ConfigError(f"access log sample {self.access_log_sample} is not a share",
                              "use --access-log-sample between 0 and 1 (0.1: one in ten)")

    @property
    def node_name(self) -> str:
        if self.node:
            return self.node
        host = socket.gethostname().split(".")[0] or "localhost"
        return host if self.instance == C.DEFAULT_INSTANCE else f"{host}-{self.instance}"

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
    def access_log_path(self) -> str:
        """Where workers write access log lines: a path, "-" (stdout) or "" (off)."""
        if self.access_log == "off" or self.access_log_sample == 0.0:
            return ""
        return self.access_log or str(log_dir(self.instance) / "access.log")

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

    def to_argv(self) -> list[str]:
        return _to_argv(self)

    @classmethod
    def from_argv(cls, argv: list[str]) -> AgentConfig:
        return cls(**_from_argv(cls, "meshnode-agent", argv))

    @property
    def worker_socket(self) -> Path:
        """Where workers reach the agent (root only, like the control socket)."""
        return self.run_dir / "workers.sock"

    def join_token_value(self) -> str:
        """The join token: given as is, or read from @FILE."""
        if not self.join_token.startswith("@"):
            return self.join_token
        path = Path(self.join_token[1:])
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the join token file {path}: {exc.strerror}",
                              "pass --join-token TOKEN or @FILE with the token") from exc

    def worker(self, worker_id: int, build: str, listen_fd: int = -1,
               held: dict[str, int] | None = None) -> WorkerConfig:
        return WorkerConfig(worker_id=worker_id, listen_host=C.PROXY_ADDR,
                            listen_port=self.outbound_port, mark=self.proxy_mark,
                            connect_timeout=self.connect_timeout, idle_timeout=self.idle_timeout,
                            drain_grace=self.drain_grace, agent_socket=str(self.worker_socket),
                            listen_fd=listen_fd, build=build,
                            held_fds=tuple(f"{k}={v}" for k, v in sorted((held or {}).items())),
                            node=self.node_name, zone=self.zone,
                            access_log=self.access_log_path,
                            access_log_sample=self.access_log_sample,
                            inbound_fd=(held or {}).get("inbound", -1))
