"""DNS for enrolled processes through both capture backends, each test in its own network
namespace (only `lo`), cgroup subtree and pin dir (capture_fixtures.py), torn down even when
the test fails.

Roles: the agent's names (MeshNames: the DNS server and the capture switch) on a private
asyncio loop in a thread of the test process, which lives in the test namespace; a fake
upstream resolver on 127.0.0.1 (tests/fake_dns.py: no real resolver is ever asked); clients as
processes in the apps cgroup (enrolled), in a sibling cgroup, or in the test's own cgroup,
asking "the resolver" 127.0.0.53:53, where nothing listens: only a redirect can answer.
glibc clients get that resolver from a private /etc/resolv.conf, bind-mounted in a mount
namespace of their own (`unshare --mount`): the host's file is never touched.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import statistics
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshnode.agent.names import MeshNames
from meshnode.capture import undo_functions
from meshnode.capture.ebpf import BpfCapture
from meshnode.host.ledger import Ledger
from tests.fake_dns import FakeUpstream
from tests.integration.capture_fixtures import (
    PY,
    CaptureEnv,
    bpf_leftovers,
    capture_env_fixture,  # noqa: F401 (the capture_env fixture)
    free_port,
    iptables_leftovers,
    netns_fixture,  # noqa: F401 (the netns fixture)
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(120),
    pytest.mark.parametrize("capture_env", ["ebpf", "iptables", "iptables-legacy"],
                            indirect=True),
]

T = TypeVar("T")
VIP = IPv4Address("127.240.0.7")
SERVICES = {"web": VIP}
RESOLVER = "127.0.0.53"  # nothing listens here in the test namespace
OUTSIDE_NAME, OUTSIDE_IP = "example.org", "192.0.2.10"  # answered by the fake upstream only

# A DNS client: joins a cgroup (before any socket exists: sockets keep their cgroup), asks
# one name COUNT times, prints JSON. Modes: sendto (unconnected UDP), connect (connected UDP,
# like glibc), tcp, getaddrinfo (glibc with whatever /etc/resolv.conf it sees).
CLIENT = r"""
import json, os, socket, struct, sys, time
from dnslib import DNSRecord
cg, mode, server, port, name, count = sys.argv[1:7]
port, count = int(port), int(count)
if cg != "-":
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
def answer(data):
    r = DNSRecord.parse(data)
    return {"rcode": r.header.rcode, "answers": sorted(str(a.rdata) for a in r.rr)}
def once():
    q = DNSRecord.question(name, "A").pack()
    if mode == "getaddrinfo":
        infos = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
        return {"answers": sorted({i[4][0] for i in infos})}
    if mode == "tcp":
        s = socket.create_connection((server, port), timeout=3)
        s.sendall(struct.pack("!H", len(q)) + q)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        out = answer(buf[2:])
        out["peer"] = list(s.getpeername())
        s.close()
        return out
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    if mode == "connect":
        s.connect((server, port))
        s.send(q)
    else:
        s.sendto(q, (server, port))
    data, src = s.recvfrom(4096)
    out = answer(data)
    out["from"] = list(src)
    if mode == "connect":
        out["peer"] = list(s.getpeername())
    s.close()
    return out
times = []
try:
    for _ in range(count):
        t = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t)
    out["us"] = [round(x * 1e6, 1) for x in times]
except socket.timeout:
    out = {"timeout": True}
except OSError as e:
    out = {"errno": e.errno, "error": str(e)}
