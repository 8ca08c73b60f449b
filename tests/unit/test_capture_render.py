"""Capture rendering without a kernel: iptables-restore input, chain names, BPF map key/value
packing, the compiler flags, and the backend chooser."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from meshnode import constants
from meshnode.bpf import maps
from meshnode.bpf.compile import BuildConfig, cflags, check_pin_dir, render_source
from meshnode.bpf.probe import ProbeResult
from meshnode.capture import CaptureContext
from meshnode.capture.auto import choose, install
from meshnode.capture.ebpf import BpfCapture
from meshnode.capture.iptables import (
    CHAIN_MAX,
    Chains,
    IptablesCapture,
    chain_name,
    jump_rule,
    render_rules,
)
from meshnode.errors import BpfError, UnavailableError, UsageError
from meshnode.host.ledger import Ledger
from meshnode.model import CaptureRule, CaptureState

VIP = IPv4Address("127.240.0.7")
EP = IPv4Address("127.0.0.1")
STATE = CaptureState(
    rules=frozenset({CaptureRule(VIP, 0, 1), CaptureRule(EP, 8080, 2),
                     CaptureRule(IPv4Address("127.240.0.9"), 0, 3)}),
    ready=frozenset({1, 2}),
    fail_closed=frozenset({2, 3}),
)


def _body(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def test_render_rules_redirects_ready_and_refuses_fail_closed() -> None:
    chains = Chains.for_instance("blue")
    text = render_rules(chains, STATE, 15001, constants.PROXY_MARK)
    assert _body(text) == [
        "*nat",
        ":MESHNODE-NAT-blue - [0:0]",
        "-A MESHNODE-NAT-blue -m mark --mark 0x4d4e0001 -j RETURN",
        "-A MESHNODE-NAT-blue -d 127.0.0.1/32 -p tcp --dport 8080 -j REDIRECT --to-ports 15001",
        "-A MESHNODE-NAT-blue -d 127.240.0.7/32 -p tcp -j REDIRECT --to-ports 15001",
        "COMMIT",
        "*filter",
        ":MESHNODE-REJ-blue - [0:0]",
        "-A MESHNODE-REJ-blue -m mark --mark 0x4d4e0001 -j RETURN",
        "-A MESHNODE-REJ-blue -d 127.240.0.9/32 -p tcp -j REJECT --reject-with tcp-reset",
        "COMMIT",
    ]


def test_render_empty_state_keeps_only_the_mark_exemption() -> None:
    text = render_rules(Chains.for_instance("x"), CaptureState(), 15001, 1)
    assert [ln for ln in _body(text) if ln.startswith("-A")] == [
        "-A MESHNODE-NAT-x -m mark --mark 0x1 -j RETURN",
        "-A MESHNODE-REJ-x -m mark --mark 0x1 -j RETURN",
    ]


@pytest.mark.parametrize("instance", ["default", "a" * 40, "team-payments-eu-west-1"])
def test_chain_names_fit_and_stay_distinct(instance: str) -> None:
    chains = Chains.for_instance(instance)
    assert len(chains.nat) <= CHAIN_MAX and len(chains.filter) <= CHAIN_MAX
    assert chains.nat != chains.filter
    assert "MESHNODE" in chains.nat


def test_long_instance_names_stay_unique_once_shortened() -> None:
    assert chain_name("NAT", "a" * 40) != chain_name("NAT", "a" * 39 + "b")


def test_jump_rule_matches_the_apps_cgroup_subtree() -> None:
    assert jump_rule("MESHNODE-NAT-i", "/meshnode-i.slice/apps", "i") == [
        "-p", "tcp", "-m", "cgroup", "--path", "/meshnode-i.slice/apps",
        "-m", "comment", "--comment", "meshnode:i", "-j", "MESHNODE-NAT-i"]


def test_addr4_packing_is_network_order_and_padded() -> None:
    raw = maps.pack_addr4(VIP, 80)
    assert raw == bytes([127, 240, 0, 7, 0, 80, 0, 0])
    assert len(raw) == maps.ADDR4_SIZE == 8
    assert maps.unpack_addr4(raw) == (VIP, 80)
    assert maps.unpack_addr4(maps.pack_addr4(EP, 0)) == (EP, 0)


def test_u32_packing_is_host_order() -> None:
    assert maps.pack_u32(0x01020304) == struct.pack("=I", 0x01020304)
    assert maps.unpack_u32(maps.pack_u32(4096)) == 4096


def test_map_contents_of_state() -> None:
    want = maps.MapContents.of(STATE)
    assert want.dests == {(VIP, 0): 1, (EP, 8080): 2, (IPv4Address("127.240.0.9"), 0): 3}
    assert want.services == {
        1: constants.SVC_READY,
        2: constants.SVC_READY | constants.SVC_FAIL_CLOSED,
        3: constants.SVC_FAIL_CLOSED,
    }
    # A service neither ready nor fail-closed needs no entry: absent means "pass".
    assert maps.MapContents.of(CaptureState(rules=frozenset({CaptureRule(VIP, 0, 9)}))).services \
        == {}


def test_sum_percpu_adds_every_cpu_slot() -> None:
    raw = struct.pack("=QQQ", 1, 2, 40)
    assert maps.sum_percpu(raw, 3) == 43


def test_cflags_carry_every_constant_and_instance_overrides() -> None:
    config = BuildConfig(Path("/sys/fs/bpf/meshnode/blue"), outbound_port=25001, proxy_mark=7)
    flags = cflags(config, Path("/inc"))
    assert flags[0] == "-I/inc"
    for name in constants.bpf_defines():
        assert any(f.startswith(f"-D{name}=") for f in flags), name
    assert "-DMN_OUTBOUND_PORT=25001" in flags
    assert "-DMN_PROXY_MARK=7" in flags
    assert '-DMN_PIN_DIR="/sys/fs/bpf/meshnode/blue"' in flags


@pytest.mark.parametrize("bad", ["relative/dir", "/sys/fs/bpf/a b", '/x"y', "/sys/fs/bpf/../x"])
def test_pin_dir_must_be_a_plain_absolute_path(bad: str) -> None:
    with pytest.raises(UsageError):
        check_pin_dir(Path(bad))


def test_render_source_shows_every_file_with_its_flags() -> None:
    text = render_source()
    for name in ("mn_maps.h", "mn_connect.c", "mn_sockops.c", "mn_getsockopt.c"):
        assert f"==== {name}" in text or f"==== include/{name}" in text
    for entry in ("mn_connect4", "mn_connect6", "mn_sockops", "mn_getsockopt"):
        assert f"int {entry}(" in text
    assert f"-DMN_OUTBOUND_PORT={constants.OUTBOUND_PORT}" in text


def _ctx(tmp_path: Path) -> CaptureContext:
    mount = Path("/sys/fs/cgroup")
    return CaptureContext("t", mount, mount / "m.slice/apps", mount / "m.slice/proxy",
                          tmp_path / "pins", 15001, constants.PROXY_MARK,
                          Ledger(tmp_path / "ledger.json"))


def test_choose_prefers_ebpf_and_falls_back_with_a_reason(tmp_path: Path) -> None:
    ok = choose(_ctx(tmp_path), "auto", probe_result=ProbeResult(True, "all good"))
    assert isinstance(ok.backend, BpfCapture) and ok.reason == "ebpf: all good"
    fallback = choose(_ctx(tmp_path), "auto", probe_result=ProbeResult(False, "no bcc"))
    assert isinstance(fallback.backend, IptablesCapture)
    assert fallback.reason == "iptables: eBPF unavailable (no bcc)"
    forced = choose(_ctx(tmp_path), "iptables", iptables_binary="iptables-legacy")
    assert isinstance(forced.backend, IptablesCapture)
    assert forced.backend.binary == "iptables-legacy"


def test_auto_falls_back_to_iptables_when_the_ebpf_install_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: BpfCapture) -> None:
        raise BpfError("BPF loader failed (exit 1): clang: error")

    installed: list[object] = []
    monkeypatch.setattr(BpfCapture, "install", broken)
    monkeypatch.setattr(IptablesCapture, "install", lambda self: installed.append(self))
    choice = install(_ctx(tmp_path), "auto", probe_result=ProbeResult(True, "all good"))
    assert isinstance(choice.backend, IptablesCapture) and installed == [choice.backend]
    assert choice.reason == ("iptables: eBPF install failed "
                             "(BPF loader failed (exit 1): clang: error)")
    with pytest.raises(BpfError):  # asked for eBPF explicitly: no silent fallback
        install(_ctx(tmp_path), "ebpf", probe_result=ProbeResult(True, "all good"))


def test_choose_explicit_ebpf_when_unavailable_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError) as err:
        choose(_ctx(tmp_path), "ebpf", probe_result=ProbeResult(False, "no bcc"))
    assert "no bcc" in err.value.message and "iptables" in err.value.hint
    with pytest.raises(UsageError):
        choose(_ctx(tmp_path), "tproxy")
