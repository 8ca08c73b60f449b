"""The kernel path on a real agent (eBPF capture): the connect hook balances a service's
connections itself and the app talks to the endpoint directly.

What a user sees: every endpoint reached, weights honoured over 3 000 connections, getpeername
showing the VIP, no proxy on the path (its counters stay still), an unhealthy endpoint gone
within the health interval, connections to a removed endpoint closed when the service asks,
fallback to kernel balancing while every worker is dead, and nothing left after removal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from meshnode import constants
from tests.harness import Host, free_port, wait_for
from tests.integration import progs

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# argv: HOST PORT N [V6]. N connections to HOST:PORT, each reading the server's name line;
# prints one JSON line: names counted, peers (getpeername) counted, failures.
DIALER = r"""
import collections, json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = len(sys.argv) > 4
names, peers, failed = collections.Counter(), collections.Counter(), []
for _ in range(n):
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(("::ffff:" + host if v6 else host, port))
        peer = s.getpeername()
        data = b""
        while not data.endswith(b"\n"):
            d = s.recv(64)
            if not d: break
            data += d
        names[data.decode().strip()] += 1
        peers["%s:%d" % (peer[0].replace("::ffff:", ""), peer[1])] += 1
    except OSError as e:
        failed.append(str(e))
    finally:
        s.close()
