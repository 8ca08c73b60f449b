"""`meshnode`: the typer app.

Examples:
  sudo meshnode agent --capture auto
  sudo meshnode service add web --port 80
  sudo meshnode run --service web -- python3 -m http.server 8001
  sudo meshnode enroll 4242 --service api --label version=v2
  sudo meshnode status --output json
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from meshnode.cli.failure import fail
from meshnode.cli.options import Instance, OutputOpt
from meshnode.cli.options import client as _client
from meshnode.cli.output import Output, emit_json, status_text

from meshnode import __version__
from meshnode import constants as C
from meshnode.agent.systemd import RELOAD_ARGV
from meshnode.config import AgentConfig, instance_name
from meshnode.errors import MeshnodeError, UnavailableError, UsageError

app = typer.Typer(help="meshnode: a per-host service mesh for Linux hosts and VMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
service_app = typer.Typer(help="Services and their static endpoints.", no_args_is_help=True)
bpf_app = typer.Typer(help="BPF programs.", no_args_is_help=True, hidden=True)
app.add_typer(service_app, name="service")
app.add_typer(bpf_app, name="bpf")

def _version(value: bool) -> None:
    if value:
        typer.echo(f"meshnode {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version.")] = False) -> None:
    pass


@app.command()
def agent(
    ctx: typer.Context,
    instance: Instance = "default",
    capture: Annotated[str, typer.Option(help="ebpf, iptables or auto")] = "auto",
    workers: Annotated[int, typer.Option(help="proxy worker processes")] = os.cpu_count() or 1,
    netns: Annotated[str | None, typer.Option(help="run inside /run/netns/NAME")] = None,
    host_address: Annotated[str, typer.Option(help="address of this host's endpoints")] =
        "127.0.0.1",
    outbound_port: Annotated[int, typer.Option(help="port captured connections land on")] =
        C.OUTBOUND_PORT,
    restart_backoff: Annotated[float, typer.Option(help="seconds before a dead worker "
                                                         "is restarted")] =
        C.WORKER_RESTART_BACKOFF,
    drain_grace: Annotated[float, typer.Option(help="seconds connections get to finish "
                                                     "on stop")] = C.DRAIN_GRACE,
    registry: Annotated[str, typer.Option(help="embedded, or etcd://HOST:PORT[,HOST:PORT...]")] =
        "embedded",
    registry_ttl: Annotated[int, typer.Option(
        help="seconds until a dead agent's endpoints vanish (etcd lease)")] = 10,
    node: Annotated[str | None, typer.Option(help="this host's name in the mesh "
                                                  "(default: hostname)")] = None,
    zone: Annotated[str, typer.Option(help="this host's zone (locality-aware balancing)")] = "",
    dns_port: Annotated[int, typer.Option(help="where the agent answers DNS (127.0.0.1)")] =
        C.DNS_PORT,
    dns_suffix: Annotated[str, typer.Option(help="services resolve as NAME.SUFFIX")] = "mesh",
    dns_upstream: Annotated[list[str] | None, typer.Option(
        help="IPv4[:PORT] resolver for other names (repeatable; default: /etc/resolv.conf)")] =
        None,
    admin_port: Annotated[int, typer.Option(
        help="127.0.0.1 port of /metrics and the dashboard (0: none)")] = C.ADMIN_PORT,
    access_log: Annotated[str, typer.Option(
        help="access log file, - for stdout, off (default: /var/log/meshnode/access.log)")] = "",
    access_log_sample: Annotated[float, typer.Option(
        help="share of connections logged, 0-1")] = 1.0,
    history_seconds: Annotated[float, typer.Option(
        help="seconds of per-second counters kept for stat/top windows (a few KiB each)")] =
        600.0,
    inbound_port: Annotated[int, typer.Option(
        help="port of this host's mTLS listener on --host-address (0: none)")] =
        C.TUNNEL_PORT,
    join_token: Annotated[str, typer.Option(
        envvar="MESHNODE_JOIN_TOKEN",
        help="join the mesh CA with this single-use token (`meshnode ca token create`), or "
             "@FILE holding it; kept out of the agent's command line")] = "",
    node_cert: Annotated[Path | None, typer.Option(
        help="a node certificate chain signed by the mesh CA (instead of a join token)")] =
        None,
    node_key: Annotated[Path | None, typer.Option(help="the key of --node-cert")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    config: Annotated[Path | None, typer.Option(
        help="YAML file of these options (e.g. `workers: 2`); flags win over it. Read again "
             "on SIGHUP (systemctl reload), which restarts the agent in place")] = None,
) -> None:
    """Run the host agent (root): capture, proxy workers, registry, control socket.

    Stopping it (SIGTERM, Ctrl-C, systemctl stop/restart) or a crash leaves the data plane
    serving: the next agent adopts it. `meshnode uninstall` removes meshnode from the host."""
    given = {k: v for k, v in locals().items() if k != "ctx"}
    if config is not None:
        given = _with_config_file(ctx, config, given)
    if str(given["log_level"]).upper() not in logging.getLevelNamesMapping():
        raise UsageError(f"unknown log level {given['log_level']!r}",
                         "use debug, info or warning")
    given["dns_upstreams"] = tuple(given.pop("dns_upstream") or ())
    level = given.pop("log_level")
    del given["config"]
    cfg = AgentConfig(**given)
    cfg = _token_out_of_argv(cfg)
    # the agent itself runs without the typer app loaded (cli/agent_main.py says why); a
    # reload (SIGHUP) runs this command line again, so the config file is read anew
    sys.stdout.flush()
    os.environ[RELOAD_ARGV] = json.dumps(sys.argv[1:])
    os.execv(sys.executable, [sys.executable, "-m", "meshnode.cli.agent_main",
                              f"--log-level={level}", *cfg.to_argv()])


def _token_out_of_argv(cfg: AgentConfig) -> AgentConfig:
    """A join token given literally goes to a root-only file the agent reads: argv is
    readable by every user (ps), and the agent's command line outlives this one."""
    if not cfg.join_token or cfg.join_token.startswith("@"):
        return cfg
    from dataclasses import replace

    from meshnode.host.statefile import write_atomic

    path = cfg.state_path / "join-token"
    cfg.state_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, cfg.join_token.encode(), mode=0o600)
    return replace(cfg, join_token=f"@{path}")


