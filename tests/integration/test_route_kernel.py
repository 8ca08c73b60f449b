"""The pure kernel classification (meshnode.route.classify, what `meshnode explain` says) against
what the loaded eBPF connect hooks do with real connects from an enrolled process, destination
by destination, in one network namespace and cgroup subtree (see capture_fixtures.py).

Who answers tells what the kernel did: the fake proxy on 127.0.0.1:<outbound port> (redirect,
answering with the original destination it reads), a server on the agent's DNS port (DNS), the
destination itself (pass), or nobody (EPERM: refuse). The kernel's own counters must agree too.
Only 127.0.0.0/8 addresses are used.
"""

from __future__ import annotations

import errno
from collections import Counter
from ipaddress import IPv4Address

import pytest

from meshnode import constants
from meshnode.capture.ebpf import BpfCapture
from meshnode.model import CaptureRule, CaptureState, HostPort, LbTable
from meshnode.route import KernelAction, KernelVerdict, classify
from tests.integration.capture_fixtures import (
    CaptureEnv,
    capture_env_fixture,  # noqa: F401 (the capture_env fixture)
    free_port,
    netns_fixture,  # noqa: F401 (the netns fixture)
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(120),
    pytest.mark.parametrize("capture_env", ["ebpf"], indirect=True),
]

WEB, DB, OFF = 1, 2, 3
VIP_WEB, VIP_DB, VIP_OFF = "127.240.0.1", "127.240.0.2", "127.240.0.3"
OTHER = "127.0.0.2"  # nobody's address


def ports(n: int) -> list[int]:
    chosen: set[int] = set()
    while len(chosen) < n:
        chosen.add(free_port())
    return sorted(chosen)


def observed(env: CaptureEnv, dst: HostPort, dns_port: int, family: str = "4",
             ) -> tuple[KernelAction, HostPort]:
    """Connect from the enrolled cgroup; what happened, and where the connect went."""
    host = str(dst.ip) if family == "4" else f"::ffff:{dst.ip}"
    r = env.connect(env.app_service, host, dst.port, family=family)
    if "errno" in r:
        assert r["errno"] == errno.EPERM and r["secs"] < 1.0, (dst, r)
        return KernelAction.REFUSE, dst
    label, orig = r["reply"].split(" ", 1)
    if label == "proxy":
        assert orig == str(dst), (dst, r)  # the proxy learns the original destination
        return KernelAction.REDIRECT, HostPort.parse(f"127.0.0.1:{env.ctx.outbound_port}")
    if label == "dns":
        return KernelAction.DNS, HostPort.parse(f"127.0.0.1:{dns_port}")
    assert label == "backend", (dst, r)
    return KernelAction.PASS, HostPort.parse(orig)  # who answered: where it went


def landing(v: KernelVerdict) -> tuple[KernelAction, HostPort]:
    """What `observed` sees for a verdict: a kernel-path connect lands at its endpoint (the
    tables here have one slot) or, with no table, where it was dialled, like a pass."""
    if v.action is KernelAction.KERNEL:
        return KernelAction.PASS, v.table.slots[0] if v.table is not None else v.target
    return v.action, v.target


