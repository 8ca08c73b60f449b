"""Capture rendering without a kernel: iptables-restore input, chain names, BPF map key/value
packing, the compiler flags, and the backend chooser."""

from __future__ import annotations

import dataclasses
import struct
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# -- incremental sync: what a sync writes into the maps, without a kernel ---------------------

def _write(kernel: maps.MapContents, delta: maps.MapDelta) -> None:
    """Apply `delta` to a model of the two maps as CaptureMaps.sync does, refusing no-ops."""
    for key, sid in delta.dest_updates:
        assert kernel.dests.get(key) != sid, f"needless write {key}"
        kernel.dests[key] = sid
    for sid, flags in delta.svc_updates:
        assert kernel.services.get(sid) != flags, f"needless write {sid}"
        kernel.services[sid] = flags
    for key in delta.dest_deletes:
        del kernel.dests[key]
    for sid in delta.svc_deletes:
        del kernel.services[sid]


_IPS = [IPv4Address(f"127.240.0.{i}") for i in range(1, 5)]
_rule = st.builds(CaptureRule, st.sampled_from(_IPS), st.sampled_from([0, 80]),
                  st.integers(1, 4))
_ids = st.frozensets(st.integers(1, 5))
_state = st.builds(CaptureState, st.frozensets(_rule, max_size=8), _ids, _ids)


@settings(max_examples=300, deadline=None)
@given(start=_state, states=st.lists(_state, min_size=1, max_size=6))
def test_sync_writes_reach_exactly_what_a_full_rewrite_would(
        start: CaptureState, states: list[CaptureState]) -> None:
    # The maps hold something already (an agent restarted over pinned maps): the first sync
    # reads it back and converges; every later one writes only the difference.
    kernel = maps.MapContents.of(start)
    mirror, delta = maps.MapMirror.converge(maps.MapContents(dict(kernel.dests),
                                                             dict(kernel.services)), states[0])
    _write(kernel, delta)
    assert kernel == maps.MapContents.of(states[0])
    for state in states[1:]:
        _write(kernel, mirror.step(state))
        assert kernel == maps.MapContents.of(state)
    assert mirror.step(states[-1]) == maps.MapDelta()  # nothing changed: nothing written


def _mesh(n: int) -> set[CaptureRule]:
    rules = set()
    for sid in range(1, n + 1):
        rules.add(CaptureRule(IPv4Address(0x7FF00000 + sid), 0, sid))
        rules.update(CaptureRule(IPv4Address(0xC6120000 + 4 * sid + j), 8000, sid)
                     for j in range(4))
    return rules


def test_one_more_service_in_a_large_mesh_writes_only_its_own_keys() -> None:
    rules = _mesh(10_000)
    ids = frozenset(range(1, 10_001))
    mirror, first = maps.MapMirror.converge(maps.MapContents(), CaptureState(
        frozenset(rules), ids, frozenset()))
    assert len(first) == 50_000 + 10_000
    new = {CaptureRule(IPv4Address("127.250.0.1"), 0, 10_001),
           *(CaptureRule(IPv4Address(f"198.19.0.{j}"), 8000, 10_001) for j in range(1, 5))}
    # Built afresh, as the agent builds each state: equal rules, new objects.
    delta = mirror.step(CaptureState(frozenset(_mesh(10_000) | new), ids | {10_001},
                                     frozenset({10_001})))
    assert sorted(delta.dest_updates) == sorted(((r.ip, r.port), 10_001) for r in new)
    assert delta.svc_updates == [(10_001, constants.SVC_READY | constants.SVC_FAIL_CLOSED)]
    assert delta.dest_deletes == [] and delta.svc_deletes == []
    # One endpoint goes: one delete, the service's flags stay.
    gone = CaptureRule(IPv4Address("198.19.0.4"), 8000, 10_001)
    delta = mirror.step(CaptureState(frozenset(_mesh(10_000) | new - {gone}),
                                     ids | {10_001}, frozenset({10_001})))
    assert delta == maps.MapDelta(dest_deletes=[(gone.ip, 8000)])


def test_a_service_losing_its_last_address_loses_its_flags_after_them() -> None:
    vip = CaptureRule(VIP, 0, 1)
    mirror, _ = maps.MapMirror.converge(maps.MapContents(), CaptureState(
        frozenset({vip}), frozenset({1})))
    delta = mirror.step(CaptureState(ready=frozenset({1})))
    assert delta == maps.MapDelta(dest_deletes=[(VIP, 0)], svc_deletes=[1])


def test_iptables_sync_runs_restore_only_when_the_chains_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs: list[str] = []

    def run(cmd: list[str], input_text: str | None = None) -> object:
        assert cmd[0] == "iptables-restore"
        inputs.append(input_text or "")
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr("meshnode.capture.iptables._run", run)
    backend = IptablesCapture(_ctx(tmp_path), binary="iptables")
    backend._installed = True  # install() needs root; sync's decisions do not
    backend.sync(STATE)
    backend.sync(dataclasses.replace(STATE))  # equal state: nothing runs
    # A service neither ready nor fail-closed shows in no chain: nothing runs either.
    backend.sync(dataclasses.replace(
        STATE, rules=STATE.rules | {CaptureRule(IPv4Address("127.240.0.20"), 0, 4)}))
    assert len(inputs) == backend.restores == 1
    backend.sync(dataclasses.replace(STATE, ready=frozenset({1})))
    assert len(inputs) == 2 and "--dport 8080 -j REDIRECT" not in inputs[1]
    # The chains are whole in every restore: atomic, as before.
    assert inputs[1].count("COMMIT") == 2