def _with_config_file(ctx: typer.Context, path: Path,
                      given: dict[str, object]) -> dict[str, object]:
    """The options with the file's values where no flag was given."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read agent config {path}: {exc}".splitlines()[0],
                         "fix the file (YAML: option: value per line)") from exc
    if not isinstance(data, dict):
        raise UsageError(f"agent config {path} is not a mapping of options",
                         "write one `option: value` per line, e.g. `workers: 2`")
    out = dict(given)
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in given or name == "config":
            raise UsageError(f"agent config {path}: unknown option {key!r}",
                             "see `meshnode agent --help` for the options")
        source = ctx.get_parameter_source(name)
        if source is None or source.name == "DEFAULT":
            out[name] = value
    return out


@app.command()
def uninstall(
    instance: Instance = "default",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the removal")] = 120.0,
) -> None:
    """Remove meshnode from this host: capture off first (connections go straight to their
    destinations), workers drained, enrolled processes handed back, every kernel object
    removed. Stopping the agent (SIGTERM, systemctl stop/restart) keeps the data plane
    serving; this does not."""
    from meshnode.errors import AgentNotRunningError

    client = _client(instance)
    try:
        pid = client.call("uninstall")["pid"]
    except AgentNotRunningError:
        # No agent: one is started only to remove what the last one left (its saved config
        # names the registry, netns and capture it ran with).
        saved = AgentConfig(instance=instance).state_path / "agent-config.json"
        argv = json.loads(saved.read_text()) if saved.exists() else \
            AgentConfig(instance=instance).to_argv()
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "meshnode.cli.agent_main", "--remove",
                                  *argv])
    deadline = time.monotonic() + timeout
    lock = AgentConfig(instance=instance).state_path / "agent.lock"
    while _locked(lock) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _locked(lock):
        raise UnavailableError(f"the agent (pid {pid}) is still removing after {timeout:.0f} s",
                               "see its log; run `meshnode uninstall` again once it exits")
    typer.echo(f"meshnode instance {instance!r} removed from this host")


def _locked(path: Path) -> bool:
    """Whether an agent holds its instance lock (it is released when the process exits)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@app.command()