def test_classify_agrees_with_the_bpf_connect_hooks(capture_env: CaptureEnv) -> None:
    env = capture_env
    ep_web, ep_db, plain, vip_port, dns_port = ports(5)
    dests = [
        HostPort.parse(f"{VIP_WEB}:{vip_port}"),  # a VIP, any port
        HostPort.parse(f"127.0.0.1:{ep_web}"),  # an endpoint's own address
        HostPort.parse(f"127.0.0.1:{plain}"),  # not a mesh destination
        HostPort.parse(f"{VIP_DB}:{vip_port}"),  # a fail-closed service's VIP
        HostPort.parse(f"127.0.0.1:{ep_db}"),  # ...and its endpoint
        HostPort.parse(f"{VIP_OFF}:{vip_port}"),  # a fail-open service's VIP
        HostPort.parse(f"{OTHER}:53"),  # a resolver
        HostPort.parse(f"{VIP_OFF}:53"),  # a fail-open service's VIP on port 53
        HostPort.parse(f"{VIP_WEB}:53"),
        HostPort.parse(f"{VIP_DB}:53"),
    ]
    env.serve(env.proxy, "proxy", f"127.0.0.1:{env.ctx.outbound_port}")
    env.serve(None, "dns", f"127.0.0.1:{dns_port}")
    env.serve(None, "backend", *(str(d) for d in dests))
    backend = env.make_backend()
    assert isinstance(backend, BpfCapture)
    backend.install()
    rules = frozenset({
        CaptureRule(IPv4Address(VIP_WEB), 0, WEB),
        CaptureRule(IPv4Address("127.0.0.1"), ep_web, WEB),
        CaptureRule(IPv4Address(VIP_DB), 0, DB),
        CaptureRule(IPv4Address("127.0.0.1"), ep_db, DB),
        CaptureRule(IPv4Address(VIP_OFF), 0, OFF),
    })
    states = [
        ("web ready, db fail-closed, off fail-open",
         CaptureState(rules, ready=frozenset({WEB}), fail_closed=frozenset({DB}))),
        ("nothing ready", CaptureState(rules, fail_closed=frozenset({DB}))),
        ("all ready", CaptureState(rules, ready=frozenset({WEB, DB, OFF}),
                                   fail_closed=frozenset({DB}))),
        ("no rules", CaptureState()),
        # the kernel path: web always (its VIP's table holds its endpoint), off while the
        # proxy is not ready (no table: no endpoint)
        ("web kernel, off fallback", CaptureState(
            rules, ready=frozenset({DB}), fail_closed=frozenset({DB}), kernel=frozenset({WEB}),
            fallback=frozenset({OFF}), lb={(WEB, 0): LbTable(WEB, 0, constants.LB_PICK_ROTATE,
                                                            (HostPort.parse(f"127.0.0.1:{ep_web}"),))})),
    ]
    expected: Counter[str] = Counter()
    seen_actions: set[KernelAction] = set()
    for dns_on in (False, True):
        backend.set_dns(dns_port if dns_on else None)
        for what, state in states:
            backend.sync(state)
            for dst in dests:
                v = classify(state, dst, outbound_port=env.ctx.outbound_port,
                             dns_port=dns_port if dns_on else None)
                assert observed(env, dst, dns_port) == landing(v), (
                    what, f"dns {'on' if dns_on else 'off'}", dst, v)
                seen_actions.add(v.action)
                expected[_counter(v)] += 1
                if v.action is KernelAction.DNS and v.mesh:
                    # counted by mn_connect4 before DNS took it
                    expected["kernel_no_endpoint" if state.balanced(v.service_id or 0)
                             else "passthrough"] += 1
                if v.action is KernelAction.REFUSE and dns_on and dst.port == 53:
                    # every program on the hook runs: mn_dns_connect4 rewrites and counts a
                    # connect mn_connect4 refused, which still fails with EPERM
                    expected["dns_redirected"] += 1
            # an AF_INET6 socket to the v4-mapped address: connect6 decides alike (not DNS)
            for dst in dests[:6]:
                v = classify(state, dst, outbound_port=env.ctx.outbound_port)
                assert observed(env, dst, dns_port, family="6") == landing(v), (
                    what, "v4-mapped", dst, v)
                expected[_counter(v)] += 1
    assert seen_actions == set(KernelAction)  # every verdict was exercised
    stats = backend.stats()
    got = {k: stats[k] for k in ("captured", "refused", "passthrough", "dns_redirected",
                                 "kernel", "kernel_no_endpoint")}
    assert got == {k: expected[k] for k in got}, (got, expected)


def _counter(v: KernelVerdict) -> str:
    """The mn_stats slot a verdict bumps ("" for none)."""
    if v.action is KernelAction.REDIRECT:
        return "captured"
    if v.action is KernelAction.REFUSE:
        return "refused"
    if v.action is KernelAction.DNS:
        return "dns_redirected"
    if v.action is KernelAction.KERNEL:
        return "kernel" if v.table is not None or v.match == "endpoint" else "kernel_no_endpoint"
    return "passthrough" if v.mesh else ""
