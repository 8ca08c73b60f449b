"""`meshnode explain PID HOST:PORT` through the real CLI, on both capture backends: what it says
must match what the kernel and the proxy then do with a real connection."""

from __future__ import annotations

import errno
import json
import subprocess
from typing import Any

import pytest

from tests.harness import Host, free_port, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def explain(h: Host, pid: int, dest: str) -> dict[str, Any]:
    r = h.cli("explain", str(pid), dest, "-o", "json")
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def explain_table(h: Host, pid: int, dest: str) -> str:
    r = h.cli("explain", str(pid), dest)
    assert r.returncode == 0, r.stderr
    print(f"\n$ meshnode explain {pid} {dest}\n{r.stdout}")  # shown with -s
    return r.stdout


def three_instances(h: Host) -> tuple[str, list[int]]:
    vip: str = h.call("service.add", name="web",
                      patch={"port": 80, "balancer": {"algorithm": "round-robin"}})["vip"]
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    for i, p in enumerate(sorted(ports)):
        h.server(f"instance-{i}", p, service="web")
    h.wait_endpoints("web", {f"127.0.0.1:{p}" for p in ports})
    return vip, sorted(ports)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid  # reaped: nothing runs under it now


def test_enrolled_process_to_a_vip_and_its_name(make_host, backend: str) -> None:
    h = make_host(backend, workers=1)
    h.start()
    vip, ports = three_instances(h)
    client = h.probe(service="client")
    e = explain(h, client.pid, f"{vip}:80")
    assert e["captured"] and e["outcome"] == "proxied" and e["backend"] == backend, e
    assert e["verdict"] == (f"captured by {backend} → service web (VIP {vip}:80), round-robin "
                            "over 3 healthy endpoints"), e["verdict"]
    assert e["destination"] == {"kind": "vip", "service": "web", "vip": vip, "service_port": 80}
    assert e["rule"] == "a"
    assert e["process"]["enrolled"] and e["process"]["service"] == "client"
    assert e["process"]["cgroup"].endswith("/apps/client")
    assert e["process"]["enrollment"]["pid"] == client.pid
    assert [c["addr"] for c in e["candidates"]] == [f"127.0.0.1:{p}" for p in ports]
    assert all(c["healthy"] and c["in_rotation"] and c["ejected_for"] == 0
               for c in e["candidates"])
    assert e["balancer"]["algorithm"] == "round-robin" and e["balancer"]["rule"]
    assert e["service"]["fail_mode"] == "fail-open"
    assert any(s.startswith("kernel (") and "redirected" in s for s in e["steps"]), e["steps"]
    # ...and that is what happens: the VIP reaches the instances
    assert {client.connect(vip, 80)["reply"] for _ in range(3)} == {
        "instance-0", "instance-1", "instance-2"}

    # the same through the mesh name, resolved the way the agent's DNS resolves it
    n = explain(h, client.pid, "web.mesh:80")
    assert n["name"] == "web.mesh" and n["address"] == f"{vip}:80"
    assert n["verdict"] == e["verdict"]

    # rule (a) without the service port: only the endpoints on the destination port
    p = explain(h, client.pid, f"{vip}:{ports[1]}")
    assert [c["addr"] for c in p["candidates"]] == [f"127.0.0.1:{ports[1]}"]
    assert client.connect(vip, ports[1])["reply"] == "instance-1"
    # rule (b): an endpoint's own address is that endpoint only
    b = explain(h, client.pid, f"127.0.0.1:{ports[2]}")
    assert b["rule"] == "b" and b["captured"] and b["destination"]["kind"] == "endpoint"
    assert [c["addr"] for c in b["candidates"]] == [f"127.0.0.1:{ports[2]}"]

    text = explain_table(h, client.pid, f"{vip}:80")
    lines = text.splitlines()
    assert lines[0] == e["verdict"]
    assert any("ENDPOINT" in line and "HEALTH" in line for line in lines)
    assert all(f"127.0.0.1:{p}" in text for p in ports)


