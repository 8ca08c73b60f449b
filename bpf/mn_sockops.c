/* mn_sockops.c: sock_ops on the apps cgroup.
 *
 * When a captured connect completes (ACTIVE_ESTABLISHED), the original destination saved by
 * mn_connect under the socket cookie moves to mn_origdst, keyed by the client's local
 * (ip, port): the one thing the proxy can see of this socket (its accepted socket's peer).
 * The callback runs before the proxy's accept() can return the connection, so the proxy never
 * races it. Sockets that were not captured have no cookie entry and cost one lookup.
 *
 * Kernel-path sockets (mn_ksock, saved by mn_connect) ask for the TCP state callback when they
 * connect; when one closes, its bytes (bytes_acked, bytes_received), lifetime and smoothed RTT
 * join its (source, service, endpoint) row in mn_kflow, it goes into the mn_klog ring for the
 * agent's access log, and its mn_ksock entry is dropped. A connect that never established
 * counts as failed.
 */
#include "mn_maps.h"

/* The client's local address as the proxy will see it as its peer, in network byte order.
 * local_ip4 is right for AF_INET6 sockets connected to a v4-mapped address too: the IPv4 path
 * they take sets the IPv4 source (skc_rcv_saddr) that this field reads. */
static __always_inline struct mn_addr4 mn_local_addr(struct bpf_sock_ops *skops)
{
    struct mn_addr4 a = {.ip = skops->local_ip4, .port = 0, .pad = 0};
    /* local_port is in host byte order, unlike remote_port. */
    a.port = bpf_htons((__u16)skops->local_port);
    return a;
}

static __always_inline void mn_publish_origdst(struct bpf_sock_ops *skops)
{
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct mn_orig *orig = mn_cookie.lookup(&cookie);
    if (!orig)
        return; /* not a captured socket */
    struct mn_orig value = *orig;
    struct mn_addr4 key = mn_local_addr(skops);
    mn_origdst.update(&key, &value);
    mn_cookie.delete(&cookie);
}

#define MN_TCP_CLOSE 7 /* enum tcp_state's TCP_CLOSE (BPF_TCP_CLOSE) */
#define MN_TCP_FIN_WAIT2 5
#define MN_TCP_CLOSE_WAIT 8
#define MN_TCP_LAST_ACK 9
#define MN_TCP_CLOSING 11

/* A kernel-path socket's entry, or 0. */
static __always_inline struct mn_ksock *mn_ksock_of(struct bpf_sock_ops *skops)
{
    __u64 cookie = bpf_get_socket_cookie(skops);
    return mn_ksock.lookup(&cookie);
}

/* Append one closed connection to the mn_klog ring. */
static __always_inline void mn_klog_append(struct mn_ksock *ks, struct mn_flow_stats *add,
                                           __u64 now, __u32 srtt)
{
    __u32 zero = 0;
    __u64 *head = mn_klog_head.lookup(&zero);
    if (!head)
        return;
    __u64 seq = __sync_fetch_and_add(head, 1) + 1;
    __u32 slot = (__u32)((seq - 1) % MN_KLOG_SLOTS);
    struct mn_klog *e = mn_klog.lookup(&slot);
    if (!e)
        return;
    e->seq = seq;
    e->start_ns = ks->start_ns;
    e->end_ns = now;
    e->key = ks->key;
    e->vip = ks->vip;
    e->bytes_sent = add->bytes_sent;
    e->bytes_received = add->bytes_received;
    e->srtt_us = srtt;
    e->pid = ks->pid;
    e->established = ks->established;
}

static __always_inline void mn_kernel_closed(struct bpf_sock_ops *skops)
{
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct mn_ksock *ks = mn_ksock.lookup(&cookie);
    if (!ks)
        return;
    __u64 now = bpf_ktime_get_ns();
    struct mn_flow_stats add = {};
    __u32 srtt = 0;
    if (ks->established) {
        add.closed = 1;
        /* The app's bytes, as the proxy counts them: bytes_acked also counts our SYN and,
         * once acked, our FIN; bytes_received the peer's FIN. The state the socket closes
         * from says which FINs went by (args[0]): FIN_WAIT2, CLOSING, LAST_ACK both; CLOSE_WAIT
         * the peer's only; ESTABLISHED or FIN_WAIT1 (a reset) neither. */
        __u32 from = skops->args[0];
        __u64 fin_out = from == MN_TCP_FIN_WAIT2 || from == MN_TCP_CLOSING ||
                        from == MN_TCP_LAST_ACK;
        __u64 fin_in = fin_out || from == MN_TCP_CLOSE_WAIT;
        __u64 acked = skops->bytes_acked, received = skops->bytes_received;
        add.bytes_sent = acked > 1 + fin_out ? acked - 1 - fin_out : 0;
        add.bytes_received = received > fin_in ? received - fin_in : 0;
        add.duration_us = (now - ks->start_ns) / 1000;
        srtt = skops->srtt_us >> 3; /* the kernel keeps it scaled by 8 */
        add.srtt_us = srtt;
    } else {
        add.failed = 1;
    }
    struct mn_flow_stats zero = {};
    struct mn_flow_stats *row = mn_kflow.lookup_or_try_init(&ks->key, &zero);
    if (row) { /* per-CPU value: plain adds */
        row->failed += add.failed;
        row->closed += add.closed;
        row->bytes_sent += add.bytes_sent;
        row->bytes_received += add.bytes_received;
        row->duration_us += add.duration_us;
        row->srtt_us += add.srtt_us;
    }
    mn_klog_append(ks, &add, now, srtt);
    mn_ksock.delete(&cookie);
}

int mn_sockops(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB: { /* SYN about to go: see its close, failed or not */
        if (mn_ksock_of(skops))
            bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
                                                 BPF_SOCK_OPS_STATE_CB_FLAG);
        break;
    }
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
        struct mn_ksock *ks = mn_ksock_of(skops);
        if (ks)
            ks->established = 1;
        else
            mn_publish_origdst(skops);
        break;
    }
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[1] == MN_TCP_CLOSE)
            mn_kernel_closed(skops);
        break;
    }
    return 1; /* sock_ops return value is ignored for these callbacks; 1 is "ok" */
}
