"""Both capture backends against real sockets, each test in its own network namespace and
cgroup subtree (see capture_fixtures.py). Only 127.0.0.0/8 addresses are used.

Roles: a fake proxy in the proxy cgroup on 127.0.0.1:<outbound_port> answering with the
SO_ORIGINAL_DST it reads; a backend (no special cgroup) on the original destinations answering
"backend"; clients in the apps cgroup (enrolled), in a sibling cgroup (not enrolled), or
marked with the proxy's SO_MARK.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
from ipaddress import IPv4Address

import pytest

from meshnode import constants
from meshnode.bpf.maps import CaptureMaps, MapContents
from meshnode.capture import undo_functions
from meshnode.capture.ebpf import BpfCapture
from meshnode.capture.iptables import IptablesCapture
from meshnode.errors import BpfError, IptablesError
from meshnode.host.ledger import Ledger
from meshnode.model import CaptureRule, CaptureState
from tests.integration.capture_fixtures import (
    CaptureEnv,
    bpf_leftovers,
    capture_env_fixture,  # noqa: F401 (the capture_env fixture)
    free_port,
    iptables_leftovers,
    netns_fixture,  # noqa: F401 (the netns fixture)
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(90),
    # "iptables" is whichever flavour detect_binary() picks (nft here); legacy explicitly too.
    pytest.mark.parametrize("capture_env", ["ebpf", "iptables", "iptables-legacy"],
                            indirect=True),
]

VIP = "127.240.0.7"
VIP_CLOSED = "127.240.0.8"
SVC_VIP, SVC_ENDPOINT, SVC_CLOSED = 1, 2, 3


def vip_rule(ip: str, sid: int) -> CaptureRule:
    return CaptureRule(IPv4Address(ip), 0, sid)


def leftovers(env: CaptureEnv) -> list[str]:
    return bpf_leftovers(env) if env.kind == "ebpf" else iptables_leftovers(env)



def test_ready_service_lands_on_proxy_with_original_destination(capture_env: CaptureEnv) -> None:
    env = capture_env
    endpoint_port = free_port()
    env.serve(env.proxy, "proxy", f"127.0.0.1:{env.ctx.outbound_port}")
    backend = env.make_backend()
    backend.install()
    backend.sync(CaptureState(
        rules=frozenset({vip_rule(VIP, SVC_VIP),
                         CaptureRule(IPv4Address("127.0.0.1"), endpoint_port, SVC_ENDPOINT)}),
        ready=frozenset({SVC_VIP, SVC_ENDPOINT})))

    # A VIP (any port) and an exact endpoint: both land on the proxy, which learns where the
    # client meant to go through the same getsockopt in both modes.
    assert env.connect(env.app_service, VIP, 80) == {
        "reply": f"proxy {VIP}:80", "secs": pytest.approx(0, abs=2)}
    assert env.connect(env.app_service, VIP, 8443)["reply"] == f"proxy {VIP}:8443"
    assert (env.connect(env.app_service, "127.0.0.1", endpoint_port)["reply"]
            == f"proxy 127.0.0.1:{endpoint_port}")
    # An AF_INET6 socket connecting to the v4-mapped VIP bypasses connect4 (connect6 in eBPF;
    # plain IPv4 packets for netfilter).
    assert env.connect(env.app_service, f"::ffff:{VIP}", 80, family="6")["reply"] == (
        f"proxy {VIP}:80")

    if isinstance(backend, BpfCapture):
        stats = backend.stats()
        assert stats["captured"] == 4
        assert stats["origdst_hit"] == 4
        assert stats["origdst_miss"] == 0


def test_only_enrolled_connects_to_mesh_destinations_are_captured(
        capture_env: CaptureEnv) -> None:
    env = capture_env
    other_port = free_port()
    env.serve(env.proxy, "proxy", f"127.0.0.1:{env.ctx.outbound_port}")
    env.serve(None, "backend", f"{VIP}:80", f"127.0.0.1:{other_port}")
    backend = env.make_backend()
    backend.install()
    backend.sync(CaptureState(rules=frozenset({vip_rule(VIP, SVC_VIP)}),
                              ready=frozenset({SVC_VIP})))

    assert env.connect(env.app_service, VIP, 80)["reply"].startswith("proxy ")
    # Not enrolled: a sibling cgroup of apps, and the test's own cgroup.
    assert env.connect(env.other, VIP, 80)["reply"].startswith("backend ")
    assert env.connect(None, VIP, 80)["reply"].startswith("backend ")
    # Enrolled, but not a mesh destination.
    assert env.connect(env.app_service, "127.0.0.1", other_port)["reply"].startswith("backend ")
    # Enrolled, mesh destination, but carrying the proxy's mark: never captured (no loop).
    assert env.connect(env.app_service, VIP, 80,
                       mark=constants.PROXY_MARK)["reply"].startswith("backend ")


def test_not_ready_fails_open_or_closed(capture_env: CaptureEnv) -> None:
    env = capture_env
    env.serve(env.proxy, "proxy", f"127.0.0.1:{env.ctx.outbound_port}")
    env.serve(None, "backend", f"{VIP}:80", f"{VIP_CLOSED}:80")
    backend = env.make_backend()
    backend.install()
    rules = frozenset({vip_rule(VIP, SVC_VIP), vip_rule(VIP_CLOSED, SVC_CLOSED)})
    backend.sync(CaptureState(rules=rules, fail_closed=frozenset({SVC_CLOSED})))

    # Not ready, fail-open: straight to the original destination.
    assert env.connect(env.app_service, VIP, 80)["reply"].startswith("backend ")
    # Not ready, fail-closed: refused at once (EPERM from the hook, or a TCP reset).
    refused = env.connect(env.app_service, VIP_CLOSED, 80)
    assert refused.get("errno") in (errno.EPERM, errno.ECONNREFUSED), refused
    assert refused["secs"] < 1.0

    # Ready now: both captured.
    backend.sync(CaptureState(rules=rules, ready=frozenset({SVC_VIP, SVC_CLOSED}),
                              fail_closed=frozenset({SVC_CLOSED})))
    assert env.connect(env.app_service, VIP, 80)["reply"] == f"proxy {VIP}:80"
    assert env.connect(env.app_service, VIP_CLOSED, 80)["reply"] == f"proxy {VIP_CLOSED}:80"

    # Rules withdrawn: nothing is a mesh destination any more.
    backend.sync(CaptureState())
    assert env.connect(env.app_service, VIP_CLOSED, 80)["reply"].startswith("backend ")

    if isinstance(backend, BpfCapture):
        stats = backend.stats()
        assert stats["refused"] == 1
        assert stats["passthrough"] == 1
        assert stats["captured"] == 2


def test_remove_leaves_nothing(capture_env: CaptureEnv) -> None:
    env = capture_env
    env.serve(None, "backend", f"{VIP}:80")
    backend = env.make_backend()
    backend.install()
    backend.sync(CaptureState(rules=frozenset({vip_rule(VIP, SVC_VIP)}),
                              ready=frozenset({SVC_VIP}), fail_closed=frozenset({SVC_VIP})))
    assert leftovers(env)  # the checks below can see our objects at all

    backend.remove()
    env.backend = None
    assert leftovers(env) == []
    assert Ledger(env.ledger_path).entries() == []
    # Capture is gone: the enrolled client reaches the destination itself.
    assert env.connect(env.app_service, VIP, 80)["reply"].startswith("backend ")


def test_sweep_after_crash_leaves_nothing(capture_env: CaptureEnv) -> None:
    env = capture_env
    backend = env.make_backend()
    backend.install()
    backend.sync(CaptureState(rules=frozenset({vip_rule(VIP, SVC_VIP)}),
                              ready=frozenset({SVC_VIP})))
    # The agent dies without remove(): only the ledger file remains to go by.
    env.backend = None
    del backend
    gc.collect()
    assert leftovers(env)

    failures = Ledger(env.ledger_path).undo_all(undo_functions())
    assert failures == []
    assert leftovers(env) == []
    assert Ledger(env.ledger_path).entries() == []
    # Idempotent: a second sweep finds nothing to do.
    assert Ledger(env.ledger_path).undo_all(undo_functions()) == []


def test_failed_install_unwinds(capture_env: CaptureEnv) -> None:
    """All or nothing: an install that fails halfway takes back what it made."""
    env = capture_env
    backend: BpfCapture | IptablesCapture
    if env.kind == "ebpf":
        # The pin dir exists by the time the loader runs; a loader that fails must not leave it.
        backend = BpfCapture(env.ctx, python="/bin/false")
        with pytest.raises(BpfError, match="loader failed"):
            backend.install()
    else:
        # The chains exist by the time the jump is added; a jump that fails (its cgroup path
        # does not exist) must not leave them.
        ctx = dataclasses.replace(env.ctx, apps_cgroup=env.root / "missing")
        binary = "iptables-legacy" if env.kind == "iptables-legacy" else None
        backend = IptablesCapture(ctx, binary=binary)
        with pytest.raises(IptablesError, match="OUTPUT jump"):
            backend.install()
    assert leftovers(env) == []
    assert Ledger(env.ledger_path).entries() == []


def test_sweep_detaches_by_query_when_pins_are_gone(capture_env: CaptureEnv) -> None:
    """Attachments outlive pins: a sweep finds the programs through the cgroup by their id."""
    env = capture_env
    if env.kind != "ebpf":
        pytest.skip("pins are an eBPF matter")
    backend = env.make_backend()
    backend.install()
    env.backend = None
    del backend
    gc.collect()  # closes the map fds the backend held
    for name in os.listdir(env.ctx.pin_dir):
        os.unlink(env.ctx.pin_dir / name)
    assert any("mn_connect4" in line for line in leftovers(env))

    assert Ledger(env.ledger_path).undo_all(undo_functions()) == []
    assert leftovers(env) == []


def test_sync_after_a_restart_converges_on_maps_already_filled(capture_env: CaptureEnv) -> None:
    """A new agent over maps pinned with content (hitless restart): its first sync reads them
    back once and removes what is stale; later syncs write only what changed."""
    env = capture_env
    if env.kind != "ebpf":
        pytest.skip("pinned maps are an eBPF matter (iptables chains are rewritten whole)")
    env.serve(env.proxy, "proxy", f"127.0.0.1:{env.ctx.outbound_port}")
    env.serve(None, "backend", f"{VIP}:80", f"{VIP_CLOSED}:80")
    backend = env.make_backend()
    backend.install()
    both = frozenset({vip_rule(VIP, SVC_VIP), vip_rule(VIP_CLOSED, SVC_CLOSED)})
    backend.sync(CaptureState(rules=both, ready=frozenset({SVC_VIP, SVC_CLOSED})))
    assert env.connect(env.app_service, VIP_CLOSED, 80)["reply"] == f"proxy {VIP_CLOSED}:80"

    with CaptureMaps.open(env.ctx.pin_dir) as adopted:  # what a restarted agent opens
        only_vip = CaptureState(rules=frozenset({vip_rule(VIP, SVC_VIP)}),
                                ready=frozenset({SVC_VIP}))
        adopted.sync(only_vip)
        assert adopted.last_writes == 2  # VIP_CLOSED's destination and its flags: stale
        assert adopted.contents() == MapContents.of(only_vip)
        assert env.connect(env.app_service, VIP_CLOSED, 80)["reply"].startswith("backend ")
        assert env.connect(env.app_service, VIP, 80)["reply"] == f"proxy {VIP}:80"
        adopted.sync(dataclasses.replace(only_vip, ready=frozenset()))
        assert adopted.last_writes == 1  # one flag, nothing else
        assert env.connect(env.app_service, VIP, 80)["reply"].startswith("backend ")
