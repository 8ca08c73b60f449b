"""Inbound enforcement without a kernel: the iptables chain text, its counters read back, the
per-service counts, and how two services sharing a port combine."""

from __future__ import annotations

from pathlib import Path

from meshnode.bpf.inbound import InboundCount
from meshnode.capture import CaptureContext
from meshnode.capture.inbound import IptablesInbound, _parse_counts, per_service
from meshnode.host.ledger import Ledger
from meshnode.model import CaptureState, InboundRule

LOCKED = InboundRule(8443, 1, True, "locked")
OPEN = InboundRule(8080, 2, False, "open")


def _ctx(tmp_path: Path) -> CaptureContext:
    return CaptureContext("unit", Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/a"),
                          Path("/sys/fs/cgroup/p"), Path("/sys/fs/bpf/meshnode/unit"), 15001,
                          0x4D4E0001, Ledger(tmp_path / "ledger.json"))


def test_the_chain_refuses_strict_ports_and_counts_permissive_ones(tmp_path: Path) -> None:
    enforcer = IptablesInbound(_ctx(tmp_path), binary="iptables")
    text = enforcer.render({8443: True, 8080: False}, {8443: InboundCount(refused=7)})
    assert text.startswith("# meshnode inbound")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "*filter",
        ":MESHNODE-IN-unit - [0:0]",
        "[0:0] -A MESHNODE-IN-unit -p tcp --syn --dport 8080 -m addrtype ! --src-type LOCAL "
        "-j RETURN",
        "[7:0] -A MESHNODE-IN-unit -p tcp --syn --dport 8443 -m addrtype ! --src-type LOCAL "
        "-j REJECT --reject-with tcp-reset",
        "COMMIT"]
    assert enforcer.jump() == ["-p", "tcp", "--syn", "-m", "comment", "--comment",
                               "meshnode:unit", "-j", "MESHNODE-IN-unit"]


def test_counters_read_back_from_iptables_listing() -> None:
    listing = (
        "-N MESHNODE-IN-unit\n"
        "-A MESHNODE-IN-unit -p tcp -m tcp --dport 8080 --tcp-flags FIN,SYN,RST,ACK SYN "
        "-m addrtype ! --src-type LOCAL -c 3 180 -j RETURN\n"
        "-A MESHNODE-IN-unit -p tcp -m tcp --dport 8443 --tcp-flags FIN,SYN,RST,ACK SYN "
        "-m addrtype ! --src-type LOCAL -c 5 300 -j REJECT --reject-with tcp-reset\n")
    assert _parse_counts(listing) == {8080: InboundCount(accepted=3),
                                      8443: InboundCount(refused=5)}


def test_counts_by_service_and_a_shared_port_is_strict() -> None:
    shared = InboundRule(8443, 3, False, "also")  # a PERMISSIVE service on LOCKED's port
    state = CaptureState(inbound=frozenset({LOCKED, OPEN, shared}))
    assert state.inbound_modes() == {8443: True, 8080: False}
    counts = {8443: InboundCount(refused=4), 8080: InboundCount(accepted=2),
              9999: InboundCount(accepted=1)}  # a port no rule names any more: not shown
    assert per_service(state.inbound, counts) == {
        "locked": {"accepted": 0, "refused": 4}, "open": {"accepted": 2, "refused": 0}}
