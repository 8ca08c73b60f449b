"""The kernel path's planning, pure: which services may take it and why (policy/datapath.py),
the slot tables the connect hook picks from (balance/slots.py), and the connect decision
(route/kernel.py) for kernel-path services. The BPF side is tested on a real agent in
tests/integration/test_kernel_path.py."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address

import msgspec
import pytest

from meshnode import constants
from meshnode.balance import slots
from meshnode.bpf import lb_maps, maps
from meshnode.model import CaptureRule, CaptureState, Endpoint, HostPort, LbTable
from meshnode.policy.datapath import Environment, Planner, choose, environment, tables
from meshnode.policy.records import EndpointRecord, ServiceRecord
from meshnode.policy.resources import (
    MeshMtls,
    MeshSpec,
    PortSpec,
    Resource,
    ServicePolicy,
)
from meshnode.route.kernel import KernelAction, classify

VIP = IPv4Address("127.240.0.9")


def ep(port: int, weight: int = 1, node: str = "n1", zone: str = "") -> Endpoint:
    return Endpoint(HostPort(IPv4Address("127.0.0.1"), port), node=node, zone=zone,
                    weight=weight)


def record(policy: ServicePolicy, *eps: Endpoint, sid: int = 9) -> ServiceRecord:
    return ServiceRecord("web", sid, VIP, policy, endpoints=frozenset(
        EndpointRecord(e.addr, "static", node=e.node, zone=e.zone, weight=e.weight)
        for e in eps))


# -- slot tables ---------------------------------------------------------------------------
def test_weighted_slots_are_the_weights_exactly_and_spread() -> None:
    table = slots.weighted([ep(1, 1), ep(2, 2), ep(3, 3)], constants.LB_MAX_SLOTS)
    assert Counter(a.port for a in table) == {1: 1, 2: 2, 3: 3}
    # smooth: the heaviest endpoint never takes more than two turns in a row
    ports = [a.port for a in table] * 2
    assert all(ports[i:i + 3] != [3, 3, 3] for i in range(len(ports) - 2))


def test_weighted_slots_reduce_and_scale_to_fit() -> None:
    assert len(slots.weighted([ep(1, 100), ep(2, 300)], 512)) == 4  # divided by 100
    big = slots.weighted([ep(1, 1000), ep(2, 3001)], 64)
    n = Counter(a.port for a in big)
    assert sum(n.values()) <= 64 and n[1] >= 1 and n[2] / n[1] == 3, n
    many = slots.weighted([ep(p) for p in range(1, 20)], 8)
    assert len(many) == 8


def test_ring_slots_move_only_the_leaving_endpoints_share() -> None:
    three = slots.ring([ep(1), ep(2), ep(3)], 256)
    two = slots.ring([ep(1), ep(2)], 256)
    assert set(three) == {ep(1).addr, ep(2).addr, ep(3).addr}
    moved = [i for i in range(256) if three[i] != two[i]]
    assert all(three[i] == ep(3).addr for i in moved)  # only 3's slots changed hands
    assert 40 < len(moved) < 130, len(moved)


# -- who may take the kernel path ----------------------------------------------------------
def test_choices_and_their_reasons() -> None:
    env = Environment(node="n1")
    auto = ServicePolicy(datapath="auto")
    assert choose("web", auto, env, True).path == "kernel"
    http = ServicePolicy(datapath="auto", protocol="http")
    c = choose("web", http, env, True)
    assert (c.path, c.fallback) == ("proxy", False) and "requests need the proxy" in c.reason
    port = ServicePolicy(datapath="auto", ports=(PortSpec(port=8080, protocol="http"),))
    assert "port 8080 speaks HTTP" in choose("web", port, env, True).reason
    routed = Environment(node="n1", routed=frozenset({"web"}))
    assert "a Route governs its calls" in choose("web", auto, routed, True).reason
    authz = Environment(node="n1", authorize_all=True)
    assert choose("web", auto, authz, True).path == "proxy"
    iptables = Environment(node="n1", capable=False)
    assert "eBPF capture backend" in choose("web", auto, iptables, True).reason
    # the proxy path falls back to the kernel only when it fails open and may
    proxy = ServicePolicy()
    assert choose("web", proxy, env, True).fallback
    assert not choose("web", ServicePolicy(fail_mode="closed"), env, True).fallback
    assert not choose("web", proxy, iptables, True).fallback


def test_strict_mtls_keeps_the_kernel_path_on_this_host() -> None:
    strict = Environment(node="n1", mesh=MeshSpec(mtls=MeshMtls(mode="STRICT")))
    auto = ServicePolicy(datapath="auto")
    assert choose("web", auto, strict, False).path == "proxy"
    c = choose("web", auto, strict, True)
    assert c.path == "kernel" and c.local_only
    rec = record(auto, ep(1, node="n1"), ep(2, node="n2"))
    t = tables(rec, c, [ep(1, node="n1"), ep(2, node="n2")], strict)
    assert [a.port for a in t[(9, 1)].slots] == [1] and (9, 2) not in t


def test_datapath_kernel_refuses_what_only_the_proxy_does() -> None:
    with pytest.raises(msgspec.ValidationError, match="carries opaque TCP only"):
        msgspec.convert({"datapath": "kernel", "protocol": "http"}, ServicePolicy)
    with pytest.raises(msgspec.ValidationError, match="cannot enforce maxConnections"):
        msgspec.convert({"datapath": "kernel", "maxConnections": 3}, ServicePolicy)


def test_environment_from_resources() -> None:
    res = {("Route", "r"): Resource("Route", "r", _RouteLike()),
           ("AuthorizationPolicy", "a"): Resource("AuthorizationPolicy", "a", _Authz("db"))}
    env = environment(res, "n1", "z", True)
    assert env.routed == frozenset({"web"}) and env.authorized == frozenset({"db"})
    assert not env.authorize_all
    deny = msgspec.convert({"authorization": {"default": "DENY"}}, MeshSpec)
    assert environment({("Mesh", "mesh"): Resource("Mesh", "mesh", deny)}, "n1", "",
                       True).authorize_all


class _RouteLike(msgspec.Struct):
    service: str = "web"


class _Authz(msgspec.Struct):
    target: str


# -- tables ----------------------------------------------------------------------------------
def test_tables_by_port_and_locality() -> None:
    env = Environment(node="n1", zone="z1")
    by_port = record(ServicePolicy(datapath="kernel"), ep(1), ep(2))
    c = choose("web", by_port.policy, env, True)
    t = tables(by_port, c, [ep(1), ep(2)], env)
    assert set(t) == {(9, 1), (9, 2)}  # VIP:P reaches the endpoints on P
    one_port = ServicePolicy(datapath="kernel", port=80, balancer=msgspec.convert(
        {"algorithm": "ring-hash"}, type(ServicePolicy().balancer)))
    rec = record(one_port, ep(1, node="n1"), ep(2, node="n2", zone="z1"), ep(3, node="n3"))
    t = tables(rec, choose("web", one_port, env, True),
               [ep(1, node="n1"), ep(2, node="n2", zone="z1"), ep(3, node="n3")], env)
    table = t[(9, 0)]
    assert table.pick == constants.LB_PICK_HASH and set(table.slots) == {ep(1).addr}
    far = [ep(2, node="n2", zone="z1"), ep(3, node="n3")]
    assert set(tables(rec, choose("web", one_port, env, False), far, env)[(9, 0)].slots) == {
        ep(2).addr}  # no local endpoint: this zone's


def test_planner_redoes_only_what_changed() -> None:
    env = Environment(node="n1")
    rec = record(ServicePolicy(datapath="kernel", port=80), ep(1), ep(2))
    healthy = {"web": frozenset({ep(1), ep(2)})}
    p = Planner()
    plan = p.plan({"web": rec}, lambda r: healthy[r.name], (), env)
    assert plan.kernel == frozenset({9}) and len(plan.lb[(9, 0)].slots) == 2
    assert p.plan({"web": rec}, lambda r: healthy[r.name], ("web",), env) is plan
    healthy["web"] = frozenset({ep(1)})
    after = p.plan({"web": rec}, lambda r: healthy[r.name], ("web",), env)
    assert after is not plan and after.lb[(9, 0)].slots == (ep(1).addr,)
    # the hint a map sync writes from: this table, since the plan before
    assert after.changed == frozenset({(9, 0)}) and after.since is plan.lb
    assert after.kernel is plan.kernel  # unchanged sets stay the same objects
    gone = p.plan({}, lambda r: healthy[r.name], ("web",), env)
    assert gone.kernel == frozenset() and not gone.lb and "web" not in p.choices


# -- the connect decision --------------------------------------------------------------------
def test_classify_kernel_path() -> None:
    table = LbTable(9, 0, constants.LB_PICK_ROTATE, (ep(1).addr, ep(2).addr))
    rules = frozenset({CaptureRule(VIP, 0, 9), CaptureRule(IPv4Address("127.0.0.1"), 1, 9)})
    state = CaptureState(rules, ready=frozenset({9}), kernel=frozenset({9}),
                         lb={(9, 0): table})
    v = classify(state, HostPort(VIP, 80))
    assert (v.action, v.table, v.match) == (KernelAction.KERNEL, table, "vip")
    assert classify(state, ep(1).addr).action is KernelAction.KERNEL  # an endpoint: there
    fallback = CaptureState(rules, ready=frozenset(), fallback=frozenset({9}))
    v = classify(fallback, HostPort(VIP, 80))
    assert v.action is KernelAction.KERNEL and v.table is None  # no table: to the VIP
    served = CaptureState(rules, ready=frozenset({9}), fallback=frozenset({9}))
    assert classify(served, HostPort(VIP, 80)).action is KernelAction.REDIRECT
    assert maps.service_flags(state, 9) == (constants.SVC_READY | constants.SVC_KERNEL)


def test_lb_layouts_pack_as_the_c_structs() -> None:
    assert lb_maps.pack_lb_key(7, 80) == b"\x07\0\0\0\0\x50\0\0"
    assert lb_maps.pack_lb_slot_key(7, 80, 3) == b"\x07\0\0\0\0\x50\x03\0"
    assert lb_maps.unpack_lb_table(lb_maps.pack_lb_table(6, constants.LB_PICK_HASH)) == (
        6, constants.LB_PICK_HASH, 0)
    assert maps.MAP_LAYOUTS["mn_lb_table"] == (8, 16)
    assert maps.MAP_LAYOUTS["mn_lb_slot"] == (8, 8)
