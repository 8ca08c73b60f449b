"""Feature probe for capture auto-selection: can this host run the eBPF backend?

Checks, cheapest first: root, a cgroup2 mount, bcc findable by the loader's interpreter
(without importing it: no LLVM in the agent), kernel headers for bcc, then the kernel itself:
it loads a two-instruction program of each type the backend uses (connect4, connect6,
getpeername4, getpeername6, sock_ops, getsockopt; sendmsg4, recvmsg4 for DNS) with raw bpf(2) and
attaches/detaches each on a throwaway empty cgroup. (bpffs is not probed: the agent mounts it.)

`probe_features` is the itemised form `meshnode doctor` reports: one result per hook type and
one per helper the C programs call, each helper loaded in a program of every hook type whose
C file calls it.
Feature probes over version checks: kernels backport, and a version says nothing about config.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import logging
import os
import platform
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from meshnode.bpf import syscall
from meshnode.bpf.program import AttachType, ProgType, all_entries, all_programs
from meshnode.errors import BpfError, MeshnodeError
from meshnode.host import cgroup

log = logging.getLogger(__name__)

# r0 = 1; exit: "proceed" for every hook the backend uses.
_PROCEED = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
_CALL = 0x85  # BPF_JMP | BPF_CALL; imm = helper id

# libbpf's section names: what `bpftool` and kernel docs call each hook.
HOOK_NAMES: dict[AttachType, str] = {
    AttachType.CGROUP_INET4_CONNECT: "cgroup/connect4",
    AttachType.CGROUP_INET6_CONNECT: "cgroup/connect6",
    AttachType.CGROUP_SOCK_OPS: "sockops",
    AttachType.CGROUP_GETSOCKOPT: "cgroup/getsockopt",
    AttachType.CGROUP_UDP4_SENDMSG: "cgroup/sendmsg4",
    AttachType.CGROUP_UDP4_RECVMSG: "cgroup/recvmsg4",
    AttachType.CGROUP_INET4_GETPEERNAME: "cgroup/getpeername4",
    AttachType.CGROUP_INET6_GETPEERNAME: "cgroup/getpeername6",
}

# enum bpf_func_id (uapi/linux/bpf.h): append-only, so the numbers never change.
HELPER_IDS: dict[str, int] = {
    "bpf_map_lookup_elem": 1,
    "bpf_map_update_elem": 2,
    "bpf_map_delete_elem": 3,
    "bpf_ktime_get_ns": 5,
    "bpf_get_prandom_u32": 7,
    "bpf_get_current_pid_tgid": 14,
    "bpf_get_current_uid_gid": 15,
    "bpf_get_socket_cookie": 46,
    "bpf_sock_ops_cb_flags_set": 59,
    "bpf_get_current_cgroup_id": 80,
}
# bcc rewrites `map.method(...)` into these helper calls.
_BCC_MAP_METHODS: dict[str, tuple[str, ...]] = {
    "lookup": ("bpf_map_lookup_elem",),
    "update": ("bpf_map_update_elem",),
    "insert": ("bpf_map_update_elem",),
    "delete": ("bpf_map_delete_elem",),
    "increment": ("bpf_map_lookup_elem", "bpf_map_update_elem"),
    "lookup_or_try_init": ("bpf_map_lookup_elem", "bpf_map_update_elem"),
}
_NOT_HELPERS = frozenset({"bpf_htons", "bpf_htonl", "bpf_ntohs", "bpf_ntohl"})  # macros
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_HELPER_CALL = re.compile(r"\b(bpf_[a-z0-9_]+)\s*\(")
_METHOD_CALL = re.compile(r"\.\s*([a-z_]+)\s*\(")
# What the verifier says when the helper itself is unavailable to the program type: "unknown
# func" (older kernels), "program of this type cannot use helper" (6.x), "invalid func" (an id
# past the kernel's last helper). Any other rejection came later: the helper exists.
_HELPER_MISSING = ("unknown func", "cannot use helper", "invalid func")
_LOG_SIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str  # why not, or what works


@dataclass(frozen=True, slots=True)
class FeatureResult:
    """One hook type ("cgroup/connect4") or helper ("bpf_get_socket_cookie") of the kernel."""

    feature: str
    ok: bool
    detail: str


def probe() -> ProbeResult:
    """Never raises: every failure becomes a reason."""
    if os.geteuid() != 0:
        return ProbeResult(False, "not running as root (CAP_BPF, CAP_NET_ADMIN needed)")
    try:
        mount = cgroup.cgroup2_mount()
    except MeshnodeError as exc:
        return ProbeResult(False, exc.message)
    if bcc_origin() is None:
        return ProbeResult(False, "bcc (python3-bpfcc) is not importable")
    headers = kernel_headers()
    if not headers.exists():
        return ProbeResult(False, f"no kernel headers at {headers} (bcc needs them)")
    return _probe_kernel(mount)


def bcc_origin() -> Path | None:
    """Where this interpreter (the loader's) would import bcc from; finding a top-level package
    does not import it."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def kernel_headers() -> Path:
    """The build tree bcc compiles against."""
    return Path("/lib/modules") / platform.release() / "build"


def helpers_called(source: str) -> set[str]:
    """Helper names a C program calls, bcc map methods included (comments ignored)."""
    code = _COMMENT.sub(" ", source)
    names = {n for n in _HELPER_CALL.findall(code) if n not in _NOT_HELPERS}
    for method in _METHOD_CALL.findall(code):
        names.update(_BCC_MAP_METHODS.get(method, ()))
    return names


def helper_missing(verifier_log: str) -> bool:
    """Whether a rejected load was about the helper itself being unavailable."""
    return any(marker in verifier_log for marker in _HELPER_MISSING)


def hooks_used() -> list[tuple[ProgType, AttachType]]:
    """Each distinct (program type, attach type) the backend loads, in load order."""
    seen: dict[AttachType, ProgType] = {}
    for entry in all_entries():
        seen.setdefault(entry.attach_type, entry.prog_type)
    return [(ptype, atype) for atype, ptype in seen.items()]


def helpers_used() -> dict[str, list[tuple[ProgType, AttachType]]]:
    """Helper name -> the hook types of the C files that call it."""
    used: dict[str, list[tuple[ProgType, AttachType]]] = {}
    for program in all_programs():
        source = resources.files("meshnode.bpf_src").joinpath(program.source).read_text()
        for name in sorted(helpers_called(source)):
            hooks = used.setdefault(name, [])
            for entry in program.entries:
                if (entry.prog_type, entry.attach_type) not in hooks:
                    hooks.append((entry.prog_type, entry.attach_type))
    return used


def probe_features(mount: Path) -> list[FeatureResult]:
    """One result per hook type (load, attach, detach on a throwaway cgroup under `mount`),
    then one per helper. Never raises; leaves nothing behind."""
    hooks = hooks_used()
    try:
        with _throwaway_cgroup(mount) as cg_fd:
            results = [_probe_hook(cg_fd, ptype, atype) for ptype, atype in hooks]
    except OSError as exc:
        why = f"not checked: cannot create a cgroup under {mount}: {exc.strerror}"
        results = [FeatureResult(HOOK_NAMES[atype], False, why) for _, atype in hooks]
    for name, used_by in helpers_used().items():
        results.append(_probe_helper(name, used_by))
    return results


def _probe_kernel(mount: Path) -> ProbeResult:
    try:
        with _throwaway_cgroup(mount) as cg_fd:
            return _load_and_attach_each(cg_fd)
    except OSError as exc:
        return ProbeResult(False, f"cannot create a cgroup under {mount}: {exc.strerror}")


@contextlib.contextmanager
def _throwaway_cgroup(mount: Path) -> Iterator[int]:
    """An empty cgroup of our own, open; removed (and its fd closed) on the way out."""
    group = mount / f"meshnode-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        cg_fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield cg_fd
        finally:
            os.close(cg_fd)
    finally:
        _remove_group(group)


def _load_and_attach_each(cg_fd: int) -> ProbeResult:
    for entry in all_entries():
        what = f"{entry.attach_type.name.lower()} program"
        try:
            fd = syscall.prog_load(entry.prog_type, _PROCEED, entry.attach_type, "mn_probe")
        except MeshnodeError as exc:
            return ProbeResult(False, f"kernel cannot load a {what}: {exc.message}")
        try:
            syscall.prog_attach(cg_fd, fd, entry.attach_type)
            syscall.prog_detach(cg_fd, fd, entry.attach_type)
        except MeshnodeError as exc:
            return ProbeResult(False, f"kernel cannot attach a {what}: {exc.message}")
        finally:
            os.close(fd)
    return ProbeResult(True, "cgroup connect4/connect6/getpeername4/getpeername6/sockops/"
                             "getsockopt and sendmsg4/recvmsg4 load and attach")


def probe_sk_lookup() -> str | None:
    """Whether inbound enforcement can use eBPF here: None if a sk_lookup program loads and
    links to this process's network namespace, else why not (one line). The throwaway
    program passes everything and its link goes with its fd. Never raises."""
    try:
        fd = syscall.prog_load(ProgType.SK_LOOKUP, _PROCEED, AttachType.SK_LOOKUP, "mn_probe")
    except MeshnodeError as exc:
        return f"kernel cannot load a sk_lookup program: {exc.message}"
    try:
        ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)  # setns is per thread
        try:
            os.close(syscall.link_create(fd, ns_fd, AttachType.SK_LOOKUP))
        finally:
            os.close(ns_fd)
    except MeshnodeError as exc:
        return f"kernel cannot link a sk_lookup program to the netns: {exc.message}"
    except OSError as exc:
        return f"cannot open this network namespace: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def _probe_hook(cg_fd: int, ptype: ProgType, atype: AttachType) -> FeatureResult:
    name = HOOK_NAMES[atype]
    try:
        fd = syscall.prog_load(ptype, _PROCEED, atype, "mn_probe")
    except MeshnodeError as exc:
        return FeatureResult(name, False, f"kernel cannot load it: {exc.message}")
    try:
        syscall.prog_attach(cg_fd, fd, atype)
        syscall.prog_detach(cg_fd, fd, atype)
    except MeshnodeError as exc:
        return FeatureResult(name, False, f"kernel cannot attach it to a cgroup: {exc.message}")
    finally:
        os.close(fd)
    return FeatureResult(name, True, "loads and attaches")


