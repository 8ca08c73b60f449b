"""The DNS redirect hooks (bpf/mn_dns.c): while the agent's DNS server is up, an enrolled
process's queries to any resolver (UDP sendto/connect and TCP connect to port 53) go to the
agent, and its replies and getpeername() show the resolver the process asked. Attached to the
apps cgroup. Data only: loading is compile.py's job, attaching the agent's (capture/ebpf.py),
switching it on and off maps.py's (`CaptureMaps.set_dns`)."""

from __future__ import annotations

from meshnode.bpf.program import AttachType, EntrySpec, ProgramSpec, ProgType

PROGRAM = ProgramSpec(
    source="mn_dns.c",
    entries=(
        # The redirecting hooks go first on removal, like mn_connect4: queries stop reaching
        # the agent before anything that serves queries already redirected.
        EntrySpec("mn_dns_sendmsg4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_UDP4_SENDMSG,
                  "apps", detach_order=0),
        # A second connect4 program beside mn_connect4 rather than a UDP branch in it: the TCP
        # capture path stays as it is, and prog_attach uses BPF_F_ALLOW_MULTI anyway. It is
        # attached after mn_connect4 (load order), so mesh capture sees each connect first.
        EntrySpec("mn_dns_connect4", ProgType.CGROUP_SOCK_ADDR,
                  AttachType.CGROUP_INET4_CONNECT, "apps", detach_order=0),
        # The reverse direction goes last: replies to queries redirected before removal still
        # come from the resolver the app asked.
        EntrySpec("mn_dns_recvmsg4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_UDP4_RECVMSG,
                  "apps", detach_order=2),
        EntrySpec("mn_dns_peer4", ProgType.CGROUP_SOCK_ADDR,
                  AttachType.CGROUP_INET4_GETPEERNAME, "apps", detach_order=2),
    ),
)
