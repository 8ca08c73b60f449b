"""The one source of ports, marks, map sizes and flags.

C programs get these as -D flags (`bpf_defines`), iptables templates as template fields;
nothing else may restate a number that lives here.
"""

from __future__ import annotations

from typing import Final

OUTBOUND_PORT: Final = 15001  # captured connections land here (127.0.0.1)
INBOUND_PORT: Final = 15006
TUNNEL_PORT: Final = 15008
DNS_PORT: Final = 15053  # the agent's DNS server (127.0.0.1) for <service>.<suffix>
DNS_SERVICE_PORT: Final = 53  # enrolled processes' queries to any resolver on it are redirected
DNS_TTL: Final = 5  # seconds: short, so a service's new VIP is seen soon
DNS_FORWARD_TIMEOUT: Final = 1.5  # seconds per upstream attempt (glibc waits 5 s per try)
ADMIN_PORT: Final = 15090
PROXY_ADDR: Final = "127.0.0.1"

# SO_MARK on every socket the proxy opens upstream: capture skips it, so the proxy can never
# capture itself (a loop that ends only when descriptors run out).
PROXY_MARK: Final = 0x4D4E0001

VIP_CIDR: Final = "127.240.0.0/16"  # loopback: a failed capture is refused locally

SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h, level SOL_IP

# How large a mesh the kernel side holds (issue 12: at least 65 536 services and 262 144
# endpoints). mn_dest and mn_svc are hash maps allocated as entries arrive
# (BPF_F_NO_PREALLOC, bpf/include/mn_maps.h), so unused headroom costs only their buckets.
MESH_MAX_SERVICES: Final = 65536
MESH_MAX_ENDPOINTS: Final = 262144

# BPF map sizes.
MAP_DEST_ENTRIES: Final = MESH_MAX_SERVICES + MESH_MAX_ENDPOINTS  # destinations: VIPs, endpoints
MAP_SVC_ENTRIES: Final = MESH_MAX_SERVICES  # services: ready / fail-closed flags
MAP_COOKIE_ENTRIES: Final = 65536  # captured sockets between connect and established (LRU)
MAP_ORIGDST_ENTRIES: Final = 65536  # established captured sockets awaiting the proxy (LRU)
MAP_DNS_ENTRIES: Final = 16384  # sockets whose DNS queries were redirected: their resolver (LRU)
MAP_INBOUND_ENTRIES: Final = 65536  # local ports with an mTLS mode (one per TCP port at most)
# The kernel path (issue 17): per (service, port) a table of endpoint slots the connect hook
# picks from. Tables and slots are allocated as entries arrive, like mn_dest.
MAP_LB_TABLE_ENTRIES: Final = MESH_MAX_SERVICES * 4  # (service, VIP port) tables
MAP_LB_SLOT_ENTRIES: Final = 1 << 20  # endpoint slots of every table
LB_MAX_SLOTS: Final = 512  # slots of one table: weights are scaled down to fit
LB_RING_SLOTS: Final = 256  # slots of a ring-hash table (consistent: see balance/slots.py)
MAP_KSOCK_ENTRIES: Final = 65536  # open kernel-path sockets: their VIP, endpoint, start (LRU)
MAP_KFLOW_ENTRIES: Final = 65536  # (source, service, endpoint) counter rows (LRU, per CPU)
KLOG_SLOTS: Final = 1024  # the ring of closed kernel-path connections the agent samples

# Per-service flags in the mn_svc map.
SVC_READY: Final = 1
SVC_FAIL_CLOSED: Final = 2
SVC_KERNEL: Final = 4  # balanced in the kernel (datapath kernel/auto, allowed)
SVC_FALLBACK: Final = 8  # balanced in the kernel while the proxy is not ready

# mn_lb_table flags: how the connect hook picks a slot.
LB_PICK_ROTATE: Final = 0  # the next slot (an atomic cursor): weights exact over a round
LB_PICK_RANDOM: Final = 1  # a random slot
LB_PICK_HASH: Final = 2  # the slot the client process's id hashes to (ring-hash)

