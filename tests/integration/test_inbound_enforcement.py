"""Inbound mTLS enforcement in the kernel (issue 14 item 5), as a user sees it, with both
capture backends: a real agent in a "server" namespace, a plaintext client in a "client"
namespace joined to it by a veth pair in 198.19.0.0/16.

STRICT: the remote plaintext client is refused at once (a reset: ECONNREFUSED, well under a
second), while a client on the server's loopback and one connecting from the server's own
address (what the agent's inbound mTLS proxy does) get through. PERMISSIVE: the remote client
gets through and `meshnode_inbound_plaintext_total` counts it. DISABLE: untouched. The
enforcement outlives an agent restart (the next agent adopts it) and `meshnode uninstall`
leaves no link, program, pin or chain behind. A kernel without sk_lookup (simulated) falls
back to the iptables chain under the eBPF capture.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode.capture.ebpf import BpfCapture
from meshnode.model import CaptureState, InboundRule
from tests.harness import Host, free_port, kernel_leftovers, wait_for
from tests.integration.capture_fixtures import (
    CaptureEnv,
    capture_env_fixture,  # noqa: F401 (the capture_env fixture)
    iptables_leftovers,
    netns_fixture,  # noqa: F401 (the netns fixture)
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# A plaintext client: connect, read the server's one line; JSON with the reply or the errno,
# and how long it took. argv: HOST PORT [SOURCE_IP].
CLIENT = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.settimeout(5)
if len(sys.argv) > 3:
    s.bind((sys.argv[3], 0))
t = time.monotonic()
try:
    s.connect((host, port))
    data = s.makefile().readline().strip()
    print(json.dumps({"reply": data, "secs": time.monotonic() - t}))
except OSError as e:
    print(json.dumps({"errno": e.errno, "secs": time.monotonic() - t}))
"""


@dataclass
class Pair:
    """Two namespaces on one veth pair: `server` (an agent's host) and `client`."""

    server: str
    client: str
    server_ip: str
    client_ip: str

    def connect(self, ns: str, host: str, port: int, source: str | None = None
                ) -> dict[str, Any]:
        argv = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", CLIENT, host,
                str(port), *([source] if source else [])]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def remote(self, port: int) -> dict[str, Any]:
        """From the other host to the server's address."""
        return self.connect(self.client, self.server_ip, port)


