"""The connect hooks (bpf/mn_connect.c): redirect, refuse, balance in the kernel or pass an
enrolled process's TCP connect by its destination; getpeername shows a kernel-path socket's
VIP. Attached to the apps cgroup, whose subtree holds every enrolled
process. Data only: loading is compile.py's job, attaching the agent's (capture/ebpf.py)."""

from __future__ import annotations

from meshnode.bpf.program import AttachType, EntrySpec, ProgramSpec, ProgType

PROGRAM = ProgramSpec(
    source="mn_connect.c",
    entries=(
        EntrySpec("mn_connect4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_CONNECT,
                  "apps", detach_order=0),
        # AF_INET6 sockets connecting to ::ffff:a.b.c.d never pass connect4.
        EntrySpec("mn_connect6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET6_CONNECT,
                  "apps", detach_order=0),
        # The reverse hooks go last: kernel-path sockets opened before removal keep their VIP.
        EntrySpec("mn_peer4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_GETPEERNAME,
                  "apps", detach_order=2),
        EntrySpec("mn_peer6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET6_GETPEERNAME,
                  "apps", detach_order=2),
    ),
)
