"""Discovery across hosts: three namespaces, an agent each, one etcd cluster of three."""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fabric import Fabric
from tests.harness import Host, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

PORT = 18080
TTL = 3


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    f = Fabric(tmp_path, hosts=3, etcd_members=3, ttl=TTL)
    try:
        f.start()
        yield f
    finally:
        f.close()


def addrs(h: Host, service: str) -> set[str]:
    svc = {s["name"]: s for s in h.status()["services"]}.get(service)
    return {e["addr"] for e in svc["endpoints"]} if svc else set()


def web_everywhere(f: Fabric, lb: str = "round-robin", locality: bool = False) -> str:
    vip = f.hosts[0].call("service.add", name="web",
                          patch={"port": 80,
                                 "balancer": {"algorithm": lb, "locality": locality}})["vip"]
    for i, h in enumerate(f.hosts):
        h.server(f"web-{i}", PORT, service="web", host="0.0.0.0")
    want = {f"{f.ip(i)}:{PORT}" for i in range(len(f.hosts))}
    for h in f.hosts:
        wait_for(f"all endpoints at {h.tag}", lambda h=h: addrs(h, "web") == want, timeout=10)
    return str(vip)


def test_service_on_three_hosts_reachable_from_every_host(fabric: Fabric) -> None:
    t0 = time.monotonic()
    vip = web_everywhere(fabric)
    print(f"\nthree instances registered and seen by all three agents in "
          f"{time.monotonic() - t0:.2f}s")
    for h in fabric.hosts:
        assert h.service("web")["vip"] == vip  # one VIP, whichever host asks
        client = h.probe(service="client")
        seen = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(30))
        assert set(seen) == {"web-0", "web-1", "web-2"}, (h.tag, seen)
        # by name: glibc asks the namespace's resolver; the query is redirected to this agent
        assert client.ask(op="resolve", name="web.mesh")["addrs"] == [vip]
        by_name = collections.Counter(client.connect("web.mesh", 80)["reply"] for _ in range(30))
        assert set(by_name) == {"web-0", "web-1", "web-2"}, (h.tag, by_name)
        print(f"from {h.node}: by VIP {dict(sorted(seen.items()))}, "
              f"by name {dict(sorted(by_name.items()))}")


def test_registration_on_one_host_is_used_from_another(fabric: Fabric) -> None:
    h0, h1 = fabric.hosts[0], fabric.hosts[1]
    vip = h0.call("service.add", name="api",
                  patch={"port": 80,
                         "balancer": {"algorithm": "round-robin", "locality": False}})["vip"]
    client = h0.probe(service="client")
    t0 = time.monotonic()
    h1.server("api-1", PORT, service="api", host="0.0.0.0")
    wait_for("a call from h0 landing on h1's new instance",
             lambda: client.connect(vip, 80, timeout=1).get("reply") == "api-1",
             timeout=10, interval=0.01)
    elapsed = time.monotonic() - t0
    print(f"\nendpoint started on h1 -> used from h0 in {elapsed:.2f}s "
          f"(includes the 0.5 s port scan)")
    assert elapsed < 3


def test_dead_agent_endpoints_leave_every_host_within_ttl(fabric: Fabric) -> None:
    web_everywhere(fabric)
    gone = f"{fabric.ip(2)}:{PORT}"
    t0 = time.monotonic()
    fabric.hosts[2].kill()
    for h in fabric.hosts[:2]:
        wait_for(f"{gone} gone at {h.tag}", lambda h=h: gone not in addrs(h, "web"),
                 timeout=TTL + 5)
    elapsed = time.monotonic() - t0
    print(f"\nagent SIGKILLed -> its endpoints gone on both other hosts in {elapsed:.2f}s "
          f"(lease TTL {TTL}s)")
    assert elapsed <= TTL + 2
    client = fabric.hosts[0].probe(service="client")
    seen = {client.connect(fabric.hosts[0].service("web")["vip"], 80)["reply"]
            for _ in range(10)}
    assert seen == {"web-0", "web-1"}
    # A new agent re-adopts the instance that kept running and registers it again, under
    # its own lease (the old one expired with the killed agent).
    t0 = time.monotonic()
    fabric.hosts[2].start()
    for h in fabric.hosts:
        wait_for(f"{gone} back at {h.tag}", lambda h=h: gone in addrs(h, "web"), timeout=10)
    print(f"restarted agent: its instance back on every host in {time.monotonic() - t0:.2f}s")


def test_instance_exit_removes_its_endpoint_everywhere_at_once(fabric: Fabric) -> None:
    web_everywhere(fabric)
    victim = fabric.hosts[1].procs[-1]
    gone = f"{fabric.ip(1)}:{PORT}"
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    for h in fabric.hosts:
        wait_for(f"{gone} gone at {h.tag}", lambda h=h: gone not in addrs(h, "web"), timeout=3)
    elapsed = time.monotonic() - t0
    print(f"\ninstance killed -> endpoint gone on all three hosts in {elapsed:.2f}s")
    assert elapsed < 1.5


