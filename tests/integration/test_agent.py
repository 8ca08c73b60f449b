"""The foundation end to end, on both capture backends: an agent in its own namespace, real
kernel capture, real proxy workers, real processes enrolled through the CLI."""

from __future__ import annotations

import collections
import errno
import signal
import subprocess

import pytest

from tests.harness import Host, free_port, kernel_leftovers, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def three_instances(h: Host, service: str = "web", port: int = 80) -> tuple[str, list[int]]:
    # round robin: these tests assert rotation (p2c-ewma, the default, is tested on its own)
    vip = h.call("service.add", name=service,
                 patch={"port": port, "balancer": {"algorithm": "round-robin"}})["vip"]
    ports = sorted({free_port() for _ in range(3)})
    while len(ports) < 3:
        ports = sorted({*ports, free_port()})
    for i, p in enumerate(ports):
        h.server(f"instance-{i}", p, service=service)
    h.wait_endpoints(service, {f"127.0.0.1:{p}" for p in ports})
    return vip, ports


def test_vip_lands_on_every_instance_in_turn(make_host, backend: str) -> None:
    h = make_host(backend, workers=1)  # one worker: one round-robin cursor, a strict turn
    h.start()
    vip, _ = three_instances(h)
    client = h.probe(service="client")
    replies = [client.connect(vip, 80) for _ in range(30)]
    assert all(r["ok"] for r in replies), replies
    names = [r["reply"] for r in replies]
    assert collections.Counter(names) == {"instance-0": 10, "instance-1": 10, "instance-2": 10}
    for i in range(0, 30, 3):  # every window of three calls visits all three instances
        assert len(set(names[i:i + 3])) == 3, names
    counters = h.service("web")["counters"]
    assert counters["connections"] == 30
    assert counters["connect_errors"] == 0


def test_spread_with_several_workers_and_v4_mapped(make_host, backend: str) -> None:
    h = make_host(backend, workers=2)
    h.start()
    vip, _ = three_instances(h)
    client = h.probe(service="client")
    names = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(60))
    assert set(names) == {"instance-0", "instance-1", "instance-2"}
    assert min(names.values()) >= 10, names
    if backend == "ebpf":  # an AF_INET6 socket dialing ::ffff:VIP goes through connect6
        r = client.connect(vip, 80, v6=True)
        assert r["ok"] and r["reply"].startswith("instance-"), r


def test_only_enrolled_processes_and_mesh_destinations_are_captured(make_host,
                                                                   backend: str) -> None:
    h = make_host(backend)
    h.start()
    vip, ports = three_instances(h)
    outsider = h.probe()  # same namespace, not enrolled
    r = outsider.connect(vip, 80)
    assert not r["ok"] and r["errno"] == errno.ECONNREFUSED, r  # nothing listens on a VIP
    r = outsider.connect("127.0.0.1", ports[0])
    assert r["ok"] and r["reply"] == "instance-0"
    plain = free_port()
    h.server("not-in-mesh", plain)  # a listener that is no endpoint of anything
    client = h.probe(service="client")
    before = h.status()
    r = client.connect("127.0.0.1", plain)
    assert r["ok"] and r["reply"] == "not-in-mesh", r
    after = h.status()
    # untouched: the proxy saw nothing (no connection counted anywhere, nothing unrouted)
    assert after["proxy"] == before["proxy"]
    assert sum(s["counters"].get("connections", 0) for s in after["services"]) == \
        sum(s["counters"].get("connections", 0) for s in before["services"])