@pytest.fixture
def pair() -> Iterator[Pair]:
    from pyroute2 import NetNS, netns

    tag = secrets.token_hex(3)
    subnet = 1 + secrets.randbelow(250)
    p = Pair(f"mn-in-{tag}-s", f"mn-in-{tag}-c", f"198.19.{subnet}.1", f"198.19.{subnet}.2")
    made: list[str] = []
    try:
        for name in (p.server, p.client):
            netns.create(name)
            made.append(name)
        with NetNS(p.server) as ns:
            ns.link("add", ifname="eth0", kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": p.client})
        for name, ip in ((p.server, p.server_ip), (p.client, p.client_ip)):
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                eth = ns.link_lookup(ifname="eth0")[0]
                ns.addr("add", index=eth, address=ip, prefixlen=24)
                ns.link("set", index=eth, state="up")
        yield p
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                netns.remove(name)


@pytest.fixture(params=["ebpf", "iptables"])
def host(request: pytest.FixtureRequest, pair: Pair, tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path / "srv", str(request.param), workers=1, netns=pair.server,
             agent_args=("--host-address", pair.server_ip, "--node", "srv"))
    try:
        yield h
    finally:
        h.close()


def metric(h: Host, service: str, verdict: str) -> float:
    status, body = h.http_get("/metrics")
    assert status == 200
    series = f'meshnode_inbound_plaintext_total{{service="{service}",verdict="{verdict}"}}'
    m = re.search("^" + re.escape(series) + r" (\S+)$", body, re.M)
    return float(m.group(1)) if m else -1.0


def serve(h: Host, service: str) -> int:
    """A server of `service` on every address (an endpoint at the host's address)."""
    port = free_port()
    h.server(service, port, service=service, host="0.0.0.0")
    return port


def netns_links() -> dict[int, dict[str, Any]]:
    """Every netns bpf_link on the machine (sk_lookup among them), by id."""
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {int(link["id"]): link for link in json.loads(out) if link.get("type") == "netns"}


def our_link(h: Host, pair: Pair) -> tuple[int, int]:
    """(link id, program id) of the sk_lookup link this host's agent pinned, checked to be
    attached to the server namespace and to run mn_inbound."""
    from meshnode.bpf import syscall

    pin = Path("/sys/fs/bpf/meshnode") / h.tag / "link_mn_inbound"
    fd = syscall.obj_get(str(pin))
    try:
        info = syscall.link_info(fd)
    finally:
        os.close(fd)
    assert info.netns_ino == os.stat(f"/run/netns/{pair.server}").st_ino
    prog = syscall.prog_fd_by_id(info.prog_id)
    try:
        assert syscall.prog_info(prog).name == "mn_inbound"
    finally:
        os.close(prog)
    assert info.id in netns_links()
    return info.id, info.prog_id


def test_strict_refuses_remote_plaintext_permissive_counts_it(host: Host, pair: Pair) -> None:
    h = host
    h.start()
    h.call("apply", docs=[
        {"kind": "Mesh", "name": "mesh", "spec": {"mtls": {"mode": "PERMISSIVE"}}},
        {"kind": "Service", "name": "locked", "spec": {"mtls": "STRICT"}},
        {"kind": "Service", "name": "open", "spec": {}},  # the mesh default: PERMISSIVE
        {"kind": "Service", "name": "off", "spec": {"mtls": "DISABLE"}}])
    strict, permissive, off = serve(h, "locked"), serve(h, "open"), serve(h, "off")
    for name, port in (("locked", strict), ("open", permissive), ("off", off)):
        h.wait_endpoints(name, {f"{pair.server_ip}:{port}"})
    wait_for("STRICT enforced", lambda: pair.remote(strict).get("errno") == errno.ECONNREFUSED)

    # STRICT: the other host's plaintext client is reset at once, never left hanging.
    refused = pair.remote(strict)
    assert refused["errno"] == errno.ECONNREFUSED and refused["secs"] < 1.0, refused
    print(f"\n{h.backend}: STRICT refusal seen by the remote client after "
          f"{refused['secs'] * 1000:.2f} ms")
    # Local sources pass: the server's loopback, and its own address as the source.
    assert pair.connect(pair.server, "127.0.0.1", strict)["reply"] == "locked"
    assert pair.connect(pair.server, pair.server_ip, strict,
                        source=pair.server_ip)["reply"] == "locked"
    # PERMISSIVE: through, and counted; DISABLE: through, not counted.
    assert pair.remote(permissive)["reply"] == "open"
    assert pair.remote(off)["reply"] == "off"
    wait_for("counters", lambda: metric(h, "open", "accepted") >= 1
             and metric(h, "locked", "refused") >= 2)
    assert metric(h, "off", "accepted") == -1.0  # no series: DISABLE is not enforced

    # The mesh default turns STRICT: the PERMISSIVE-by-default service now refuses too.
    h.call("apply", docs=[{"kind": "Mesh", "name": "mesh",
                           "spec": {"mtls": {"mode": "STRICT"}}}])
    wait_for("mesh default STRICT",
             lambda: pair.remote(permissive).get("errno") == errno.ECONNREFUSED)
    assert pair.remote(off)["reply"] == "off"

    # A restart keeps the enforcement (the kernel holds it; the next agent adopts it).
    link = our_link(h, pair) if h.backend == "ebpf" else None
    h.stop()
    assert pair.remote(strict).get("errno") == errno.ECONNREFUSED
    h.start()
    assert pair.remote(strict).get("errno") == errno.ECONNREFUSED
    assert pair.connect(pair.server, "127.0.0.1", strict)["reply"] == "locked"
    if link is not None:
        assert our_link(h, pair) == link  # adopted, not made anew
        # An upgrade (another program build): the link stays, its program is swapped in
        # place (BPF_LINK_UPDATE), with no moment of plaintext let through.
        h.stop()
        h.start(env={"MESHNODE_BUILD_ID": "next"})
        link_id, prog_id = our_link(h, pair)
        assert link_id == link[0] and prog_id != link[1]
        assert pair.remote(strict).get("errno") == errno.ECONNREFUSED
        link = (link_id, prog_id)

    # Removal: nothing left, and plaintext reaches the port again. Through the running agent
    # (eBPF), or offline from the ledger alone once the agent stopped (iptables).
    if h.backend == "iptables":
        h.stop()
        assert pair.remote(strict).get("errno") == errno.ECONNREFUSED
    done = h.uninstall()
    assert done.returncode == 0, done.stderr
    assert kernel_leftovers(h) == []
    assert link is None or link[0] not in netns_links()
    out = subprocess.run(["nsenter", f"--net=/run/netns/{pair.server}", "iptables-save"],
                         capture_output=True, text=True, check=True).stdout
    assert "MESHNODE-IN" not in out
    assert pair.remote(strict)["reply"] == "locked"


@pytest.mark.parametrize("capture_env", ["ebpf"], indirect=True)
def test_without_sk_lookup_the_ebpf_capture_enforces_with_iptables(
        capture_env: CaptureEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    env = capture_env
    monkeypatch.setattr("meshnode.capture.ebpf.probe_sk_lookup",
                        lambda: "kernel cannot load a sk_lookup program: Invalid argument")
    backend = env.make_backend()
    assert isinstance(backend, BpfCapture)
    backend.install()
    assert backend.inbound_reason.startswith("iptables: eBPF sk_lookup unavailable (kernel")
    backend.sync(CaptureState(inbound=frozenset({InboundRule(8443, 1, True, "locked"),
                                                 InboundRule(8080, 2, False, "open")})))
    rules = "\n".join(iptables_leftovers(env))
    assert re.search(r"--dport 8443 .*! --src-type LOCAL .*-j REJECT --reject-with tcp-reset",
                     rules), rules
    assert re.search(r"--dport 8080 .*! --src-type LOCAL .*-j RETURN", rules), rules
    assert backend.inbound_counts() == {"locked": {"accepted": 0, "refused": 0},
                                        "open": {"accepted": 0, "refused": 0}}
    assert not (env.ctx.pin_dir / "link_mn_inbound").exists()
    backend.remove()
    env.backend = None
    assert iptables_leftovers(env) == []


def test_inbound_rules_follow_mode_and_node() -> None:
    """The compiler's rule (pure): this node's endpoint ports, by the effective mode."""
    from meshnode.model import HostPort
    from meshnode.policy import compiler
    from meshnode.policy.records import EndpointRecord, ServiceRecord
    from meshnode.policy.resources import MeshMtls, MeshSpec, ServicePolicy

    def rec(name: str, sid: int, mtls: str | None, *eps: tuple[str, str]) -> ServiceRecord:
        return ServiceRecord(name, sid, IPv4Address(f"127.240.0.{sid}"),
                             ServicePolicy(mtls=mtls),  # type: ignore[arg-type]
                             endpoints=frozenset(EndpointRecord(HostPort.parse(a), "process",
                                                                node=n) for a, n in eps))

    services = {"a": rec("a", 1, "STRICT", ("10.0.0.1:80", "me"), ("10.0.0.2:81", "other")),
                "b": rec("b", 2, None, ("10.0.0.1:90", "me")),
                "c": rec("c", 3, "DISABLE", ("10.0.0.1:99", "me"))}
    assert compiler.inbound_rules(services, "me", None) == {
        InboundRule(80, 1, True, "a"), InboundRule(90, 2, False, "b")}
    strict_mesh = MeshSpec(mtls=MeshMtls(mode="STRICT"))
    assert compiler.inbound_rules(services, "me", strict_mesh) == {
        InboundRule(80, 1, True, "a"), InboundRule(90, 2, True, "b")}
    # The incremental form agrees, and hands out the same object while nothing changed.
    c = compiler.Compiler()
    c.run(services, lambda _n, _a: True)
    first = c.inbound("me", None)
    assert first == compiler.inbound_rules(services, "me", None)
    assert c.inbound("me", None) is first
    assert c.inbound("me", strict_mesh) == compiler.inbound_rules(services, "me", strict_mesh)
    assert c.capture_state(True, first).inbound_modes() == {80: True, 90: False}
