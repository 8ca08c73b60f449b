"""`meshnode doctor`'s pure parts: capability masks, mountinfo, iptables versions, the
verifier-log verdict, the helpers found in our C programs, the can-run rule and the text a user
reads."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from meshnode.cli.doctor import doctor_text, verdict

from meshnode.bpf import probe
from meshnode.bpf.program import all_programs
from meshnode.diagnose import doctor
from meshnode.diagnose.doctor import Check

ROOT_CAPS = 0x000001FFFEFFFFFF  # root on a 6.x kernel (CapEff of `sudo -i`)


def test_cap_eff_is_parsed_from_proc_status() -> None:
    status = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n"
    assert doctor.parse_cap_eff(status) == ROOT_CAPS
    with pytest.raises(ValueError):
        doctor.parse_cap_eff("Name:\tx\n")


def test_missing_caps() -> None:
    assert doctor.missing_caps(ROOT_CAPS, last_cap=40) == []
    assert doctor.missing_caps(0, last_cap=40) == ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    no_bpf = ROOT_CAPS & ~(1 << 39)
    assert doctor.missing_caps(no_bpf, last_cap=40) == ["CAP_BPF"]
    # before 5.8 there is no CAP_BPF (last_cap 37): CAP_SYS_ADMIN covers it
    assert doctor.missing_caps(0x3FFFFFFFFF, last_cap=37) == []


MOUNTINFO = """\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw
50 1 0:45 / /mnt/with\\040space rw - ext4 /dev/vdb rw
"""


def test_visible_mounts() -> None:
    mounts = doctor.visible_mounts(MOUNTINFO)
    assert mounts["/sys/fs/bpf"] == "bpf"
    assert mounts["/sys/fs/cgroup/unified"] == "cgroup2"
    assert mounts["/mnt/with space"] == "ext4"


def test_a_mount_over_bpffs_hides_it() -> None:
    covered = MOUNTINFO + "60 42 0:50 / /sys/fs/bpf rw - tmpfs tmpfs rw\n"
    assert doctor.visible_mounts(covered)["/sys/fs/bpf"] == "tmpfs"
    assert "/sys/fs/bpf" not in doctor.visible_mounts(MOUNTINFO.replace("/sys/fs/bpf", "/x"))


@pytest.mark.parametrize(("text", "parsed"), [
    ("iptables v1.8.9 (nf_tables)\n", ("1.8.9", "nf_tables")),
    ("iptables v1.8.7 (legacy)\n", ("1.8.7", "legacy")),
    ("iptables-legacy v1.8.9 (legacy)", ("1.8.9", "legacy")),
    ("iptables v1.6.1\n", ("1.6.1", "legacy")),  # before 1.8: legacy is all there was
    ("garbage", None),
])
def test_iptables_version(text: str, parsed: tuple[str, str] | None) -> None:
    assert doctor.parse_iptables_version(text) == parsed


@pytest.mark.parametrize(("log", "missing"), [
    ("0: (85) call bpf_get_socket_cookie#46\n"
     "program of this type cannot use helper bpf_get_socket_cookie#46\n", True),
    ("0: (85) call bpf_get_socket_cookie#46\nunknown func bpf_get_socket_cookie#46\n", True),
    ("0: (85) call unknown#999\ninvalid func unknown#999\n", True),
    # found the helper, then objected to r1 (the ctx, not a map): the helper exists
    ("0: (85) call bpf_map_lookup_elem#1\nR1 type=ctx expected=map_ptr\n", False),
])
def test_verifier_log_tells_a_missing_helper_from_a_bad_argument(log: str,
                                                                  missing: bool) -> None:
    assert probe.helper_missing(log) is missing


def test_helpers_called_reads_helpers_and_bcc_map_methods_not_macros() -> None:
    src = """
    /* bpf_get_current_comm(x) only in a comment */
    __u64 c = bpf_get_socket_cookie(ctx);   // and bpf_ktime_get_ns() here
    ctx->user_port = bpf_htons(80);
    __u32 *v = mn_dest.lookup(&key);
    mn_cookie.update(&c, &orig);
    mn_cookie.delete(&c);
    mn_stats.increment(slot);
    """
    assert probe.helpers_called(src) == {"bpf_get_socket_cookie", "bpf_map_lookup_elem",
                                         "bpf_map_update_elem", "bpf_map_delete_elem"}


def test_every_helper_our_c_programs_call_has_a_known_id() -> None:
    """Otherwise doctor cannot probe it (it reports it as failed)."""
    for program in all_programs():
        source = resources.files("meshnode.bpf_src").joinpath(program.source).read_text()
        unknown = probe.helpers_called(source) - probe.HELPER_IDS.keys()
        assert not unknown, (program.source, unknown)
    used = probe.helpers_used()
    assert {"bpf_get_socket_cookie", "bpf_map_lookup_elem"} <= used.keys()
    hooks = {probe.HOOK_NAMES[a] for _, a in used["bpf_map_lookup_elem"]}
    assert "cgroup/getsockopt" in hooks and "sockops" in hooks


def test_headers_fix_names_the_debian_dirs(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for name in ("linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-9-common",
                 "linux-headers-6.1.0-56-amd64", "linux-headers-6.1.0-56-common"):
        (tmp_path / name).mkdir()
    assert doctor.headers_fix("6.18.1", tmp_path) == (
        "apt install linux-headers-amd64 && mkdir -p /lib/modules/6.18.1"
        f" && ln -sfn {tmp_path}/linux-headers-6.1.0-56-amd64 /lib/modules/6.18.1/build"
        f" && ln -sfn {tmp_path}/linux-headers-6.1.0-56-common /lib/modules/6.18.1/source")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert doctor.headers_fix("6.18.1", empty).startswith(
        "apt install linux-headers-amd64, then link /lib/modules/6.18.1/build and "
        "/lib/modules/6.18.1/source")


def ok(name: str, required: bool = False) -> Check:
    return Check(name, "ok", "fine", required=required)


def failed(name: str, required: bool = False) -> Check:
    return Check(name, "fail", "broken", "fix it", required=required)


BASE = [ok("privileges", True), ok("cgroup v2", True), ok("bpffs"), ok("kernel headers")]


def test_can_run_needs_root_cgroup2_and_one_backend() -> None:
    both = [*BASE, ok("capture: ebpf"), ok("capture: iptables")]
    assert doctor.can_run(both) and doctor.capture_backend(both) == "ebpf"
    only_iptables = [*BASE, failed("capture: ebpf"), ok("capture: iptables")]
    assert doctor.can_run(only_iptables)
    assert doctor.capture_backend(only_iptables) == "iptables"
    neither = [*BASE, failed("capture: ebpf"), failed("capture: iptables")]
    assert not doctor.can_run(neither) and doctor.capture_backend(neither) is None
    not_checked = [*BASE, Check("capture: ebpf", "warn", "not checked")]
    assert not doctor.can_run(not_checked)
    not_root = [failed("privileges", True), *BASE[1:], ok("capture: iptables")]
    assert not doctor.can_run(not_root)
    no_cgroup2 = [BASE[0], failed("cgroup v2", True), ok("capture: iptables")]
    assert not doctor.can_run(no_cgroup2)
    # warnings never stop it, on any check
    warned = [*BASE, Check("port 15001", "warn", "in use", "ss ..."), ok("capture: iptables")]
    assert doctor.can_run(warned)


def test_ebpf_verdict_names_what_it_lacks() -> None:
    checks = [*BASE[:3], failed("kernel headers"), ok("cgroup/connect4"),
              failed("helper bpf_get_socket_cookie"), Check("BTF", "warn", "absent")]
    v = doctor.ebpf_verdict(checks)
    assert (v.name, v.status) == ("capture: ebpf", "fail")
    assert v.detail == "unusable: needs kernel headers, helper bpf_get_socket_cookie"
    assert doctor.ebpf_verdict([*BASE, Check("BTF", "warn", "absent")]).status == "ok"
    unchecked = doctor.ebpf_verdict([*BASE, Check("bpf programs", "warn", "not checked")])
    assert (unchecked.status, unchecked.fix) == ("warn", "run as root: sudo meshnode doctor")


def test_table_text() -> None:
    checks = [ok("cgroup v2", True),
              Check("kernel headers", "fail", "/lib/modules/x/build missing",
                    "apt install linux-headers-amd64"),
              Check("BTF", "warn", "absent", "none needed"),
              ok("capture: iptables")]
    assert doctor_text(checks).splitlines() == [
        "  ok    cgroup v2          fine",
        "  FAIL  kernel headers     /lib/modules/x/build missing"
        "  -> fix: apt install linux-headers-amd64",
        "  warn  BTF                absent  -> fix: none needed",
        "  ok    capture: iptables  fine",
        "",
        "the agent can run (capture: iptables); 1 optional check failed",
    ]


def test_verdict_lines() -> None:
    assert verdict([*BASE, ok("capture: ebpf")]) == "the agent can run (capture: ebpf)"
    assert verdict([failed("privileges", True), *BASE[1:], failed("capture: ebpf"),
                    failed("capture: iptables")]) == "the agent cannot run: 3 problems"