def test_bytes_intact_both_ways_with_half_close(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    vip = h.call("service.add", name="bulk", patch={"port": 9000})["vip"]
    port = free_port()
    h.bulk_server(port, service="bulk")
    h.wait_endpoints("bulk", {f"127.0.0.1:{port}"})
    client = h.probe(service="client")
    up, down = 48 << 20, 32 << 20
    r = client.ask(op="bulk", host=vip, port=9000, up=up, down=down, timeout=60)
    assert r["ok"], r
    assert r["server_hash_ok"], "bytes client -> server corrupted"
    assert r["down_bytes"] == down and r["down_hash_ok"], "bytes server -> client corrupted"
    c = h.service("bulk")["counters"]
    assert c["bytes_up"] == up
    assert c["bytes_down"] == down + 65  # the 64-hex-digit hash line, then the stream


def test_unenroll_stops_capture_for_new_connections(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    vip, _ = three_instances(h)
    client = h.probe(service="client")
    assert client.connect(vip, 80)["ok"]
    assert h.cli("unenroll", str(client.pid)).returncode == 0
    r = client.connect(vip, 80)
    assert not r["ok"] and r["errno"] == errno.ECONNREFUSED, r
    assert client.pid not in [e["pid"] for e in h.status()["enrolled"]]


def test_uninstall_leaves_nothing_behind(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    vip, ports = three_instances(h)
    client = h.probe(service="client")
    assert client.connect(vip, 80)["ok"]
    assert kernel_leftovers(h), "the agent should have created kernel objects"
    done = h.uninstall()
    assert done.returncode == 0 and "removed" in done.stdout, done
    assert kernel_leftovers(h) == []
    # the apps run on, uncaptured: a direct connection still works, a VIP is refused
    assert client.connect("127.0.0.1", ports[1])["reply"] == "instance-1"
    assert client.connect(vip, 80)["errno"] == errno.ECONNREFUSED


def test_sigkilled_agent_restarts_and_serves_again(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    vip, _ = three_instances(h)
    client = h.probe(service="client")
    assert client.connect(vip, 80)["ok"]
    h.kill()
    assert kernel_leftovers(h), "a SIGKILLed agent leaves its kernel objects"
    h.start()  # adopts them, then serves with the persisted registry and enrollments
    assert h.service("web")["vip"] == vip
    assert len(h.service("web")["endpoints"]) == 3
    names = {client.connect(vip, 80)["reply"] for _ in range(6)}
    assert names == {"instance-0", "instance-1", "instance-2"}
    h.kill()
    assert h.uninstall().returncode == 0  # no agent runs: one starts only to remove it all
    assert kernel_leftovers(h) == []


def test_dead_workers_fall_back_then_recover(make_host, backend: str) -> None:
    h = make_host(backend, restart_backoff=8.0)
    h.start()
    vip, ports = three_instances(h)
    client = h.probe(service="client")
    assert client.connect(vip, 80)["ok"]
    for w in h.status()["workers"]:
        subprocess.run(["kill", "-KILL", str(w["pid"])], check=True)
    # the agent notices at once (the workers' control sockets close) and falls back
    wait_for("fall back", lambda: not h.status()["ready"], timeout=2)
    assert not any(w["alive"] for w in h.status()["workers"])
    # a known endpoint passes straight through to itself...
    r = client.connect("127.0.0.1", ports[2])
    assert r["ok"] and r["reply"] == "instance-2", r
    if backend == "ebpf":
        # ...and the VIP of a plain TCP service that fails open is balanced in the kernel
        names = {client.connect(vip, 80)["reply"] for _ in range(6)}
        assert names == {"instance-0", "instance-1", "instance-2"}
    else:  # ...and without a kernel path a VIP is refused at once, never hangs
        r = client.connect(vip, 80, timeout=5)
        assert not r["ok"] and r["errno"] == errno.ECONNREFUSED and r["seconds"] < 1.0, r
    wait_for("workers back", lambda: h.status()["ready"], timeout=30)
    names = {client.connect(vip, 80)["reply"] for _ in range(6)}
    assert names == {"instance-0", "instance-1", "instance-2"}


def test_instance_exit_removes_its_endpoint(make_host, backend: str) -> None:
    h = make_host(backend)
    h.start()
    h.call("service.add", name="web", patch={"port": 80})
    p1, p2 = free_port(), free_port()
    s1 = h.server("a", p1, service="web")
    h.server("b", p2, service="web")
    h.wait_endpoints("web", {f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"})
    s1.send_signal(signal.SIGKILL)
    h.wait_endpoints("web", {f"127.0.0.1:{p2}"}, timeout=5)
    vip = h.service("web")["vip"]
    client = h.probe(service="client")
    assert {client.connect(vip, 80)["reply"] for _ in range(4)} == {"b"}


def test_service_names_resolve_for_enrolled_processes(make_host, backend: str) -> None:
    import dnslib

    h = make_host(backend)
    h.start()
    vip, _ = three_instances(h)
    client = h.probe(service="client")
    q = dnslib.DNSRecord.question("web.mesh", "A")
    r = client.ask(op="dns", host="127.0.0.53", port=53, query=q.pack().hex())
    assert r["ok"], r
    assert r["from"] == ["127.0.0.53", 53]  # the reply looks like it came from who was asked
    answer = dnslib.DNSRecord.parse(bytes.fromhex(r["reply"]))
    assert [str(rr.rdata) for rr in answer.rr] == [vip]
    q = dnslib.DNSRecord.question("nope.mesh", "A")
    r = client.ask(op="dns", host="127.0.0.53", port=53, query=q.pack().hex())
    assert dnslib.DNSRecord.parse(bytes.fromhex(r["reply"])).header.rcode == dnslib.RCODE.NXDOMAIN
    if backend == "ebpf":  # through glibc: the host's resolv.conf nameserver, redirected
        assert client.ask(op="resolve", name="web.mesh") == {
            "ok": True, "addrs": [vip], "seconds": pytest.approx(0, abs=2)}
        replies = {client.connect("web.mesh", 80)["reply"] for _ in range(6)}
        assert replies and replies <= {"instance-0", "instance-1", "instance-2"}, replies
    outsider = h.probe()  # not enrolled: its queries are not redirected
    r = outsider.ask(op="dns", host="127.0.0.53", port=53, query=q.pack().hex())
    assert not r["ok"]
    assert h.status()["dns"]["counters"]["answers"] >= 1
