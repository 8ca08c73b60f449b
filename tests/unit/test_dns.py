"""The agent's DNS server without root: the pure zone logic (A, SRV and their targets), then
the real server on 127.0.0.1 (port 0) with a fake `resolve` and `instances` and fake upstream
resolvers the test runs itself on 127.0.0.1. No real resolver is ever asked."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord

from meshnode import constants
from meshnode.agent.names import MeshNames, registry_instances, upstreams_for
from meshnode.bpf import maps
from meshnode.bpf.compile import render_source
from meshnode.capture.iptables import CHAIN_MAX, Chains, jump_rule, render_dns
from meshnode.discovery.dns import MeshDns
from meshnode.discovery.dns_upstream import Upstream, resolv_conf_upstreams
from meshnode.discovery.dns_zone import (
    Forward,
    MeshZone,
    Reply,
    SrvTarget,
    check_suffix,
    node_label,
    truncate,
)
from meshnode.discovery.registry import EndpointRecord, ServiceRecord
from meshnode.errors import ConflictError, UsageError
from meshnode.model import BalancerConfig, CaptureState, HostPort, ServicePolicy
from tests.fake_dns import LOCAL, fake_upstream

VIP = IPv4Address("127.240.0.7")
SERVICES = {"web": VIP, "db": IPv4Address("127.240.0.8")}
T = TypeVar("T")


# web's healthy endpoints as the agent's health view would give them; db has none healthy
WEB = [SrvTarget(0, HostPort.parse("127.0.0.1:8001"), 1, "node-a"),
       SrvTarget(1, HostPort.parse("198.18.0.2:8002"), 3, "node-b"),
       SrvTarget(2, HostPort.parse("198.18.1.3:8003"), 2, "node-c")]


def resolve(name: str) -> IPv4Address | None:
    return SERVICES.get(name)


def instances(name: str) -> list[SrvTarget]:
    return WEB if name == "web" else []


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(20):  # a hang fails the test instead of stalling the run
            return await coro

    return asyncio.run(bounded())


def query(name: str, qtype: str = "A", edns: int | None = None) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return q


def dead_udp_port() -> int:
    """A port nobody listens on (bound then closed): queries there are refused by ICMP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


# -- clients ---------------------------------------------------------------------------------

class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.got.put_nowait(data)


