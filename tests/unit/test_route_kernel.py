"""The kernel classification as a pure function (meshnode.route.kernel.classify): what the
connect hooks do with a destination, from the capture state. tests/integration/
test_route_kernel.py checks the same cases against the loaded BPF programs."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from meshnode import constants
from meshnode.model import CaptureRule, CaptureState, HostPort
from meshnode.route import KernelAction, KernelVerdict, classify

pytestmark = pytest.mark.timeout(10)

WEB, DB, OFF = 1, 2, 3  # ready / fail-closed and not ready / fail-open and not ready
STATE = CaptureState(
    rules=frozenset({
        CaptureRule(IPv4Address("127.240.0.1"), 0, WEB),
        CaptureRule(IPv4Address("127.0.0.1"), 8001, WEB),
        CaptureRule(IPv4Address("127.240.0.2"), 0, DB),
        CaptureRule(IPv4Address("127.0.0.1"), 5432, DB),
        CaptureRule(IPv4Address("127.240.0.3"), 0, OFF),
    }),
    ready=frozenset({WEB}),
    fail_closed=frozenset({DB}),
)
PROXY = HostPort.parse(f"127.0.0.1:{constants.OUTBOUND_PORT}")


def hp(text: str) -> HostPort:
    return HostPort.parse(text)


def test_ready_vip_on_any_port_and_endpoint_go_to_the_proxy() -> None:
    assert classify(STATE, hp("127.240.0.1:80")) == KernelVerdict(
        KernelAction.REDIRECT, PROXY, WEB, "vip")
    assert classify(STATE, hp("127.240.0.1:9999")).action is KernelAction.REDIRECT
    assert classify(STATE, hp("127.0.0.1:8001")) == KernelVerdict(
        KernelAction.REDIRECT, PROXY, WEB, "endpoint")
    v = classify(STATE, hp("127.240.0.1:80"), outbound_port=20001)
    assert v.target == hp("127.0.0.1:20001") and v.mesh


def test_not_ready_fails_closed_or_open_by_the_service() -> None:
    assert classify(STATE, hp("127.240.0.2:5432")) == KernelVerdict(
        KernelAction.REFUSE, hp("127.240.0.2:5432"), DB, "vip")
    assert classify(STATE, hp("127.0.0.1:5432")).action is KernelAction.REFUSE
    assert classify(STATE, hp("127.240.0.3:80")) == KernelVerdict(
        KernelAction.PASS, hp("127.240.0.3:80"), OFF, "vip")
    # readiness wins over fail-closed
    ready = CaptureState(STATE.rules, frozenset({WEB, DB}), STATE.fail_closed)
    assert classify(ready, hp("127.240.0.2:5432")).action is KernelAction.REDIRECT


def test_anything_else_passes_untouched() -> None:
    for dst in ("127.0.0.1:8002", "10.0.0.1:443", "127.240.0.9:80"):
        v = classify(STATE, hp(dst))
        assert v == KernelVerdict(KernelAction.PASS, hp(dst)) and not v.mesh
    assert classify(CaptureState(), hp("127.240.0.1:80")).action is KernelAction.PASS


def test_port_53_goes_to_the_agents_dns_while_it_redirects() -> None:
    assert classify(STATE, hp("10.0.0.1:53")).action is KernelAction.PASS  # redirect off
    assert classify(STATE, hp("10.0.0.1:53"), dns_port=15053) == KernelVerdict(
        KernelAction.DNS, hp("127.0.0.1:15053"))
    # a mesh destination the proxy takes is never a DNS query, nor a refused one...
    assert classify(STATE, hp("127.240.0.1:53"), dns_port=15053).action is KernelAction.REDIRECT
    assert classify(STATE, hp("127.240.0.2:53"), dns_port=15053).action is KernelAction.REFUSE
    # ...but one that fails open reaches the DNS program with its port 53 intact
    assert classify(STATE, hp("127.240.0.3:53"), dns_port=15053) == KernelVerdict(
        KernelAction.DNS, hp("127.0.0.1:15053"), OFF, "vip")


def test_the_exact_address_wins_over_a_vip_and_ties_go_as_the_map_is_filled() -> None:
    # an endpoint that sits on another service's VIP address: mn_dest's exact key first
    state = CaptureState(rules=frozenset({CaptureRule(IPv4Address("127.240.0.1"), 0, WEB),
                                          CaptureRule(IPv4Address("127.240.0.1"), 80, DB)}),
                         ready=frozenset({WEB}), fail_closed=frozenset({DB}))
    assert classify(state, hp("127.240.0.1:80")) == KernelVerdict(
        KernelAction.REFUSE, hp("127.240.0.1:80"), DB, "endpoint")
    assert classify(state, hp("127.240.0.1:81")).service_id == WEB
    # two services claiming one address: the one bpf.maps writes last (sorted rules) wins
    both = CaptureState(rules=frozenset({CaptureRule(IPv4Address("127.0.0.1"), 8001, WEB),
                                         CaptureRule(IPv4Address("127.0.0.1"), 8001, DB)}))
    assert classify(both, hp("127.0.0.1:8001")).service_id == DB