def status(instance: Instance = "default", output: OutputOpt = Output.table) -> None:
    """Capture mode, workers, services with VIPs, endpoints and counters, enrolled processes."""
    s = _client(instance).call("status")
    if output is Output.json:
        emit_json(s)
    else:
        typer.echo(status_text(s))


LabelOpt = Annotated[list[str] | None, typer.Option(
    "--label", help="KEY=VALUE on its endpoints, e.g. version=v2: the subsets a Route's "
                    "backends name (repeatable)")]


def _label_args(label: list[str] | None) -> dict[str, str]:
    """The --label flags, checked here so a typo fails before the agent is asked."""
    from meshnode.policy.labels import parse_labels

    return dict(parse_labels(label or []))


@app.command()
def enroll(pid: Annotated[int, typer.Argument(help="a running process")],
           service: Annotated[str, typer.Option(help="service it serves or belongs to")],
           label: LabelOpt = None,
           instance: Instance = "default", output: OutputOpt = Output.table) -> None:
    """Put a running process (and its children) into the mesh, without restarting it.
    Enrolling it again with other --label flags relabels its endpoints."""
    r = _client(instance).call("enroll", pid=pid, service=service, labels=_label_args(label))
    if output is Output.json:
        emit_json(r)
    else:
        eps = ", ".join(r["endpoints"]) or "none yet"
        labels = ",".join(f"{k}={v}" for k, v in r.get("labels", {}).items())
        typer.echo(f"enrolled PID {r['pid']} in {r['service']} (endpoints: {eps}"
                   + (f"; labels {labels})" if labels else ")"))


@app.command()
def unenroll(pid: int, instance: Instance = "default") -> None:
    """Take a process out of the mesh: its new connections are no longer captured."""
    r = _client(instance).call("unenroll", pid=pid)
    typer.echo(f"unenrolled PID {r['pid']} from {r['service']}")


@app.command(context_settings={"allow_interspersed_args": False})
def run(service: Annotated[str, typer.Option(help="service the command belongs to")],
        command: Annotated[list[str], typer.Argument(help="the command, after --")],
        label: LabelOpt = None,
        instance: Instance = "default") -> None:
    """Start a command already enrolled: meshnode run --service web --label version=v2 --
    CMD ARGS..."""
    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]}", "check the command after --")
    # Enroll this very process, then become the command: same PID, same start time.
    _client(instance).call("enroll", pid=os.getpid(), service=service,
                           labels=_label_args(label))
    sys.stdout.flush()
    os.execvp(command[0], command)