# Slots of the per-CPU counter array mn_stats.
STAT_CAPTURED: Final = 0  # connects redirected to the proxy
STAT_PASSTHROUGH: Final = 1  # mesh destination, proxy not ready: left alone (fail open)
STAT_REFUSED: Final = 2  # mesh destination, not ready, fail-closed: refused
STAT_ORIGDST_HIT: Final = 3  # SO_ORIGINAL_DST answered from the map
STAT_ORIGDST_MISS: Final = 4
STAT_DNS_REDIRECTED: Final = 5  # DNS queries (sendmsg or connect) sent to the agent instead
STAT_KERNEL: Final = 6  # connects balanced in the kernel (kernel path)
STAT_KERNEL_NOEP: Final = 7  # kernel-path connects that found no endpoint (left to the VIP)
STAT_SLOTS: Final = 8

# Inbound enforcement (bpf/mn_inbound.c, the mn_inbound map's values): what a plaintext TCP
# connection from another host to a local endpoint port gets. A port not listed: DISABLE.
INBOUND_PERMISSIVE: Final = 1  # accepted, counted
INBOUND_STRICT: Final = 2  # refused at once with a reset

# The one slot of the mn_dns_cfg array, and its flag: redirect DNS while the agent's server is
# up. The port travels in the same map value, so it needs no recompiling.
DNS_CFG_SLOT: Final = 0
DNS_ENABLED: Final = 1

# Defaults for paths; an instance name derives its own set so agents can run side by side.
DEFAULT_INSTANCE: Final = "default"
RUN_DIR: Final = "/run/meshnode"
STATE_DIR: Final = "/var/lib/meshnode"
LOG_DIR: Final = "/var/log/meshnode"
BPF_FS: Final = "/sys/fs/bpf"
PIN_ROOT: Final = "/sys/fs/bpf/meshnode"

# Timeouts (seconds) with their defaults in config.
CONNECT_TIMEOUT: Final = 2.0
IDLE_TIMEOUT: Final = 300.0
DRAIN_GRACE: Final = 5.0
HANDSHAKE_TIMEOUT: Final = 5.0  # a TLS peer (or the tunnel preamble) that stalls is cut
WORKER_RESTART_BACKOFF: Final = 0.2


def bpf_defines() -> dict[str, int]:
    """Every constant the C programs use, by its C name (MN_ + the Python name)."""
    names = (
        "OUTBOUND_PORT", "PROXY_MARK", "SO_ORIGINAL_DST",
        "MAP_DEST_ENTRIES", "MAP_SVC_ENTRIES", "MAP_COOKIE_ENTRIES", "MAP_ORIGDST_ENTRIES",
        "SVC_READY", "SVC_FAIL_CLOSED",
        "STAT_CAPTURED", "STAT_PASSTHROUGH", "STAT_REFUSED", "STAT_ORIGDST_HIT",
        "STAT_ORIGDST_MISS", "STAT_SLOTS",
        "DNS_SERVICE_PORT", "MAP_DNS_ENTRIES", "STAT_DNS_REDIRECTED", "DNS_CFG_SLOT",
        "DNS_ENABLED", "MAP_INBOUND_ENTRIES", "INBOUND_PERMISSIVE", "INBOUND_STRICT",
        "SVC_KERNEL", "SVC_FALLBACK", "MAP_LB_TABLE_ENTRIES", "MAP_LB_SLOT_ENTRIES",
        "LB_MAX_SLOTS", "LB_PICK_RANDOM", "LB_PICK_HASH", "MAP_KSOCK_ENTRIES",
        "MAP_KFLOW_ENTRIES", "KLOG_SLOTS", "STAT_KERNEL", "STAT_KERNEL_NOEP",
    )
    g = globals()
    return {f"MN_{n}": int(g[n]) for n in names}