print(json.dumps(out))
"""


class LoopThread:
    """A private asyncio loop in a thread of the test process: the agent's loop stand-in.
    The thread inherits the test's network namespace (it is created after entering it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class DnsWorld:
    env: CaptureEnv
    loop: LoopThread
    upstream: FakeUpstream
    names: MeshNames
    resolv_conf: Path
    started: list[MeshNames] = field(default_factory=list)

    def start(self) -> None:
        self.loop.run(self.names.start())
        self.started.append(self.names)

    def stop(self) -> None:
        self.loop.run(self.names.stop())
        self.started.remove(self.names)

    def ask(self, cg: Path | None, mode: str = "sendto", name: str = "web.mesh",
            server: str = RESOLVER, port: int = 53, count: int = 1) -> dict[str, Any]:
        argv = [PY, "-c", CLIENT, str(cg) if cg else "-", mode, server, str(port), name,
                str(count)]
        if mode == "getaddrinfo":
            # A private resolv.conf, seen by this one process only.
            argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                    'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self.resolv_conf),
                    *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if "cannot change root filesystem propagation" in proc.stderr:
            pytest.skip("/ is not a mount point here (a chroot): no private resolv.conf")
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def kernel_stats(self) -> dict[str, int]:
        assert self.env.backend is not None
        return self.env.backend.stats()


@pytest.fixture
def dns(capture_env: CaptureEnv, tmp_path: Path) -> Iterator[DnsWorld]:
    """Capture installed (DNS redirect off), the fake upstream up, the names not started."""
    env = capture_env
    backend = env.make_backend()
    backend.install()
    loop = LoopThread()
    upstream = FakeUpstream(names={OUTSIDE_NAME: [OUTSIDE_IP]})
    try:
        loop.run(upstream.start())
        names = MeshNames(backend, SERVICES.get, port=free_port(), host="127.0.0.1",
                          upstreams=[str(upstream.upstream)])
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text(f"nameserver {RESOLVER}\noptions timeout:2 attempts:1\n")
        world = DnsWorld(env, loop, upstream, names, resolv_conf)
        try:
            yield world
        finally:
            # The agent's order: redirect off and server down before capture goes (the
            # capture_env fixture removes it after this).
            for started in list(world.started):
                loop.run(started.stop())
    finally:
        loop.run(upstream.stop())
        loop.close()


def leftovers(env: CaptureEnv) -> list[str]:
    return bpf_leftovers(env) if env.kind == "ebpf" else iptables_leftovers(env)


def test_enrolled_queries_get_the_vip_from_the_resolver_they_asked(dns: DnsWorld) -> None:
    dns.start()
    app = dns.env.app_service
    resolver = [RESOLVER, 53]
    assert dns.ask(app, "sendto") == {
        "rcode": 0, "answers": [str(VIP)], "from": resolver, "us": [pytest.approx(0, abs=2e6)]}
    connected = dns.ask(app, "connect")
    assert (connected["answers"], connected["from"], connected["peer"]) == (
        [str(VIP)], resolver, resolver)
    tcp = dns.ask(app, "tcp")
    assert (tcp["answers"], tcp["peer"]) == ([str(VIP)], resolver)
    assert dns.ask(app, "sendto", name="nope.mesh")["rcode"] == 3  # NXDOMAIN

    # Any other name: the agent forwards it to its upstream, and the answer comes back.
    outside = dns.ask(app, "connect", name=OUTSIDE_NAME)
    assert (outside["answers"], outside["from"]) == ([OUTSIDE_IP], resolver)
    assert dns.upstream.udp_queries == 1

    counters = dns.names.describe()["counters"]
    assert (counters["answers"], counters["nxdomain"], counters["forwarded"]) == (3, 1, 1)
    if isinstance(dns.env.backend, BpfCapture):
        assert dns.kernel_stats()["dns_redirected"] == 5


def test_getaddrinfo_in_an_enrolled_process_returns_the_vip(dns: DnsWorld) -> None:
    dns.start()
    app = dns.env.app_service
    # glibc connects a UDP socket to the nameserver, asks A and AAAA on it and drops any
    # answer whose source is not that nameserver: this passes only if replies are rewritten.
    assert dns.ask(app, "getaddrinfo")["answers"] == [str(VIP)]
    assert dns.ask(app, "getaddrinfo", name=OUTSIDE_NAME)["answers"] == [OUTSIDE_IP]
    assert dns.upstream.udp_queries >= 1