def test_outsider_and_unknown_destination_are_not_captured(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    vip, ports = three_instances(h)
    outsider = h.probe()  # same namespace, not enrolled
    e = explain(h, outsider.pid, f"{vip}:80")
    assert not e["captured"] and e["outcome"] == "direct" and not e["process"]["enrolled"]
    assert e["verdict"].startswith(f"not captured: PID {outsider.pid} is not enrolled (cgroup "
                                   f"{e['process']['cgroup']})"), e["verdict"]
    assert e["candidates"] == []
    text = explain_table(h, outsider.pid, f"{vip}:80")
    assert text.splitlines()[0] == e["verdict"]
    r = outsider.connect(vip, 80)  # nothing listens on a VIP
    assert not r["ok"] and r["errno"] == errno.ECONNREFUSED, r

    # an enrolled process to an address that is nobody's: passes through
    client = h.probe(service="client")
    plain = free_port()
    while plain in ports:
        plain = free_port()
    h.server("not-in-mesh", plain)
    u = explain(h, client.pid, f"127.0.0.1:{plain}")
    assert not u["captured"] and u["outcome"] == "direct" and u["process"]["enrolled"]
    assert u["verdict"] == (f"not captured: 127.0.0.1:{plain} is not a mesh destination; "
                            "it passes through untouched")
    assert u["destination"]["kind"] == "none" and u["service"] is None
    assert client.connect("127.0.0.1", plain)["reply"] == "not-in-mesh"
    far = explain(h, client.pid, "10.0.0.1:443")
    assert "not a mesh destination" in far["verdict"]


def test_unhealthy_and_missing_endpoints_leave_no_candidate(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    up, down = free_port(), free_port()
    while down == up:
        down = free_port()
    h.server("up", up)
    r = h.cli("service", "add", "api", "--port", "81",
              "--endpoint", f"127.0.0.1:{up}", "--endpoint", f"127.0.0.1:{down}",
              "--health", "tcp", "--health-interval", "0.2", "--health-timeout", "0.2",
              "--unhealthy-threshold", "2", "--healthy-threshold", "1")
    assert r.returncode == 0, r.stderr
    wait_for("the dead endpoint marked down",
             lambda: not {e["addr"]: e for e in h.service("api")["endpoints"]}[
                 f"127.0.0.1:{down}"]["health"]["healthy"], timeout=10)
    vip = h.service("api")["vip"]
    client = h.probe(service="client")
    e = explain(h, client.pid, f"{vip}:81")
    assert e["outcome"] == "proxied" and e["balancer"]["algorithm"] == "p2c-ewma"
    assert e["verdict"].endswith("p2c-ewma over 1 healthy endpoint"), e["verdict"]
    state = {c["addr"]: (c["healthy"], c["in_rotation"]) for c in e["candidates"]}
    assert state == {f"127.0.0.1:{up}": (True, True), f"127.0.0.1:{down}": (False, False)}
    assert "tcp connect failed" in explain_table(h, client.pid, f"{vip}:81")
    # the proxy only knows healthy endpoints: the dead one's own address passes through
    d = explain(h, client.pid, f"127.0.0.1:{down}")
    assert d["captured"] and d["rule"] == "c" and d["outcome"] == "passthrough", d

    r = h.cli("service", "remove", "api", "--endpoint", f"127.0.0.1:{up}")
    assert r.returncode == 0, r.stderr
    n = explain(h, client.pid, f"{vip}:81")
    assert n["captured"] and n["outcome"] == "no-endpoint" and "NoEndpoint" in n["verdict"], n
    assert "no healthy endpoint" in n["verdict"]
    assert [c["in_rotation"] for c in n["candidates"]] == [False]
    assert not client.connect(vip, 81)["ok"]  # the proxy resets it

    # passive ejection, as the workers report it
    dead = free_port()
    while dead in (up, down):
        dead = free_port()
    r = h.cli("service", "add", "flaky", "--port", "82", "--lb", "round-robin",
              "--endpoint", f"127.0.0.1:{up}", "--endpoint", f"127.0.0.1:{dead}",
              "--health", "none", "--eject-after", "1", "--eject-for", "60")
    assert r.returncode == 0, r.stderr
    flaky = h.service("flaky")["vip"]

    def ejected() -> dict[str, Any] | None:
        assert client.connect(flaky, 82)["reply"] == "up"  # failover hides the dead one
        f = explain(h, client.pid, f"{flaky}:82")
        return f if any(c["ejected_for"] > 0 for c in f["candidates"]) else None

    f = wait_for("the dead endpoint ejected", ejected, timeout=10)
    by_addr = {c["addr"]: c for c in f["candidates"]}
    assert by_addr[f"127.0.0.1:{dead}"]["ejected_for"] > 30
    assert not by_addr[f"127.0.0.1:{dead}"]["in_rotation"]
    assert by_addr[f"127.0.0.1:{up}"]["in_rotation"] and by_addr[f"127.0.0.1:{up}"]["healthy"]
    assert f["verdict"].endswith("round-robin over 1 healthy endpoint, 1 ejected"), f["verdict"]
    assert any(s.startswith("outlier: 1 ejected") for s in f["steps"]), f["steps"]
    explain_table(h, client.pid, f"{flaky}:82")

    h.call("service.add", name="empty")  # no endpoint at all, no service port
    vip2 = h.service("empty")["vip"]
    m = explain(h, client.pid, f"{vip2}:8080")
    assert m["outcome"] == "no-endpoint" and m["candidates"] == []
    assert "no endpoint on port 8080" in m["verdict"], m["verdict"]


def test_proxy_down_fail_closed_refuses_fail_open_passes(make_host, backend: str) -> None:
    h = make_host(backend, restart_backoff=8.0)
    h.start()
    port = free_port()
    h.server("static", port)
    r = h.cli("service", "add", "db", "--port", "5432", "--endpoint", f"127.0.0.1:{port}",
              "--fail-closed")
    assert r.returncode == 0, r.stderr
    other = free_port()
    while other == port:
        other = free_port()
    h.server("other", other)
    h.call("service.add", name="web", endpoints=[f"127.0.0.1:{other}"], patch={"port": 80})
    db, web = h.service("db")["vip"], h.service("web")["vip"]
    client = h.probe(service="client")
    e = explain(h, client.pid, f"{db}:5432")
    assert e["captured"] and e["service"]["fail_mode"] == "fail-closed"
    assert e["steps"][-1] == "if the proxy is not ready: refused (fail-closed)"
    assert client.connect(db, 5432)["reply"] == "static"

    for w in h.status()["workers"]:
        subprocess.run(["kill", "-KILL", str(w["pid"])], check=True)
    wait_for("not ready", lambda: not h.status()["ready"], timeout=2)
    c = explain(h, client.pid, f"{db}:5432")
    assert not c["captured"] and c["outcome"] == "refused" and not c["ready"], c
    assert c["verdict"].startswith(f"refused: the proxy is not ready and service db is "
                                   f"fail-closed; {backend} refuses the connect"), c["verdict"]
    assert not client.connect(db, 5432)["ok"]
    o = explain(h, client.pid, f"{web}:80")
    r2 = client.connect(web, 80)
    if backend == "ebpf":  # a plain TCP service that fails open: the kernel balances it
        assert o["outcome"] == "kernel" and "fallback" in o["steps"][-1], o
        assert o["verdict"].startswith("kernel path: balanced in the kernel"), o["verdict"]
        assert r2["ok"] and r2["reply"] == "other", r2
    else:
        assert o["outcome"] == "direct" and "fails open" in o["verdict"], o
        assert o["verdict"].startswith("not captured: the proxy is not ready"), o["verdict"]
        assert "needs the eBPF capture backend" in " ".join(o["steps"]), o["steps"]
        assert not r2["ok"] and r2["errno"] == errno.ECONNREFUSED, r2  # straight to the VIP
    explain_table(h, client.pid, f"{db}:5432")


def test_bad_input_is_one_line_naming_the_fix(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    h.call("service.add", name="web", patch={"port": 80})
    client = h.probe(service="client")
    cases = [
        ([str(dead_pid()), "127.0.0.1:80"], 64, "no process with PID"),
        (["0", "127.0.0.1:80"], 64, "invalid PID"),
        ([str(client.pid), "nonsense"], 64, "invalid destination"),
        ([str(client.pid), "example.com:80"], 64, "neither an IPv4 address nor a name"),
        ([str(client.pid), "127.0.0.1:99999"], 64, "out of range"),
        ([str(client.pid), "nope.mesh:80"], 66, "does not resolve"),
    ]
    for args, code, text in cases:
        r = h.cli("explain", *args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0] and "hint:" in lines[0], (args, r.stderr)
    assert h.cli("explain", "12x", "127.0.0.1:80").returncode == 64  # click's own usage error