def _probe_helper(name: str, used_by: list[tuple[ProgType, AttachType]]) -> FeatureResult:
    helper_id = HELPER_IDS.get(name)
    if helper_id is None:
        return FeatureResult(name, False, "not probed: its helper id is unknown to meshnode")
    # At entry r1 holds the context: helpers taking it (get_socket_cookie) pass the verifier;
    # map helpers fail on r1's type, after the verifier found the helper: that is enough.
    insns = struct.pack("<BBhi", _CALL, 0, 0, helper_id) + _PROCEED
    missing: list[str] = []
    unknown: list[str] = []
    for ptype, atype in used_by:
        hook = HOOK_NAMES[atype]
        fd, err, verifier_log = _load_logged(ptype, insns, atype)
        if fd is not None:
            os.close(fd)
        elif helper_missing(verifier_log):
            missing.append(hook)
        elif not verifier_log:  # refused before the verifier ran (EPERM, ...)
            unknown.append(f"{hook} ({os.strerror(err)})")
    hooks = ", ".join(HOOK_NAMES[atype] for _, atype in used_by)
    if missing:
        return FeatureResult(name, False, f"not available to {', '.join(missing)} programs")
    if unknown:
        return FeatureResult(name, False, f"cannot tell: load refused for {', '.join(unknown)}")
    return FeatureResult(name, True, f"available to {hooks}")


def _load_logged(ptype: int, insns: bytes, atype: int) -> tuple[int | None, int, str]:
    """syscall.prog_load with a verifier log: (fd or None, errno, log). The log is what tells
    "no such helper" from "helper exists, arguments wrong"."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.c_char_p(b"GPL")
    buf = ctypes.create_string_buffer(_LOG_SIZE)
    # bpf_attr for BPF_PROG_LOAD, log_level 1; the same layout as syscall.prog_load.
    attr = syscall._attr("=IIQQIIQII16sII", ptype, len(insns) // 8, syscall._addr(code),
                         syscall._addr(lic), 1, _LOG_SIZE, syscall._addr(buf), 0, 0,
                         b"mn_probe", 0, atype)
    try:
        return syscall._bpf(syscall.PROG_LOAD, attr, "load mn_probe"), 0, ""
    except BpfError as exc:
        return None, exc.errno, buf.value.decode(errors="replace")


def _remove_group(group: Path) -> None:
    # An empty cgroup with nothing attached any more: rmdir cannot be busy for long, and a
    # leftover would only be an empty directory. A warning, not an error: probe() never raises.
    try:
        group.rmdir()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove probe cgroup %s: %s", group, exc.strerror)