def test_etcd_members_restarted_one_at_a_time_lose_no_calls(fabric: Fabric) -> None:
    vip = web_everywhere(fabric)
    client = fabric.hosts[0].probe(service="client")
    results: list[dict] = []
    stop = threading.Event()

    def call_forever() -> None:
        while not stop.is_set():
            results.append(client.connect(vip, 80, timeout=2))

    caller = threading.Thread(target=call_forever)
    caller.start()
    try:
        for i in range(3):
            fabric.restart_etcd_member(i)  # returns once the member is healthy again
    finally:
        stop.set()
        caller.join(10)
    failed = [r for r in results if not r["ok"]]
    print(f"\n{len(results)} calls during three member restarts, {len(failed)} failed")
    assert len(results) > 50 and not failed, failed[:3]
    want = {f"{fabric.ip(i)}:{PORT}" for i in range(3)}
    for h in fabric.hosts:
        assert addrs(h, "web") == want  # nothing was lost meanwhile
        wait_for(f"{h.tag} reconnected to etcd",
                 lambda h=h: h.status()["registry"]["connected"], timeout=10)


def test_locality_keeps_calls_on_the_host_then_spills_over(fabric: Fabric) -> None:
    vip = web_everywhere(fabric, lb="p2c-ewma", locality=True)  # the defaults
    h1 = fabric.hosts[1]
    client = h1.probe(service="client")
    local = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(20))
    assert local == {"web-1": 20}  # idle local instance: no reason to cross hosts
    h1.procs[-2].kill()  # the web-1 instance (the probe is the last process)
    gone = f"{fabric.ip(1)}:{PORT}"
    wait_for("web-1 gone at h1", lambda: gone not in addrs(h1, "web"), timeout=3)
    spilled = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(20))
    assert sum(spilled.values()) == 20 and set(spilled) <= {"web-0", "web-2"}, spilled
    print(f"\nlocality from h1: {dict(local)} while local, then {dict(spilled)}")


def test_an_apply_on_one_host_takes_effect_and_is_reported_everywhere(fabric: Fabric) -> None:
    """Apply a Service change on host 0, 50 times: every host's agent reports it runs it
    (through the registry), and a client on the farthest host reaches the new port. Prints
    apply-to-effect latency: from the apply call to the last host's report."""
    vip = web_everywhere(fabric)
    h0, others = fabric.hosts[0], fabric.hosts[1:]
    nodes = {h.node for h in fabric.hosts}
    took: list[float] = []
    for i in range(50):
        port = 80 + i % 2 + 1  # 81, 82, 81, ...: every apply is a change
        doc = {"kind": "Service", "name": "web",
               "spec": {"port": port, "balancer": {"algorithm": "round-robin"}}}
        t0 = time.monotonic()
        rev = h0.call("apply", docs=[doc])["results"][0]["version"]

        def converged(rev: int = rev) -> bool:
            hosts = {r["node"]: r for r in h0.call("hosts")["hosts"]}
            return set(hosts) == nodes and all(
                hosts[h.node]["applied_revision"] >= rev for h in others)

        wait_for(f"apply {i} reported by every host", converged, timeout=10, interval=0.002)
        took.append(time.monotonic() - t0)
        if i % 10 == 0:  # the report is not just words: the far host routes the new port
            client = others[-1].probe(service="client")
            reply = client.connect(vip, port)
            client.proc.kill()
            assert reply["ok"], reply
    took.sort()
    print(f"\napply on one host -> applied by all 3 (reported), 50 applies: "
          f"p50 {took[24] * 1000:.1f} ms, p99 {took[-1] * 1000:.1f} ms, "
          f"max {max(took) * 1000:.1f} ms")
    out = h0.cli("get", "Service", "web", "--hosts")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert {r[0] for r in rows} == nodes and all(r[-1] == "yes" for r in rows), out.stdout


def test_each_host_checks_its_own_endpoints_and_shares_the_verdict(fabric: Fabric) -> None:
    """An endpoint is probed by its own host's agent only; the others read the verdict from
    the registry and route around it, without ever trying it."""
    vip = web_everywhere(fabric)
    h0, h2 = fabric.hosts[0], fabric.hosts[2]
    h0.call("service.add", name="web",
            patch={"health": {"kind": "tcp", "interval": 0.2, "timeout": 0.2,
                              "unhealthyThreshold": 1, "healthyThreshold": 1}})
    dead = f"{fabric.ip(2)}:{PORT + 1}"  # nothing listens there (yet)
    h2.call("service.add", name="web", endpoints=[dead])

    def verdict(h: Host) -> dict[str, object]:
        eps = {e["addr"]: e for e in h.service("web")["endpoints"]}
        return dict(eps[dead]["health"]) if dead in eps else {}

    wait_for("h0 reads h2's verdict", lambda: verdict(h0).get("healthy") is False, timeout=10)
    assert verdict(h0)["reason"] == "checked by h2"  # h0 never probed it
    assert "tcp connect failed" in str(verdict(h2)["reason"])
    client = h0.probe(service="client")
    replies = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(12))
    assert set(replies) == {"web-0", "web-1", "web-2"}
    assert h0.service("web")["counters"]["connect_errors"] == 0  # never tried
    h2.server("late", PORT + 1, service=None, host="0.0.0.0")
    wait_for("h0 reads the recovery", lambda: verdict(h0).get("healthy") is True, timeout=10)
    replies = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(16))
    assert set(replies) == {"web-0", "web-1", "web-2", "late"}
