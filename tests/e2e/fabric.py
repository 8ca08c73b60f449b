"""Several hosts on one machine: network namespaces on a bridge in 198.19.0.0/16, each with
its own agent, all sharing one etcd cluster.

The bridge and the etcd members live in a "switch" namespace of their own, so the machine's
root namespace gains nothing (no interface, no route). Host i has eth0 = 198.19.K.(10+i)/24;
the switch has 198.19.K.254, where the etcd members listen. K is random per fabric.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns
from pyroute2.netns import popns, pushns

from tests.etcd_cluster import EtcdCluster
from tests.harness import Host, wait_for


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread (and the processes it starts) in namespace `ns`."""
    pushns(ns)
    try:
        yield
    finally:
        popns()


class Fabric:
    def __init__(self, tmp: Path, hosts: int = 3, backend: str = "ebpf",
                 etcd_members: int = 3, ttl: int = 3, agent_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.tag = secrets.token_hex(2)
        self.subnet = 1 + secrets.randbelow(250)
        self.switch = f"mn-{self.tag}-sw"
        self.names: list[str] = []
        self.hosts: list[Host] = []
        self.etcd: EtcdCluster | None = None
        try:
            self._build(hosts)
            with inside(self.switch):
                self.etcd = EtcdCluster(tmp / "etcd", members=etcd_members,
                                        host=self.switch_ip)
                self.etcd.start()
            registry = "etcd://" + ",".join(u.removeprefix("http://")
                                            for u in self.etcd.client_urls)
            for i in range(hosts):
                self.hosts.append(Host(
                    tmp / f"h{i}", backend, netns=self.names[i + 1],
                    agent_args=("--registry", registry, "--host-address", self.ip(i),
                                "--node", f"h{i}", "--registry-ttl", str(ttl), *agent_args)))
        except BaseException:
            self.close()
            raise

    @property
    def switch_ip(self) -> str:
        return f"198.19.{self.subnet}.254"

    def ip(self, i: int) -> str:
        return f"198.19.{self.subnet}.{10 + i}"

    def _build(self, n: int) -> None:
        netns.create(self.switch)
        self.names.append(self.switch)
        with NetNS(self.switch) as sw:
            sw.link("set", index=sw.link_lookup(ifname="lo")[0], state="up")
            sw.link("add", ifname="br0", kind="bridge")
            br = sw.link_lookup(ifname="br0")[0]
            sw.addr("add", index=br, address=self.switch_ip, prefixlen=24)
            sw.link("set", index=br, state="up")
        for i in range(n):
            name = f"mn-{self.tag}-h{i}"
            netns.create(name)
            self.names.append(name)
            with NetNS(self.switch) as sw:
                sw.link("add", ifname=f"p{i}", kind="veth",
                        peer={"ifname": "eth0", "net_ns_fd": name})
                port = sw.link_lookup(ifname=f"p{i}")[0]
                sw.link("set", index=port, master=sw.link_lookup(ifname="br0")[0], state="up")
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                eth = ns.link_lookup(ifname="eth0")[0]
                ns.addr("add", index=eth, address=self.ip(i), prefixlen=24)
                ns.link("set", index=eth, state="up")

    def start(self) -> list[float]:
        return [h.start() for h in self.hosts]

    def start_with_ca(self, trust_domain: str = "e2e.test", *ca_args: str) -> None:
        """Host 0 holds the mesh CA (`meshnode ca init`); the others join it with a token
        each, as an operator would; returns once every host holds its node identity."""
        h0 = self.hosts[0]
        h0.start()
        done = h0.cli("ca", "init", "--trust-domain", trust_domain, *ca_args)
        assert done.returncode == 0, done.stderr
        for h in self.hosts[1:]:
            token = h0.cli("ca", "token", "create", "--ttl", "10m")
            assert token.returncode == 0, token.stderr
            h.agent_args = (*h.agent_args, "--join-token", token.stdout.strip())
            h.start()
        for h in self.hosts:
            wait_for(f"{h.node}'s node identity", lambda h=h: h.status()["identity"]["ready"],
                     timeout=30)

    def restart_etcd_member(self, i: int) -> None:
        assert self.etcd is not None
        with inside(self.switch):
            self.etcd.stop_member(i)
            self.etcd.start_member(i)

    def close(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.close()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.close()
        for name in reversed(self.names):
            with contextlib.suppress(OSError):
                netns.remove(name)

    def status(self) -> list[dict[str, Any]]:
        return [h.status() for h in self.hosts]
