"""`meshnode demo`: a service with three instances and an enrolled client calling its VIP.

Runs against the agent of `instance` if one is up, otherwise starts one for the demo's length.
The instances and the client are plain Python processes with no meshnode code in them: they
are started through `meshnode run`, and the client dials the VIP as it would any address.
`python -m meshnode.cli.demo serve|call` are those two programs.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import typer
from meshnode.cli.observe import stat_text
from meshnode.cli.options import client as agent_client

from meshnode.errors import AgentNotRunningError, TemporaryError

SERVICE, CLIENT = "demo", "demo-client"
PORT = 80  # the service port on its VIP; instances listen on ports of their own


def _cli(instance: str, command: str, *args: str) -> list[str]:
    # the option right after the command: `run` takes everything after `--` as its command
    return [sys.executable, "-m", "meshnode.cli", command, "--instance", instance, *args]


def _wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(AgentNotRunningError):
            if result := check():
                return result
        time.sleep(0.1)
    raise TemporaryError(f"timed out waiting for {what}", "see the agent log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(instance: str, calls: int) -> None:
    client = agent_client(instance)
    procs: list[subprocess.Popen[bytes]] = []
    agent: subprocess.Popen[bytes] | None = None
    log_path = Path(f"/tmp/meshnode-demo-agent-{instance}.log")
    try:
        try:
            client.call("ping")
            typer.echo(f"using the running agent ({instance})")
        except AgentNotRunningError:
            typer.echo(f"starting an agent (log: {log_path})")
            agent = subprocess.Popen(_cli(instance, "agent"), stdout=subprocess.DEVNULL,
                                     stderr=open(log_path, "wb"))  # noqa: SIM115
            _wait("the agent", lambda: agent.poll() is not None or client.call("ping")["ready"])
            if agent.poll() is not None:
                tail = log_path.read_text().strip().splitlines()[-1:]
                raise AgentNotRunningError(f"the agent exited: {' '.join(tail)}",
                                           f"full log: {log_path}") from None
        st = client.call("status")
        typer.echo(f"capture: {st['capture']['reason']}")
        # round robin, so the spread reads at a glance (the default, p2c-ewma, favours
        # whichever instance answered fastest lately)
        svc = client.call("service.add", name=SERVICE,
                          patch={"port": PORT, "balancer": {"algorithm": "round-robin"}})
        typer.echo(f"service {SERVICE}: VIP {svc['vip']}:{PORT}, balancer round-robin")
        ports = [_free_port() for _ in range(3)]
        for i, port in enumerate(ports, 1):
            procs.append(subprocess.Popen(_cli(
                instance, "run", "--service", SERVICE, "--", sys.executable,
                "-m", "meshnode.cli.demo", "serve", f"instance-{i}", str(port))))
        want = {f"127.0.0.1:{p}" for p in ports}

        def endpoints_up() -> bool:
            s = {x["name"]: x for x in client.call("status")["services"]}
            return want <= {e["addr"] for e in s[SERVICE]["endpoints"]}

        _wait("three endpoints", endpoints_up)
        typer.echo(f"instances enrolled, listening on {', '.join(sorted(want))}")
        url = f"http://{svc['vip']}:{PORT}/"
        typer.echo(f"enrolled client: {calls} calls to {url}")
        out = subprocess.run(_cli(instance, "run", "--service", CLIENT, "--", sys.executable,
                                  "-m", "meshnode.cli.demo", "call", url, str(calls)),
                             check=True, capture_output=True, timeout=120).stdout
        seen = collections.Counter(json.loads(out))
        typer.echo("")
        for name in sorted(seen):
            typer.echo(f"  {name:<12} {seen[name]:>4}  {'#' * seen[name]}")
        typer.echo(f"\n{sum(seen.values())} calls spread over {len(seen)} instances")
        typer.echo(f"\n$ meshnode stat {SERVICE}   (the proxy's view of the same calls)")
        typer.echo(stat_text(client.call("stat", service=SERVICE, window=60)))
        admin = client.call("status")["telemetry"]["admin"]
        if admin:
            typer.echo(f"\nwhile an agent runs: dashboard http://{admin}/, "
                       f"Prometheus metrics http://{admin}/metrics")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        with contextlib.suppress(Exception):
            client.call("service.remove", name=SERVICE)
            client.call("service.remove", name=CLIENT)
        if agent is not None:
            # the demo's own agent: removed, not just stopped (a stop keeps the data plane)
            subprocess.run(_cli(instance, "uninstall"), stdout=subprocess.DEVNULL, timeout=120,
                           check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(30)
            if agent.poll() is None:
                agent.kill()
            typer.echo("meshnode uninstall: everything the demo's agent loaded into the kernel "
                       "is removed")


class _Hello(http.server.BaseHTTPRequestHandler):
    name = "?"

    def do_GET(self) -> None:
        body = self.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(name: str, port: int) -> None:
    _Hello.name = name
    http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hello).serve_forever()


def _call(url: str, count: int) -> None:
    answers = []
    for _ in range(count):
        with urllib.request.urlopen(url, timeout=5) as r:
            answers.append(r.read().decode())
    print(json.dumps(answers))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        _serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "call":
        _call(sys.argv[2], int(sys.argv[3]))