def test_processes_outside_the_apps_cgroup_are_not_redirected(dns: DnsWorld) -> None:
    dns.start()
    assert dns.ask(dns.env.app_service, "connect")["answers"] == [str(VIP)]
    # A sibling cgroup and the test's own: their query reaches 127.0.0.53:53 itself, where
    # nothing listens (a connected UDP socket learns that from the ICMP error at once).
    for cg in (dns.env.other, None):
        assert dns.ask(cg, "connect")["errno"] == errno.ECONNREFUSED
        assert dns.ask(cg, "tcp")["errno"] == errno.ECONNREFUSED
    assert dns.names.describe()["counters"]["queries"] == 1


def test_dns_capture_off_redirects_nothing(dns: DnsWorld) -> None:
    app = dns.env.app_service
    # Installed, but the names never started: no redirect (and no server).
    assert dns.ask(app, "connect")["errno"] == errno.ECONNREFUSED
    dns.start()
    assert dns.ask(app, "connect")["answers"] == [str(VIP)]
    dns.stop()  # redirect off, then the server stops
    assert dns.ask(app, "connect")["errno"] == errno.ECONNREFUSED
    assert dns.ask(app, "tcp")["errno"] == errno.ECONNREFUSED
    # The switch works again after being off.
    dns.start()
    assert dns.ask(app, "sendto")["answers"] == [str(VIP)]


def test_a_server_on_the_dns_port_itself_is_left_alone(dns: DnsWorld) -> None:
    """A process that talks to the agent's port directly is answered normally, and its
    replies keep their real source (the reverse hooks only touch redirected sockets)."""
    dns.start()
    port = dns.names.server.port
    direct = dns.ask(dns.env.app_service, "connect", server="127.0.0.1", port=port)
    assert (direct["answers"], direct["from"], direct["peer"]) == (
        [str(VIP)], ["127.0.0.1", port], ["127.0.0.1", port])


def test_remove_leaves_nothing(dns: DnsWorld) -> None:
    dns.start()
    assert dns.ask(dns.env.app_service)["answers"] == [str(VIP)]
    assert leftovers(dns.env)
    dns.stop()
    backend = dns.env.backend
    assert backend is not None
    backend.remove()
    dns.env.backend = None
    assert leftovers(dns.env) == []
    assert Ledger(dns.env.ledger_path).entries() == []


def test_sweep_after_crash_leaves_nothing(dns: DnsWorld) -> None:
    dns.start()
    assert dns.ask(dns.env.app_service)["answers"] == [str(VIP)]
    # The agent dies with DNS on: its sockets close, but nothing turns the redirect off or
    # removes capture; only the ledger remains to go by.
    dns.loop.run(dns.names.server.stop())
    dns.started.clear()
    dns.env.backend = None
    gc.collect()
    assert leftovers(dns.env)
    assert Ledger(dns.env.ledger_path).undo_all(undo_functions()) == []
    assert leftovers(dns.env) == []
    assert Ledger(dns.env.ledger_path).entries() == []
    assert dns.ask(dns.env.app_service, "connect")["errno"] == errno.ECONNREFUSED


@pytest.mark.skipif(not os.environ.get("MESHNODE_DNS_BENCH"),
                    reason="opt-in measurement: MESHNODE_DNS_BENCH=1, run with -s")
def test_query_latency(dns: DnsWorld) -> None:
    """Median per-query time of one client, 500 queries each: through the redirect to the
    agent (a mesh name; a forwarded name) against the fake upstream asked directly."""
    dns.start()
    app, n = dns.env.app_service, 500
    runs = {
        "mesh name via redirect": dns.ask(app, "connect", count=n),
        "forwarded via redirect": dns.ask(app, "connect", name=OUTSIDE_NAME, count=n),
        "upstream directly": dns.ask(app, "connect", name=OUTSIDE_NAME, server="127.0.0.1",
                                     port=dns.upstream.port, count=n),
        "agent directly (no capture)": dns.ask(None, "connect", server="127.0.0.1",
                                               port=dns.names.server.port, count=n),
    }
    print(f"\n[{dns.env.kind}] per-query µs, median / p90 over {n}:")
    for what, out in runs.items():
        us = out["us"]
        print(f"  {what:30s} {statistics.median(us):8.1f} / "
              f"{statistics.quantiles(us, n=10)[-1]:8.1f}")
