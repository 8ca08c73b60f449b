/* mn_maps.h: the maps every meshnode capture program shares, and their key/value structs.
 *
 * Each program file is compiled as its own bcc module; they meet in these maps because every
 * map is pinned under MN_PIN_DIR (BPF_TABLE_PINNED: the first module to load creates and pins
 * a map, the others open the pin). Every struct that crosses into user space lives here, also
 * those of maps a single program owns: meshnode/bpf/maps.py and meshnode/proxy/origdst.py
 * read and write the same layouts in Python, and tests/integration/test_bpf_layout.py compares
 * them with what clang makes of these (change a struct here and there together).
 *
 * Every number comes in as a -D flag from meshnode/constants.py (MN_<NAME>) plus MN_PIN_DIR;
 * nothing here restates one.
 */
#ifndef MN_MAPS_H
#define MN_MAPS_H

#include <uapi/linux/bpf.h>

/* bcc's BPF C environment does not define the socket type constants. */
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* Verdicts of cgroup sock_addr and sockopt programs, by what they mean to the caller. */
#define MN_VERDICT_PROCEED 1 /* the syscall goes on (possibly with a rewritten address) */
#define MN_VERDICT_REFUSE 0  /* the syscall fails with EPERM at once */

/* An IPv4 endpoint exactly as the kernel hands it to us: both fields in network byte order,
 * padded to 8 bytes so key comparison never sees stack garbage. Used as the mn_dest key
 * (port 0: every port of a VIP), the mn_origdst key (the captured client's local address)
 * and the value of both original-destination maps. */
struct mn_addr4 {
    __u32 ip;
    __u16 port;
    __u16 pad;
};

/* What the proxy learns of a captured connection: where it was going, and who dialed it (the
 * connecting task's cgroup id, low 32 bits, and its process id) for per-source telemetry.
 * The getsockopt answer carries `cgroup` and `pid` in sockaddr_in's 8 padding bytes. */
struct mn_orig {
    struct mn_addr4 dst;
    __u32 cgroup;
    __u32 pid;
};

/* The agent's DNS switch, the one value of mn_dns_cfg (mn_dns.c): flags (MN_DNS_ENABLED) and
 * the port of its DNS server on 127.0.0.1, both host byte order. */
struct mn_dns_cfg {
    __u32 flags;
    __u32 port;
};

/* Plaintext connections from other hosts to one local port (mn_inbound.c's per-CPU
 * mn_inbound_stats value): let through (PERMISSIVE) and refused with a reset (STRICT). */
struct mn_inbound_count {
    __u64 accepted;
    __u64 refused;
};

/* struct sockaddr_in as mn_getsockopt.c answers SO_ORIGINAL_DST, spelled out (the uapi header
 * drags in more than bcc can parse). sin_zero's 8 bytes, which no caller reads, carry the
 * connection's source: the dialer's cgroup id (low 32 bits) and pid, host byte order. */
struct mn_sockaddr_in {
    __u16 family;
    __u16 port; /* network order */
    __u32 addr; /* network order */
    __u32 cgroup;
    __u32 pid;
};

/* The kernel path (mn_connect.c balances a service's connects itself, no proxy on the path).
 * A table per (service, VIP port): the key's port is the dialled port in network order, or 0
 * for a service whose every VIP port reaches every endpoint (Service `port`). */
struct mn_lb_key {
    __u32 service;
    __u16 port;
    __u16 pad;
};

/* A table: how many slots (1..MN_LB_MAX_SLOTS; the agent writes slots before the count that
 * covers them), how to pick one (MN_LB_PICK_*), and the rotation cursor the hook advances. */
struct mn_lb_table {
    __u32 slots;
    __u32 pick;
    __u64 cursor;
};

/* One slot of a table: mn_lb_slot's key; the value is the endpoint (struct mn_addr4). An
 * endpoint fills slots in proportion to its weight. */
struct mn_lb_slot_key {
    __u32 service;
    __u16 port; /* the table's: network order, or 0 */
    __u16 slot;
};

/* One (source, destination service, endpoint) row of kernel-path telemetry. */
struct mn_flow_key {
    __u32 cgroup; /* the connecting task's cgroup id, low 32 bits */
    __u32 service;
    struct mn_addr4 endpoint;
};

/* mn_kflow's value (per CPU: the agent sums them). Bytes, duration and RTT are added when a
 * connection closes, from the socket's own TCP counters (sock_ops state callback). */
struct mn_flow_stats {
    __u64 connects; /* balanced (or sent to an endpoint address) in the kernel */
    __u64 failed;   /* closed without ever being established */
    __u64 closed;   /* closed after being established */
    __u64 bytes_sent;     /* bytes_acked at close */
    __u64 bytes_received; /* bytes_received at close */
    __u64 duration_us;    /* sum over closed ones, connect to close */
    __u64 srtt_us;        /* sum of smoothed RTT at close over closed ones */
    __u64 pad;
};