print(json.dumps({"names": names, "peers": peers, "failed": failed[:5], "nfailed": len(failed)}))
"""


def dial(h: Host, host: str, port: int, n: int, v6: bool = False) -> dict[str, Any]:
    """`n` connections from a process enrolled as `client`; what it saw."""
    p = h.popen([sys.executable, "-c", DIALER, host, str(port), str(n), *(["v6"] if v6 else [])],
                "client", stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=120)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def kernel_stats(h: Host) -> dict[str, int]:
    stats: dict[str, int] = h.status()["capture"]["kernel"]
    return stats


def worker_connections(h: Host) -> int:
    """Connections the proxy workers accepted, as /metrics counts them (kernel-path rows
    carry path="kernel")."""
    _, text = h.http_get("/metrics")
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("meshnode_connections_opened_total")
               and 'path="kernel"' not in line)


@pytest.fixture
def host(make_host: Any) -> Host:
    h: Host = make_host("ebpf", workers=1)
    h.start()
    assert h.cli("service", "add", "client").returncode == 0
    return h


def servers(h: Host, weights: dict[str, int], service: str = "web",
            extra: tuple[str, ...] = ()) -> dict[str, int]:
    """A name server per weight (not enrolled: static endpoints of `service`, VIP port 80)."""
    ports = {}
    for name, w in weights.items():
        port = free_port()
        h.server(name, port)
        r = h.cli("service", "add", service, "--port", "80", "--endpoint", f"127.0.0.1:{port}",
                  "--weight", str(w), *extra)
        assert r.returncode == 0, r.stderr
        ports[name] = port
    h.wait_endpoints(service, {f"127.0.0.1:{p}" for p in ports.values()})
    return ports


def test_weights_every_endpoint_and_the_vip_as_peer(host: Host) -> None:
    h = host
    ports = servers(h, {"a": 1, "b": 2, "c": 3})
    r = h.cli("service", "add", "web", "--datapath", "kernel", "--lb", "round-robin")
    assert r.returncode == 0, r.stderr
    vip = h.service("web")["vip"]
    wait_for("kernel path in status", lambda: h.service("web")["datapath"]["path"] == "kernel")
    before_kernel, before_proxy = kernel_stats(h)["kernel"], worker_connections(h)

    got = dial(h, vip, 80, 3000)
    assert got["nfailed"] == 0, got
    names = Counter(got["names"])
    for name, share in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert abs(names[name] - 3000 * share) <= 0.05 * 3000 * share, names
    assert got["peers"] == {f"{vip}:80": 3000}, got["peers"]  # getpeername: the VIP
    assert kernel_stats(h)["kernel"] - before_kernel == 3000
    assert worker_connections(h) == before_proxy  # the proxy saw none of them

    # explain says which path and over what
    probe = h.probe("client")
    r = h.cli("explain", str(probe.pid), "web.mesh:80", "-o", "json")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)
    assert e["outcome"] == "kernel" and e["kernel"]["action"] == "kernel", e
    assert e["kernel"]["endpoints"] == {
        f"127.0.0.1:{ports['a']}": "1/6", f"127.0.0.1:{ports['b']}": "2/6",
        f"127.0.0.1:{ports['c']}": "3/6"}, e["kernel"]
    assert "getpeername() shows" in e["verdict"] and "no proxy on the path" in e["verdict"]
    assert e["datapath"]["path"] == "kernel", e["datapath"]

    # AF_INET6 sockets to the v4-mapped VIP take the same path and see the same peer
    six = dial(h, vip, 80, 60, v6=True)
    assert six["nfailed"] == 0 and six["peers"] == {f"{vip}:80": 60}, six
    assert set(six["names"]) == {"a", "b", "c"}


def test_random_and_ring_hash_reach_every_endpoint(host: Host) -> None:
    h = host
    servers(h, {"a": 1, "b": 1})
    assert h.cli("service", "add", "web", "--datapath", "kernel", "--lb", "random").returncode == 0
    vip = h.service("web")["vip"]
    wait_for("kernel path", lambda: h.service("web")["datapath"]["path"] == "kernel")
    got = dial(h, vip, 80, 400)
    assert got["nfailed"] == 0 and set(got["names"]) == {"a", "b"}, got
    assert h.cli("service", "add", "web", "--lb", "ring-hash").returncode == 0
    wait_for("ring-hash table", lambda: h.service("web")["datapath"]["pick"] == "hash")
    # one client process keeps one endpoint
    one = dial(h, vip, 80, 200)
    assert one["nfailed"] == 0 and len(one["names"]) == 1, one


def test_auto_keeps_the_proxy_when_policy_needs_it(host: Host, tmp_path: Path) -> None:
    h = host
    servers(h, {"a": 1})
    doc = tmp_path / "web.yaml"
    doc.write_text("kind: Service\nname: web\nspec:\n  port: 80\n  datapath: auto\n"
                   "---\nkind: AuthorizationPolicy\nname: web-callers\n"
                   "spec:\n  target: web\n  action: DENY\n  rules:\n  - from:\n"
                   "      services: [intruder]\n")
    r = h.cli("apply", "-f", str(doc))
    assert r.returncode == 0, r.stderr
    dp = wait_for("a proxy choice", lambda: (d := h.service("web")["datapath"])["path"] == "proxy"
                  and d)
    assert "authorization applies" in dp["reason"], dp
    vip = h.service("web")["vip"]
    before = worker_connections(h)
    got = dial(h, vip, 80, 5)
    assert got["nfailed"] == 0, (got, h.service("web"))
    assert worker_connections(h) - before == 5  # proxied
    assert h.cli("delete", "AuthorizationPolicy", "web-callers").returncode == 0
    wait_for("kernel once nothing needs the proxy",
             lambda: h.service("web")["datapath"]["path"] == "kernel")
    before = worker_connections(h)
    assert dial(h, vip, 80, 5)["nfailed"] == 0
    assert worker_connections(h) == before


def test_datapath_kernel_refuses_what_it_cannot_do(host: Host) -> None:
    r = host.cli("service", "add", "web", "--datapath", "kernel", "--max-connections", "5")
    assert r.returncode != 0
    assert "datapath kernel cannot enforce maxConnections" in r.stderr, r.stderr


def test_unhealthy_endpoint_leaves_within_the_interval(host: Host) -> None:
    h = host
    ports = servers(h, {"a": 1, "b": 1}, extra=("--health-interval", "1",
                                              "--unhealthy-threshold", "1"))
    assert h.cli("service", "add", "web", "--datapath", "kernel").returncode == 0
    vip = h.service("web")["vip"]
    wait_for("kernel path", lambda: h.service("web")["datapath"]["path"] == "kernel")
    assert set(dial(h, vip, 80, 20)["names"]) == {"a", "b"}
    victim = next(p for p in h.procs if p.args[-2:] == [str(ports["b"]), "127.0.0.1"])
    victim.kill()
    victim.wait()
    killed = time.monotonic()
    # within one interval plus one check's timeout, no connect reaches the dead endpoint
    wait_for("b out of the table", lambda: dial(h, vip, 80, 10)["nfailed"] == 0, timeout=10)
    took = time.monotonic() - killed
    assert took < 2.5, took
    assert dial(h, vip, 80, 50) == {"names": {"a": 50}, "peers": {f"{vip}:80": 50},
                                    "failed": [], "nfailed": 0}


@pytest.mark.parametrize("close", [True, False])
def test_connections_to_a_removed_endpoint(host: Host, close: bool) -> None:
    h = host
    port = free_port()
    echo = h.popen([sys.executable, "-c", progs.ECHO_SERVER, str(port)], stdout=subprocess.PIPE,
                   text=True)
    assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
    flag = "--close-removed" if close else "--keep-removed"
    r = h.cli("service", "add", "echo", "--port", "7", "--endpoint", f"127.0.0.1:{port}",
              "--datapath", "kernel", flag)
    assert r.returncode == 0, r.stderr
    h.wait_endpoints("echo", {f"127.0.0.1:{port}"})
    wait_for("kernel path", lambda: h.service("echo")["datapath"]["path"] == "kernel")
    probe = h.probe("client")
    vip = h.service("echo")["vip"]
    stream = probe.ask(op="open", host=vip, port=7)
    assert stream["ok"], stream
    assert probe.ask(op="ping", id=stream["id"], data="one")["ok"]
    r = h.cli("service", "remove", "echo", "--endpoint", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    h.wait_endpoints("echo", set())
    # status shows the tables the kernel took: once the endpoint has left them, the sync
    # that closes its connections (or not) has run
    wait_for("the endpoint out of the kernel's table",
             lambda: h.service("echo")["datapath"]["tables"] == [])
    after = probe.ask(op="ping", id=stream["id"], data="two")
    if close:
        assert not after["ok"] and after.get("errno") in (103, 104, 32), after
    else:
        assert after["ok"], after


def test_fallback_to_kernel_while_every_worker_is_dead(make_host: Any) -> None:
    # a long restart backoff: the proxy stays down for seconds once its worker dies
    h: Host = make_host("ebpf", workers=1, restart_backoff=4.0)
    h.start()
    assert h.cli("service", "add", "client").returncode == 0
    servers(h, {"a": 1, "b": 1})
    vip = h.service("web")["vip"]
    dp = wait_for("fallback allowed", lambda: (d := h.service("web")["datapath"])["fallback"]
                  and d)
    assert dp["path"] == "proxy", dp
    before = worker_connections(h)
    assert dial(h, vip, 80, 10)["nfailed"] == 0
    assert worker_connections(h) - before == 10  # proxied while the proxy serves

    probe = h.probe("client")
    e = json.loads(h.cli("explain", str(probe.pid), "web.mesh:80", "-o", "json").stdout)
    assert e["outcome"] == "proxied", e
    assert "if the proxy is not ready: balanced in the kernel (fallback)" in e["steps"], e
    workers = [w["pid"] for w in h.status()["workers"] if w["alive"]]
    kernel_before = kernel_stats(h)["kernel"]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_for("workers dead", lambda: not any(w["alive"] for w in h.status()["workers"]))
    got = dial(h, vip, 80, 300)
    assert got["nfailed"] == 0, got
    assert set(got["names"]) == {"a", "b"}
    assert kernel_stats(h)["kernel"] - kernel_before == 300
    e = json.loads(h.cli("explain", str(probe.pid), "web.mesh:80", "-o", "json").stdout)
    assert e["outcome"] == "kernel" and "fallback" in e["steps"][-1], e
    wait_for("a worker again", lambda: any(w["alive"] for w in h.status()["workers"]),
             timeout=20)
    wait_for("proxied again", lambda: h.service("web")["datapath"]["now"] == "proxy")
    before = worker_connections(h)
    assert dial(h, vip, 80, 10)["nfailed"] == 0
    assert worker_connections(h) - before == 10


def test_removal_leaves_no_map_or_attachment(host: Host) -> None:
    h = host
    servers(h, {"a": 1})
    assert h.cli("service", "add", "web", "--datapath", "kernel").returncode == 0
    wait_for("kernel path", lambda: h.service("web")["datapath"]["path"] == "kernel")
    assert dial(h, h.service("web")["vip"], 80, 3)["nfailed"] == 0
    pin_dir = Path(constants.PIN_ROOT) / h.tag
    assert (pin_dir / "mn_lb_table").exists() and (pin_dir / "mn_kflow").exists()
    apps = h.cgroup_root() / "apps"
    r = h.uninstall()
    assert r.returncode == 0, r.stderr
    assert not pin_dir.exists()
    if apps.exists():
        shown = subprocess.run(["bpftool", "cgroup", "show", str(apps)], capture_output=True,
                               text=True, check=False).stdout
        assert "mn_" not in shown, shown



def test_iptables_says_the_kernel_path_is_ebpf_only(make_host: Any) -> None:
    h: Host = make_host("iptables", workers=1)
    h.start()
    assert h.cli("service", "add", "client").returncode == 0
    servers(h, {"a": 1})
    assert h.cli("service", "add", "web", "--datapath", "kernel").returncode == 0
    dp = wait_for("a choice", lambda: (d := h.service("web")["datapath"])["reason"] != "not "
                  "planned yet" and d)
    assert dp["path"] == "proxy" and not dp["fallback"], dp
    assert "the kernel path needs the eBPF capture backend" in dp["reason"], dp
    probe = h.probe("client")
    e = json.loads(h.cli("explain", str(probe.pid), "web.mesh:80", "-o", "json").stdout)
    assert e["outcome"] == "proxied", e
    assert any("needs the eBPF capture backend" in s for s in e["steps"]), e["steps"]
    before = worker_connections(h)
    assert dial(h, h.service("web")["vip"], 80, 5)["nfailed"] == 0
    assert worker_connections(h) - before == 5  # proxied, as the status says