@service_app.command("add")
def service_add(
    name: str,
    port: Annotated[int | None, typer.Option(help="VIP port that reaches every endpoint")] = None,
    endpoint: Annotated[list[str] | None, typer.Option(help="HOST:PORT (repeatable)")] = None,
    fail_closed: Annotated[bool | None, typer.Option(
        "--fail-closed/--fail-open", help="refuse connections while the proxy is down")] = None,
    weight: Annotated[int | None, typer.Option(help="weight of the --endpoint(s) added")] = None,
    label: LabelOpt = None,
    lb: Annotated[str | None, typer.Option(
        help="p2c-ewma (default), round-robin, random or ring-hash")] = None,
    locality: Annotated[bool | None, typer.Option(
        "--locality/--no-locality", help="prefer this host, then this zone")] = None,
    health: Annotated[str | None, typer.Option(
        help="active check: tcp, http:/PATH or none")] = None,
    health_interval: Annotated[float | None, typer.Option(help="seconds between checks")] = None,
    health_timeout: Annotated[float | None, typer.Option(help="seconds a check may take")] =
        None,
    healthy_threshold: Annotated[int | None, typer.Option(help="passes to become healthy")] =
        None,
    unhealthy_threshold: Annotated[int | None, typer.Option(
        help="failures to become unhealthy")] = None,
    eject_after: Annotated[int | None, typer.Option(
        help="consecutive connect failures that eject an endpoint")] = None,
    eject_for: Annotated[float | None, typer.Option(help="base ejection, seconds")] = None,
    eject_max_share: Annotated[float | None, typer.Option(
        help="most of a service's endpoints ejected at once (0-1)")] = None,
    max_connections: Annotated[int | None, typer.Option(
        help="active connections per proxy worker to this service (0: no limit)")] = None,
    datapath: Annotated[str | None, typer.Option(
        help="who balances its connections: proxy (default), kernel or auto")] = None,
    close_removed: Annotated[bool | None, typer.Option(
        "--close-removed/--keep-removed",
        help="kernel path: close connections to endpoints that leave")] = None,
    instance: Instance = "default", output: OutputOpt = Output.table,
) -> None:
    """Create a service (or update it) and add endpoints that are not local processes.
    A shortcut: the flags given are written into the Service resource (meshnode get Service
    NAME -o yaml), merged with what is stored, as `meshnode apply` would."""
    health_spec: dict[str, object] = {**_health_kind(health), "interval": health_interval,
                                      "timeout": health_timeout,
                                      "healthyThreshold": healthy_threshold,
                                      "unhealthyThreshold": unhealthy_threshold}
    patch = _given(port=port, failMode=None if fail_closed is None else
                   ("closed" if fail_closed else "open"),
                   maxConnections=max_connections, datapath=datapath,
                   closeRemovedConnections=close_removed,
                   balancer=_given(algorithm=lb, locality=locality),
                   health=_given(**health_spec),
                   outlier=_given(consecutiveFailures=eject_after, baseEjection=eject_for,
                                  maxEjectedShare=eject_max_share))
    r = _client(instance).call("service.add", name=name, endpoints=endpoint or [],
                               weight=weight, labels=_label_args(label), patch=patch or {})
    if output is Output.json:
        emit_json(r)
    else:
        eps = ", ".join(e["addr"] + "".join(f" {k}={v}" for k, v in e.get("labels", {}).items())
                        for e in r["endpoints"]) or "none"
        typer.echo(f"service {r['name']}: VIP {r['vip']}, port {r['port'] or '*'}, "
                   f"endpoints {eps}, version {r['version']}")


def _health_kind(spec: str | None) -> dict[str, str | None]:
    if spec is None:
        return {}
    if spec in ("tcp", "none"):
        return {"kind": spec}
    if spec.startswith("http:"):
        return {"kind": "http", "path": spec[5:] or "/"}
    raise UsageError(f"invalid health check {spec!r}", "use tcp, http:/PATH or none")


def _given(**fields: object) -> dict[str, object] | None:
    """The fields that were given (a partial spec); None when none was."""
    out = {k: v for k, v in fields.items() if v is not None}
    return out or None


@service_app.command("remove")
def service_remove(
    name: str,
    endpoint: Annotated[list[str] | None, typer.Option(help="only this HOST:PORT (repeatable)")]
        = None,
    instance: Instance = "default",
) -> None:
    """Remove a service, or only some of its endpoints."""
    r = _client(instance).call("service.remove", name=name, endpoints=endpoint or [])
    what = f"endpoints {', '.join(r['endpoints'])} of " if r["endpoints"] else ""
    typer.echo(f"removed {what}service {r['removed']}")


@bpf_app.command("source")
def bpf_source() -> None:
    """Print the exact C and compiler flags handed to bcc."""
    from meshnode.bpf.compile import render_source

    typer.echo(render_source())


@app.command()
def demo(instance: Instance = "default",
         calls: Annotated[int, typer.Option(help="calls the client makes")] = 30) -> None:
    """Start an agent (unless one runs), three instances of a service and an enrolled client
    calling its VIP; print how the calls spread."""
    from meshnode.cli.demo import run_demo

    run_demo(instance_name(instance), calls)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the one place that prints errors and picks exit codes."""
    try:
        app(args=argv)
    except MeshnodeError as err:
        fail(err)
    except SystemExit as exc:
        # click reports bad arguments with exit 2; meshnode uses sysexits (EX_USAGE)
        sys.exit(64 if exc.code == 2 else exc.code)
    except KeyboardInterrupt:
        sys.exit(130)


from meshnode.cli import authz as _authz  # noqa: E402
from meshnode.cli import ca as _ca  # noqa: E402
from meshnode.cli import doctor as _doctor  # noqa: E402
from meshnode.cli import explain as _explain  # noqa: E402
from meshnode.cli import observe as _observe  # noqa: E402
from meshnode.cli import resources as _resources  # noqa: E402

for _commands in (_observe, _explain, _doctor, _resources, _authz, _ca):
    _commands.register(app)
