"""The sock_ops hook (bpf/mn_sockops.c): when a captured connect is established, file its
original destination under the client's local address for the proxy. Attached to the apps
cgroup. Data only."""

from __future__ import annotations

from meshnode.bpf.program import AttachType, EntrySpec, ProgramSpec, ProgType

PROGRAM = ProgramSpec(
    source="mn_sockops.c",
    entries=(
        EntrySpec("mn_sockops", ProgType.SOCK_OPS, AttachType.CGROUP_SOCK_OPS, "apps",
                  detach_order=1),
    ),
)