async def ask_udp(port: int, data: bytes, timeout: float = 5.0) -> bytes | None:
    """Send one datagram; the first answer, or None if none comes within `timeout`."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Client,
                                                           remote_addr=(LOCAL, port))
    try:
        transport.sendto(data)
        try:
            async with asyncio.timeout(timeout):
                return await proto.got.get()
        except TimeoutError:
            return None
    finally:
        transport.close()


async def ask_tcp(port: int, *messages: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        for m in messages:  # pipelined: all sent before any answer is read
            writer.write(struct.pack("!H", len(m)) + m)
        await writer.drain()
        out = []
        for _ in messages:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            out.append(await reader.readexactly(n))
        return out
    finally:
        writer.close()


@asynccontextmanager
async def serving(upstreams: tuple[Upstream, ...] = (), timeout: float = 1.0,
                  suffix: str = "mesh",
                  srv: list[SrvTarget] | None = None) -> AsyncIterator[MeshDns]:
    server = MeshDns(resolve, suffix, upstreams, LOCAL, 0, timeout=timeout,
                     instances=lambda name: srv or [] if name == "web" else [])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- the zone, pure ------------------------------------------------------------------------

@pytest.fixture
def zone() -> MeshZone:
    return MeshZone(resolve, "mesh", ttl=5, instances=instances)


def _reply(outcome: object) -> DNSRecord:
    assert isinstance(outcome, Reply), outcome
    return DNSRecord.parse(outcome.data)


def test_a_query_for_a_service_answers_its_vip(zone: MeshZone) -> None:
    q = query("Web.Mesh.")
    r = _reply(zone.respond(q.pack()))
    assert r.header.id == q.header.id and r.header.qr and r.header.aa
    assert r.header.rcode == RCODE.NOERROR
    assert [(str(a.rname), str(a.rdata), a.ttl) for a in r.rr] == [("Web.Mesh.", str(VIP), 5)]


def test_aaaa_and_other_types_of_a_service_have_no_data(zone: MeshZone) -> None:
    for qtype in ("AAAA", "MX", "TXT"):
        r = _reply(zone.respond(query("web.mesh", qtype).pack()))
        assert r.header.rcode == RCODE.NOERROR and r.rr == []
        assert [a.rtype for a in r.auth] == [QTYPE.SOA]


def test_unknown_service_is_nxdomain_with_the_zone_soa(zone: MeshZone) -> None:
    for name in ("nope.mesh", "a.web.mesh"):
        r = _reply(zone.respond(query(name).pack()))
        assert r.header.rcode == RCODE.NXDOMAIN and r.rr == []
        assert str(r.auth[0].rname) == "mesh." and r.auth[0].rdata.times[-1] == 5


def test_the_suffix_itself_exists(zone: MeshZone) -> None:
    r = _reply(zone.respond(query("mesh").pack()))
    assert r.header.rcode == RCODE.NOERROR and r.rr == []


def test_other_names_are_forwarded_unchanged(zone: MeshZone) -> None:
    for name in ("example.org", "meshx", "web.mesh.example.org"):
        data = query(name).pack()
        assert zone.respond(data) == Forward(data)


def test_edns_queries_get_an_edns_answer(zone: MeshZone) -> None:
    r = _reply(zone.respond(query("web.mesh", edns=4096).pack()))
    assert [a.rtype for a in r.ar] == [QTYPE.OPT]


def test_malformed_queries_get_formerr_or_nothing(zone: MeshZone) -> None:
    q = query("web.mesh")
    good = q.pack()
    assert zone.respond(b"") is None
    assert zone.respond(b"\x12\x34\x01") is None  # shorter than a header
    broken = _reply(zone.respond(good[:14]))  # header, then a cut question
    assert broken.header.id == q.header.id and broken.header.rcode == RCODE.FORMERR
    two = query("web.mesh")
    two.add_question(query("db.mesh").q)
    assert _reply(zone.respond(two.pack())).header.rcode == RCODE.FORMERR
    response = q.reply().pack()
    assert zone.respond(response) is None  # never answer an answer
    notify = query("web.mesh")
    notify.header.opcode = 4
    assert _reply(zone.respond(notify.pack())).header.rcode == RCODE.NOTIMP


def test_non_internet_class_is_refused(zone: MeshZone) -> None:
    q = query("web.mesh")
    q.q.qclass = 3  # CHAOS
    assert _reply(zone.respond(q.pack())).header.rcode == RCODE.REFUSED


@pytest.mark.parametrize("suffix,norm", [("mesh", "mesh"), (".Svc.Example.", "svc.example")])
def test_suffix_is_normalised(suffix: str, norm: str) -> None:
    assert check_suffix(suffix) == norm
    assert MeshZone(resolve, suffix).service_of(f"web.{norm}.") == "web"


@pytest.mark.parametrize("bad", ["", "a b", "-x", "x..y", "ünï"])
def test_bad_suffix_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        check_suffix(bad)


def test_truncate_keeps_header_and_question_only() -> None:
    full = query("web.mesh").reply()
    full.add_answer(*[RR("web.mesh", QTYPE.A, rdata=A(f"192.0.2.{i}")) for i in range(9)])
    cut = DNSRecord.parse(truncate(full.pack()))
    assert cut.header.tc and cut.header.id == full.header.id
    assert cut.rr == [] and cut.questions == full.questions


# -- SRV for clients that balance themselves ------------------------------------------------

def srv_rows(r: DNSRecord) -> list[tuple[int, int, int, str]]:
    return [(a.rdata.priority, a.rdata.weight, a.rdata.port, str(a.rdata.target))
            for a in r.rr if a.rtype == QTYPE.SRV]


def test_srv_lists_healthy_endpoints_with_port_weight_and_locality(zone: MeshZone) -> None:
    r = _reply(zone.respond(query("_web._tcp.mesh", "SRV").pack()))
    assert r.header.rcode == RCODE.NOERROR and r.header.aa
    assert srv_rows(r) == [(0, 1, 8001, "127-0-0-1.node-a.ep.mesh."),
                           (1, 3, 8002, "198-18-0-2.node-b.ep.mesh."),
                           (2, 2, 8003, "198-18-1-3.node-c.ep.mesh.")]
    assert {a.ttl for a in r.rr} == {5}
    # the targets' addresses come along, so a client needs no second query
    assert {(str(a.rname), str(a.rdata)) for a in r.ar} == {
        ("127-0-0-1.node-a.ep.mesh.", "127.0.0.1"), ("198-18-0-2.node-b.ep.mesh.", "198.18.0.2"),
        ("198-18-1-3.node-c.ep.mesh.", "198.18.1.3")}


def test_srv_targets_resolve_on_their_own(zone: MeshZone) -> None:
    for name, ip in (("127-0-0-1.node-a.ep.mesh", "127.0.0.1"),
                     ("198-18-0-2.ep.mesh", "198.18.0.2")):  # an endpoint without a node name
        r = _reply(zone.respond(query(name).pack()))
        assert r.header.rcode == RCODE.NOERROR
        assert [str(a.rdata) for a in r.rr] == [ip]
    nodata = _reply(zone.respond(query("127-0-0-1.node-a.ep.mesh", "AAAA").pack()))
    assert nodata.header.rcode == RCODE.NOERROR and nodata.rr == []
    for bad in ("1-2-3.ep.mesh", "300-0-0-1.ep.mesh", "127-0-0-1.a.b.ep.mesh",
                "127-0-0-1.-x.ep.mesh", "ep.mesh.example", "x.ep.mesh"):
        outcome = zone.respond(query(bad).pack())
        if bad.endswith(".example"):
            assert isinstance(outcome, Forward)
        else:
            assert _reply(outcome).header.rcode == RCODE.NXDOMAIN, bad


def test_srv_of_a_service_without_healthy_endpoints_is_nodata(zone: MeshZone) -> None:
    r = _reply(zone.respond(query("_db._tcp.mesh", "SRV").pack()))
    assert r.header.rcode == RCODE.NOERROR and r.rr == [] and r.ar == []
    assert [a.rtype for a in r.auth] == [QTYPE.SOA]  # cacheable for the TTL, then asked again


def test_srv_of_unknown_services_or_protocols_is_nxdomain(zone: MeshZone) -> None:
    for name in ("_nope._tcp.mesh", "_web._udp.mesh", "_web.mesh", "__tcp.mesh",
                 "_web._tcp.x.mesh"):
        r = _reply(zone.respond(query(name, "SRV").pack()))
        assert r.header.rcode == RCODE.NXDOMAIN and r.rr == [], name


def test_other_types_of_the_srv_name_have_no_data(zone: MeshZone) -> None:
    r = _reply(zone.respond(query("_web._tcp.mesh", "A").pack()))
    assert r.header.rcode == RCODE.NOERROR and r.rr == []
    anything = _reply(zone.respond(query("_web._tcp.mesh", "ANY").pack()))
    assert len(srv_rows(anything)) == 3
    plain = _reply(zone.respond(query("web.mesh", "SRV").pack()))  # SRV lives under _web._tcp
    assert plain.header.rcode == RCODE.NOERROR and plain.rr == []


def test_srv_answer_to_edns_query_ends_with_opt(zone: MeshZone) -> None:
    r = _reply(zone.respond(query("_web._tcp.mesh", "SRV", edns=1232).pack()))
    assert [a.rtype for a in r.ar] == [QTYPE.A] * 3 + [QTYPE.OPT]


def test_two_ports_of_one_address_share_one_target_record() -> None:
    twins = [SrvTarget(0, HostPort.parse("127.0.0.1:8001"), 1, "n"),
             SrvTarget(0, HostPort.parse("127.0.0.1:8002"), 1, "n")]
    z = MeshZone(resolve, instances=lambda name: twins)
    r = _reply(z.respond(query("_web._tcp.mesh", "SRV").pack()))
    assert [row[2] for row in srv_rows(r)] == [8001, 8002]
    assert [str(a.rname) for a in r.ar] == ["127-0-0-1.n.ep.mesh."]


@pytest.mark.parametrize("node,label", [("vm-look", "vm-look"),
                                        ("Node_A.example", "node-a-example"),
                                        ("__", ""), ("x" * 70, "x" * 63)])
def test_node_names_become_one_dns_label(node: str, label: str) -> None:
    assert node_label(node) == label


def many(n: int) -> list[SrvTarget]:
    return [SrvTarget(0, HostPort.parse(f"198.18.{i // 200}.{i % 200 + 1}:9000"), 1, "node")
            for i in range(n)]


def test_srv_answer_too_long_for_udp_sheds_targets_then_truncates() -> None:
    async def scenario() -> tuple[DNSRecord, DNSRecord, DNSRecord, DNSRecord, dict[str, int]]:
        async with serving(srv=many(10)) as server:
            q = query("_web._tcp.mesh", "SRV")
            plain = await ask_udp(server.port, q.pack())
            roomy = await ask_udp(server.port, query("_web._tcp.mesh", "SRV", 1232).pack())
        async with serving(srv=many(60)) as server:
            cut = await ask_udp(server.port, q.pack())
            (whole,) = await ask_tcp(server.port, q.pack())
            stats = server.stats()
        assert plain and roomy and cut
        return (DNSRecord.parse(plain), DNSRecord.parse(roomy), DNSRecord.parse(cut),
                DNSRecord.parse(whole), stats)

    plain, roomy, cut, whole, stats = run(scenario())
    # 10 records fit in 512 bytes only without their targets' A records: no TC for that
    assert len(srv_rows(plain)) == 10 and plain.ar == [] and not plain.header.tc
    assert len(srv_rows(roomy)) == 10 and len(roomy.ar) == 11  # 10 A + OPT
    # 60 records do not fit at all: TC, and the whole answer over TCP
    assert cut.header.tc and cut.rr == []
    assert len(srv_rows(whole)) == 60 and len(whole.ar) == 60
    assert stats["truncated"] == 1


def test_registry_instances_are_healthy_endpoints_by_locality() -> None:
    def ep(addr: str, node: str, zone: str, weight: int = 1) -> EndpointRecord:
        return EndpointRecord(HostPort.parse(addr), "static", None, node, zone, weight)

    endpoints = frozenset({ep("127.0.0.1:8001", "here", "z1", 5),
                           ep("198.18.0.2:8002", "there", "z1"),
                           ep("198.18.1.3:8003", "far", "z2"),
                           ep("198.18.1.4:8004", "far", "z2")})  # failing its checks

    class Registry:
        def services(self) -> dict[str, ServiceRecord]:
            return {"web": ServiceRecord("web", 1, VIP, endpoints=endpoints),
                    "flat": ServiceRecord("flat", 2, VIP, endpoints=endpoints, policy=ServicePolicy(
                        balancer=BalancerConfig(locality=False)))}

    def healthy(service: str, addr: HostPort) -> bool:
        return addr.port != 8004

    found = registry_instances(Registry(), healthy, "here", "z1")  # type: ignore[arg-type]
    assert sorted(found("web")) == [
        SrvTarget(0, HostPort.parse("127.0.0.1:8001"), 5, "here"),
        SrvTarget(1, HostPort.parse("198.18.0.2:8002"), 1, "there"),
        SrvTarget(2, HostPort.parse("198.18.1.3:8003"), 1, "far")]
    assert {t.priority for t in found("flat")} == {0}  # locality off: one tier
    assert found("nope") == []


# -- capture rendering for DNS (no kernel) -------------------------------------------------

def test_dns_chain_redirects_udp_and_tcp_53_only_when_on() -> None:
    chain = Chains.for_instance("blue").dns
    assert chain == "MESHNODE-DNS-blue"
    on = [ln for ln in render_dns(chain, 15053, constants.PROXY_MARK).splitlines()
          if ln and not ln.startswith("#")]
    assert on == [
        "*nat",
        ":MESHNODE-DNS-blue - [0:0]",
        "-A MESHNODE-DNS-blue -m mark --mark 0x4d4e0001 -j RETURN",
        "-A MESHNODE-DNS-blue -p udp --dport 53 -j REDIRECT --to-ports 15053",
        "-A MESHNODE-DNS-blue -p tcp --dport 53 -j REDIRECT --to-ports 15053",
        "COMMIT",
    ]
    off = render_dns(chain, None, constants.PROXY_MARK)
    assert "REDIRECT" not in off and ":MESHNODE-DNS-blue - [0:0]" in off


def test_dns_jump_takes_every_protocol_of_the_apps_cgroup() -> None:
    assert jump_rule("MESHNODE-DNS-i", "/m.slice/apps", "i", protocol=None) == [
        "-m", "cgroup", "--path", "/m.slice/apps", "-m", "comment", "--comment", "meshnode:i",
        "-j", "MESHNODE-DNS-i"]
    long = Chains.for_instance("a" * 40)
    assert len(long.dns) <= CHAIN_MAX and len(set(long.all())) == 3


def test_dns_cfg_packing_matches_the_c_struct() -> None:
    assert maps.pack_dns_cfg(True, 15053) == struct.pack("=II", constants.DNS_ENABLED, 15053)
    assert maps.pack_dns_cfg(False, 15053) == struct.pack("=II", 0, 15053)
    assert "dns_redirected" in maps.STAT_NAMES
    defines = constants.bpf_defines()
    assert defines["MN_DNS_SERVICE_PORT"] == 53
    assert defines["MN_STAT_DNS_REDIRECTED"] < defines["MN_STAT_SLOTS"]


def test_dns_program_hooks_the_apps_cgroup() -> None:
    from meshnode.bpf import dns
    from meshnode.bpf.program import AttachType, all_entries

    hooks = {e.function: (e.attach_type, e.cgroup) for e in dns.PROGRAM.entries}
    assert hooks == {
        "mn_dns_sendmsg4": (AttachType.CGROUP_UDP4_SENDMSG, "apps"),
        "mn_dns_connect4": (AttachType.CGROUP_INET4_CONNECT, "apps"),
        "mn_dns_recvmsg4": (AttachType.CGROUP_UDP4_RECVMSG, "apps"),
        "mn_dns_peer4": (AttachType.CGROUP_INET4_GETPEERNAME, "apps"),
    }
    names = [e.function for e in all_entries()]
    # mn_connect4 is attached first, so mesh capture sees every connect before DNS does.
    assert names.index("mn_connect4") < names.index("mn_dns_connect4")
    assert all(len(n) <= 15 for n in names)  # kernel program names: 15 characters
    text = render_source()
    assert "==== mn_dns.c" in text and all(f"int {n}(" in text for n in hooks)


# -- upstream configuration --------------------------------------------------------------

def test_upstream_parse() -> None:
    assert Upstream.parse("192.0.2.53") == Upstream(IPv4Address("192.0.2.53"), 53)
    assert str(Upstream.parse("192.0.2.53:5353")) == "192.0.2.53:5353"
    for bad in ("dns.example", "192.0.2.1:0", "192.0.2.1:x", "::1"):
        with pytest.raises(UsageError):
            Upstream.parse(bad)


def test_resolv_conf_nameservers_without_our_own(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.org\nnameserver 192.0.2.1\n"
                    "nameserver 2001:db8::1\nnameserver 127.0.0.1 # ours when on :53\n"
                    "nameserver 192.0.2.1\nnameserver not-an-ip\n  nameserver 192.0.2.2\n")
    own53 = Upstream(IPv4Address(LOCAL), 53)
    assert resolv_conf_upstreams(conf, [own53]) == (
        Upstream(IPv4Address("192.0.2.1")), Upstream(IPv4Address("192.0.2.2")))
    # On another port the agent is not 127.0.0.1:53: that resolver is a real one.
    own = Upstream(IPv4Address(LOCAL), constants.DNS_PORT)
    assert Upstream(IPv4Address(LOCAL)) in resolv_conf_upstreams(conf, [own])
    assert resolv_conf_upstreams(tmp_path / "missing") == ()


def test_upstreams_for_prefers_configuration_and_never_loops(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.9\n")
    own = Upstream(IPv4Address(LOCAL), 15053)
    assert upstreams_for(["192.0.2.1", "127.0.0.1:15053"], own, conf) == (
        Upstream(IPv4Address("192.0.2.1")),)
    assert upstreams_for([], own, conf) == (Upstream(IPv4Address("192.0.2.9")),)


# -- the server on real sockets ------------------------------------------------------------

def test_server_answers_mesh_names_over_udp_and_tcp() -> None:
    async def scenario() -> None:
        async with serving() as server:
            r = DNSRecord.parse(await ask_udp(server.port, query("web.mesh").pack()))
            assert [str(a.rdata) for a in r.rr] == [str(VIP)]
            r = DNSRecord.parse(await ask_udp(server.port, query("nope.mesh").pack()))
            assert r.header.rcode == RCODE.NXDOMAIN
            a, aaaa = await ask_tcp(server.port, query("db.mesh").pack(),
                                    query("db.mesh", "AAAA").pack())
            assert [str(x.rdata) for x in DNSRecord.parse(a).rr] == ["127.240.0.8"]
            assert DNSRecord.parse(aaaa).rr == []
            stats = server.stats()
            assert (stats["queries"], stats["answers"], stats["nxdomain"]) == (4, 3, 1)

    run(scenario())


def test_other_names_are_answered_by_the_upstream() -> None:
    async def scenario() -> None:
        async with fake_upstream(names={"example.org": ["192.0.2.10"]}) as up, \
                serving((up.upstream,)) as server:
            q = query("example.org")
            r = DNSRecord.parse(await ask_udp(server.port, q.pack()))
            assert r.header.id == q.header.id
            assert [str(a.rdata) for a in r.rr] == ["192.0.2.10"]
            (tcp,) = await ask_tcp(server.port, query("example.org").pack())
            assert [str(a.rdata) for a in DNSRecord.parse(tcp).rr] == ["192.0.2.10"]
            r = DNSRecord.parse(await ask_udp(server.port, query("nx.example").pack()))
            assert r.header.rcode == RCODE.NXDOMAIN  # the upstream's answer, passed on
            assert (up.udp_queries, up.tcp_queries) == (2, 1)
            assert server.stats()["forwarded"] == 3

    run(scenario())


def test_a_failing_upstream_falls_through_to_the_next() -> None:
    async def scenario() -> None:
        async with fake_upstream(names={}, udp_mode="silent") as silent, \
                fake_upstream(names={"example.org": ["192.0.2.11"]}) as good:
            refused = Upstream(IPv4Address(LOCAL), dead_udp_port())
            async with serving((refused, silent.upstream, good.upstream),
                               timeout=0.3) as server:
                r = DNSRecord.parse(await ask_udp(server.port, query("example.org").pack()))
                assert [str(a.rdata) for a in r.rr] == ["192.0.2.11"]
                assert silent.udp_queries == 1
                stats = server.stats()
                assert stats["forwarded"] == 1 and stats["forward_errors"] == 0
                assert stats["upstream_attempt_errors"] == 2

    run(scenario())


def test_no_upstream_answering_is_servfail() -> None:
    async def scenario() -> None:
        async with serving((Upstream(IPv4Address(LOCAL), dead_udp_port()),)) as server:
            r = DNSRecord.parse(await ask_udp(server.port, query("example.org").pack()))
            assert r.header.rcode == RCODE.SERVFAIL
        async with serving(()) as server:  # none configured at all
            (tcp,) = await ask_tcp(server.port, query("example.org").pack())
            assert DNSRecord.parse(tcp).header.rcode == RCODE.SERVFAIL
            assert server.stats()["forward_errors"] == 1

    run(scenario())


def test_truncated_upstream_answer_is_fetched_again_over_tcp() -> None:
    async def scenario() -> None:
        ips = [f"192.0.2.{i}" for i in range(1, 4)]
        async with fake_upstream(names={"many.example": ips}, udp_mode="truncate") as up, \
                serving((up.upstream,)) as server:
            r = DNSRecord.parse(await ask_udp(server.port, query("many.example").pack()))
            assert not r.header.tc
            assert sorted(str(a.rdata) for a in r.rr) == ips
            assert (up.udp_queries, up.tcp_queries) == (1, 1)

    run(scenario())


def test_an_answer_too_long_for_the_client_is_truncated_for_it() -> None:
    async def scenario() -> None:
        ips = [f"192.0.2.{i}" for i in range(1, 61)]  # ~1 KB: more than 512 bytes
        async with fake_upstream(names={"big.example": ips}, udp_mode="truncate") as up, \
                serving((up.upstream,)) as server:
            plain = DNSRecord.parse(await ask_udp(server.port, query("big.example").pack()))
            assert plain.header.tc and plain.rr == []
            assert str(plain.q.qname) == "big.example."
            # With EDNS the client takes it whole over UDP; over TCP everyone does.
            edns = DNSRecord.parse(await ask_udp(server.port,
                                                 query("big.example", edns=1232).pack()))
            assert not edns.header.tc and len(edns.rr) == 60
            (tcp,) = await ask_tcp(server.port, query("big.example").pack())
            assert len(DNSRecord.parse(tcp).rr) == 60
            assert server.stats()["truncated"] == 1

    run(scenario())


def test_garbage_never_stops_the_server() -> None:
    async def scenario() -> None:
        async with serving() as server:
            assert await ask_udp(server.port, b"\x00", timeout=0.2) is None
            assert await ask_udp(server.port, query("web.mesh").reply().pack(),
                                 timeout=0.2) is None
            formerr = await ask_udp(server.port, query("web.mesh").pack()[:14])
            assert DNSRecord.parse(formerr).header.rcode == RCODE.FORMERR
            # A TCP client sending a cut frame just loses its connection.
            reader, writer = await asyncio.open_connection(LOCAL, server.port)
            writer.write(b"\x00\x40abc")
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            r = DNSRecord.parse(await ask_udp(server.port, query("web.mesh").pack()))
            assert [str(a.rdata) for a in r.rr] == [str(VIP)]
            stats = server.stats()
            assert stats["dropped"] == 2 and stats["formerr"] == 1

    run(scenario())


def test_port_in_use_is_a_conflict_and_stop_frees_the_port() -> None:
    async def scenario() -> None:
        async with serving() as server:
            port = server.port
            with pytest.raises(ConflictError, match="in use"):
                await MeshDns(resolve, port=port, host=LOCAL).start()
        again = MeshDns(resolve, port=port, host=LOCAL)
        await again.start()  # both sockets were closed by stop()
        await again.stop()

    run(scenario())


# -- the agent glue ------------------------------------------------------------------------

@dataclass
class FakeCapture:
    """Records set_dns calls, and at each one asks the DNS server a question from this
    (worker) thread: what the kernel would do at that very moment."""

    fail: bool = False
    calls: list[tuple[int | None, bool]] = field(default_factory=list)
    port: int = 0
    name: str = "fake"

    def install(self) -> None: ...
    def sync(self, state: CaptureState) -> None: ...
    def stats(self) -> dict[str, int]:
        return {}
    def remove(self) -> None: ...

    def set_dns(self, port: int | None) -> None:
        self.calls.append((port, _server_answers(self.port)))
        if self.fail:
            raise UsageError("switch broken")


def _server_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query("web.mesh").pack(), (LOCAL, port))
        try:
            return bool(DNSRecord.parse(s.recv(512)).rr)
        except OSError:
            return False


@pytest.fixture
def names_port() -> int:
    for _ in range(20):  # free now for both UDP and TCP; only this test binds it
        port = dead_udp_port()
        with socket.socket() as s:
            try:
                s.bind((LOCAL, port))
            except OSError:
                continue
        return port
    raise OSError("no port free for both UDP and TCP")


def test_names_redirect_only_while_the_server_answers(names_port: int) -> None:
    capture = FakeCapture(port=names_port)
    names = MeshNames(capture, resolve, port=names_port, host=LOCAL, upstreams=["192.0.2.1"])

    async def scenario() -> None:
        await names.start()
        assert names.describe()["redirecting"] is True
        await names.stop()

    run(scenario())
    # On: the server answered already. Off: it still answered (queries in flight finish).
    assert capture.calls == [(names_port, True), (None, True)]
    assert names.describe()["upstreams"] == ["192.0.2.1:53"]
    assert names.describe()["redirecting"] is False


def test_names_start_is_all_or_nothing(names_port: int) -> None:
    capture = FakeCapture(port=names_port, fail=True)
    names = MeshNames(capture, resolve, port=names_port, host=LOCAL)

    async def scenario() -> None:
        with pytest.raises(UsageError, match="switch broken"):
            await names.start()

    run(scenario())
    assert not _server_answers(names_port)  # the server went away again
    assert names.describe()["redirecting"] is False


def test_names_for_agent_reads_the_config_and_registry(tmp_path: Path) -> None:
    from meshnode.config import AgentConfig
    from meshnode.discovery.registry import ServiceRecord

    class Registry:
        def services(self) -> dict[str, ServiceRecord]:
            return {"web": ServiceRecord("web", 1, VIP)}

    cfg = AgentConfig(dns_port=25053, dns_suffix="svc.test", dns_upstreams=("192.0.2.7:5353",))
    names = MeshNames.for_agent(cfg, FakeCapture(), Registry(),  # type: ignore[arg-type]
                                lambda service, addr: True)
    assert names.describe()["address"] == "127.0.0.1:25053"
    assert names.describe()["suffix"] == "svc.test"
    assert names.describe()["upstreams"] == ["192.0.2.7:5353"]
    assert names.server.zone.resolve("web") == VIP
    assert names.server.zone.resolve("db") is None
    srv = _reply(names.server.zone.respond(query("_web._tcp.svc.test", "SRV").pack()))
    assert srv.header.rcode == RCODE.NOERROR and srv.rr == []  # web has no endpoints
