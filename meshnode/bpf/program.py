"""What a capture program is, as data: its C source, entry points, kernel program and attach
types, and what it attaches to (a cgroup, or the agent's network namespace).

Owns the kernel enum numbers meshnode uses (uapi/linux/bpf.h), so the agent can attach pinned
programs with raw syscalls without importing bcc. Imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

# "netns": the agent's network namespace, through a pinned bpf_link (meshnode.bpf.inbound)
CgroupRole = Literal["apps", "proxy", "netns"]


class ProgType(IntEnum):
    """enum bpf_prog_type."""

    SOCK_OPS = 13
    CGROUP_SOCK_ADDR = 18
    CGROUP_SOCKOPT = 25  # bcc 0.26 has no BPF.CGROUP_SOCKOPT; BPFProgType has it
    SK_LOOKUP = 30  # bcc 0.26: BPFProgType.SK_LOOKUP; no BPF.SK_LOOKUP shorthand


class AttachType(IntEnum):
    """enum bpf_attach_type."""

    CGROUP_SOCK_OPS = 3
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_GETSOCKOPT = 21
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    SK_LOOKUP = 36  # a netns link (BPF_LINK_CREATE), not a cgroup attachment


@dataclass(frozen=True, slots=True)
class EntrySpec:
    """One entry function: loaded as `prog_type` (with `attach_type` as the expected attach
    type, which sock_addr and sockopt programs need at load time), pinned as `pin_name`,
    attached to the `cgroup` role's cgroup."""

    function: str
    prog_type: ProgType
    attach_type: AttachType
    cgroup: CgroupRole
    # Order in which `remove` detaches: lower first. Connect hooks go first, so capture stops
    # (fails open) before the pieces that serve already-captured connections.
    detach_order: int

    @property
    def pin_name(self) -> str:
        return f"prog_{self.function}"


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """One C file under bpf/ (compiled as one bcc module) and its entry points."""

    source: str  # file name inside the meshnode.bpf_src package
    entries: tuple[EntrySpec, ...]


def all_programs() -> tuple[ProgramSpec, ...]:
    """Every capture program attached to a cgroup, in load order (the first one creates the
    pinned maps). The netns program (inbound.PROGRAM) is loaded after them, on its own: a
    kernel without sk_lookup must not cost the capture."""
    from meshnode.bpf import connect, dns, getsockopt, sockops

    return (connect.PROGRAM, sockops.PROGRAM, getsockopt.PROGRAM, dns.PROGRAM)


def all_entries() -> tuple[EntrySpec, ...]:
    return tuple(e for p in all_programs() for e in p.entries)


# Maps pinned by bpf/include/mn_maps.h (BPF_TABLE_PINNED), by pin file name.
MAP_PINS: tuple[str, ...] = ("mn_dest", "mn_svc", "mn_cookie", "mn_origdst", "mn_stats",
                             "mn_lb_table", "mn_lb_slot", "mn_ksock", "mn_kflow", "mn_klog",
                             "mn_klog_head")
# Maps pinned by bpf/mn_dns.c, which only it and the agent use.
DNS_MAP_PINS: tuple[str, ...] = ("mn_dns_cfg", "mn_dns_orig")