/* An open kernel-path socket (mn_ksock, by socket cookie): what getpeername must show (`vip`,
 * the address the app dialled) and what its close adds to telemetry. */
struct mn_ksock {
    struct mn_flow_key key;
    struct mn_addr4 vip;
    __u64 start_ns;
    __u32 pid;
    __u32 established;
};

/* One closed kernel-path connection in the mn_klog ring, which the agent samples for its
 * access log. */
struct mn_klog {
    __u64 seq; /* 1, 2, 3...; 0: never written */
    __u64 start_ns;
    __u64 end_ns;
    struct mn_flow_key key;
    struct mn_addr4 vip;
    __u64 bytes_sent;
    __u64 bytes_received;
    __u32 srtt_us;
    __u32 pid;
    __u32 established;
    __u32 pad;
};

/* Destination -> service id: connects to these belong to the mesh. Sized for the largest mesh
 * (every VIP and endpoint) but allocated as entries arrive (BPF_F_NO_PREALLOC): preallocated,
 * every agent would pin the largest mesh's memory (4x what the buckets alone take) whatever
 * its size. Only the agent writes it, so the allocation on update is off the connect path;
 * lookups cost the same. */
BPF_TABLE_PINNED("hash", struct mn_addr4, __u32, mn_dest, MN_MAP_DEST_ENTRIES,
                 MN_PIN_DIR "/mn_dest", BPF_F_NO_PREALLOC);
/* Service id -> MN_SVC_READY | MN_SVC_FAIL_CLOSED. A missing entry means neither. Allocated
 * as entries arrive, like mn_dest. */
BPF_TABLE_PINNED("hash", __u32, __u32, mn_svc, MN_MAP_SVC_ENTRIES, MN_PIN_DIR "/mn_svc",
                 BPF_F_NO_PREALLOC);
/* Socket cookie -> original destination, from connect until the handshake completes.
 * LRU: a connect that never establishes must not leak an entry forever. */
BPF_TABLE_PINNED("lru_hash", __u64, struct mn_orig, mn_cookie, MN_MAP_COOKIE_ENTRIES,
                 MN_PIN_DIR "/mn_cookie");
/* Client local (ip, port) -> original destination: what the proxy's accepted socket sees as
 * its peer. LRU, since nothing deletes an entry when the connection closes. */
BPF_TABLE_PINNED("lru_hash", struct mn_addr4, struct mn_orig, mn_origdst,
                 MN_MAP_ORIGDST_ENTRIES, MN_PIN_DIR "/mn_origdst");
/* Counters by MN_STAT_* slot; per-CPU so the hot path never contends on a cache line. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mn_stats, MN_STAT_SLOTS, MN_PIN_DIR "/mn_stats");
/* The kernel path's tables and slots (see struct mn_lb_key): only the agent writes them. */
BPF_TABLE_PINNED("hash", struct mn_lb_key, struct mn_lb_table, mn_lb_table,
                 MN_MAP_LB_TABLE_ENTRIES, MN_PIN_DIR "/mn_lb_table", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct mn_lb_slot_key, struct mn_addr4, mn_lb_slot,
                 MN_MAP_LB_SLOT_ENTRIES, MN_PIN_DIR "/mn_lb_slot", BPF_F_NO_PREALLOC);
/* Socket cookie -> open kernel-path socket. LRU: a socket whose close is never seen (it was
 * made before the sock_ops program attached) must not hold its entry forever. */
BPF_TABLE_PINNED("lru_hash", __u64, struct mn_ksock, mn_ksock, MN_MAP_KSOCK_ENTRIES,
                 MN_PIN_DIR "/mn_ksock");
/* Kernel-path telemetry rows. LRU and per CPU: bounded, and no atomics on the connect path. */
BPF_TABLE_PINNED("lru_percpu_hash", struct mn_flow_key, struct mn_flow_stats, mn_kflow,
                 MN_MAP_KFLOW_ENTRIES, MN_PIN_DIR "/mn_kflow");
/* The last MN_KLOG_SLOTS closed kernel-path connections, and the last sequence number written
 * (slot (seq - 1) % MN_KLOG_SLOTS). Overwritten under load: the agent's log is a sample. */
BPF_TABLE_PINNED("array", __u32, struct mn_klog, mn_klog, MN_KLOG_SLOTS, MN_PIN_DIR "/mn_klog");
BPF_TABLE_PINNED("array", __u32, __u64, mn_klog_head, 1, MN_PIN_DIR "/mn_klog_head");

/* No helpers that touch maps live here: bcc rewrites `map.lookup()` calls only in the main
 * file it compiles, so such a call in a header compiles to an indirect call the verifier
 * rejects ("unknown opcode 8d"). Each .c file defines the few it needs. */

#endif /* MN_MAPS_H */
