/* mn_inbound.c: sk_lookup on the agent's network namespace (inbound mTLS enforcement).
 *
 * Runs when a TCP segment looks for a listening socket (a SYN, in practice) in this netns.
 * For a local port listed in mn_inbound_mode (the endpoint ports of this host's services whose
 * effective mTLS mode is STRICT or PERMISSIVE), a connection from another host is:
 *   STRICT     -> refused: SK_DROP makes the listener lookup fail, and TCP answers the SYN
 *                 with a RST (the client gets ECONNREFUSED at once, never a timeout);
 *   PERMISSIVE -> passed, and counted as accepted plaintext.
 * Local sources always pass: what arrived on the loopback device (every same-host
 * connection, whatever its addresses), a 127/8 source, or source == destination (the
 * agent's inbound mTLS proxy connecting to a local endpoint from the host's address).
 * Everything else, and every port not listed (DISABLE), passes untouched: SK_PASS without a
 * selected socket lets the kernel's own lookup go on.
 */
#include "mn_maps.h"

#define MN_IPPROTO_TCP 6
#define MN_LOOPBACK_IFINDEX 1 /* "lo" has index 1 in every network namespace */

/* Local port (host byte order) -> MN_INBOUND_STRICT | MN_INBOUND_PERMISSIVE. Only the agent
 * writes it; a missing port is DISABLE. */
BPF_TABLE_PINNED("hash", __u32, __u32, mn_inbound_mode, MN_MAP_INBOUND_ENTRIES,
                 MN_PIN_DIR "/mn_inbound_mode", BPF_F_NO_PREALLOC);
/* Local port -> plaintext connections from other hosts, by verdict. Per-CPU: no contention on
 * the SYN path; the agent sums the CPUs and drops a port's entry with its rule. */
BPF_TABLE_PINNED("percpu_hash", __u32, struct mn_inbound_count, mn_inbound_stats,
                 MN_MAP_INBOUND_ENTRIES, MN_PIN_DIR "/mn_inbound_stats", BPF_F_NO_PREALLOC);

static __always_inline int mn_local_source(struct bpf_sk_lookup *ctx)
{
    if (ctx->ingress_ifindex == MN_LOOPBACK_IFINDEX)
        return 1;
    __u32 src = ctx->remote_ip4;
    if (src == ctx->local_ip4)
        return 1;
    return (bpf_ntohl(src) >> 24) == 127;
}

static __always_inline void mn_count_inbound(__u32 port, int refused)
{
    struct mn_inbound_count zero = {};
    struct mn_inbound_count *c = mn_inbound_stats.lookup_or_try_init(&port, &zero);
    if (!c)
        return;
    if (refused)
        c->refused += 1;
    else
        c->accepted += 1;
}

int mn_inbound(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != MN_IPPROTO_TCP || ctx->family != AF_INET)
        return SK_PASS;
    __u32 port = ctx->local_port;
    __u32 *mode = mn_inbound_mode.lookup(&port);
    if (!mode || mn_local_source(ctx))
        return SK_PASS;
    if (*mode == MN_INBOUND_STRICT) {
        mn_count_inbound(port, 1);
        return SK_DROP;
    }
    if (*mode == MN_INBOUND_PERMISSIVE)
        mn_count_inbound(port, 0);
    return SK_PASS;
}
