"""The getsockopt hook (bpf/mn_getsockopt.c): answer SO_ORIGINAL_DST on the proxy's accepted
sockets from the eBPF maps, so the proxy asks the same way under eBPF and iptables. Attached to
the PROXY cgroup (it only fires for sockets created there). Data only."""

from __future__ import annotations

from meshnode.bpf.program import AttachType, EntrySpec, ProgramSpec, ProgType

PROGRAM = ProgramSpec(
    source="mn_getsockopt.c",
    entries=(
        # Detached last: connections captured before removal can still learn where they go.
        EntrySpec("mn_getsockopt", ProgType.CGROUP_SOCKOPT, AttachType.CGROUP_GETSOCKOPT,
                  "proxy", detach_order=2),
    ),
)
