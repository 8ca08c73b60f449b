/* mn_getsockopt.c: cgroup/getsockopt on the proxy cgroup.
 *
 * Answers getsockopt(SOL_IP, SO_ORIGINAL_DST) on an accepted, captured socket with a
 * struct sockaddr_in of the original destination, found in mn_origdst by the socket's peer
 * (the client's local address). The proxy thus uses the very call it uses under iptables,
 * where conntrack answers it (with zero padding). Every other getsockopt keeps the kernel's own
 * answer. The padding (sin_zero) carries the client's cgroup id and process id (mn_orig).
 *
 * The hook runs for sockets whose cgroup is the proxy cgroup: a socket takes the cgroup of the
 * process that created it, and an accepted socket that of its listener, so the proxy must
 * create its listening socket after joining the proxy cgroup.
 */
#include "mn_maps.h"

/* Bump one MN_STAT_* counter (per-CPU slot: no atomic needed). */
static __always_inline void mn_count(__u32 slot)
{
    __u64 *n = mn_stats.lookup(&slot);
    if (n)
        *n += 1;
}

#define MN_SOL_IP 0 /* kernel ABI: SOL_IP == IPPROTO_IP */

/* Fill the caller's buffer; returns 0 or -1 when the buffer is too small (then the kernel's
 * own answer stands). */
static __always_inline int mn_answer(struct bpf_sockopt *ctx, struct mn_orig *orig)
{
    struct mn_sockaddr_in *sin = ctx->optval;
    if ((void *)(sin + 1) > ctx->optval_end)
        return -1;
    sin->family = AF_INET;
    sin->port = orig->dst.port;
    sin->addr = orig->dst.ip;
    sin->cgroup = orig->cgroup;
    sin->pid = orig->pid;
    ctx->optlen = sizeof(*sin);
    /* clang may fuse the optlen and retval stores into one 8-byte store, which the verifier
     * rejects ("invalid bpf_context access off=32 size=8"); the barrier keeps them apart. */
    asm volatile("" ::: "memory");
    ctx->retval = 0; /* the kernel's own lookup (conntrack) failed; ours is the answer */
    return 0;
}

int mn_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != MN_SOL_IP || ctx->optname != MN_SO_ORIGINAL_DST)
        return MN_VERDICT_PROCEED;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->type != SOCK_STREAM)
        return MN_VERDICT_PROCEED;
    struct mn_addr4 peer = {.ip = sk->dst_ip4, .port = (__u16)sk->dst_port, .pad = 0};
    struct mn_orig *orig = mn_origdst.lookup(&peer);
    if (!orig) {
        mn_count(MN_STAT_ORIGDST_MISS);
        return MN_VERDICT_PROCEED;
    }
    if (mn_answer(ctx, orig) == 0)
        mn_count(MN_STAT_ORIGDST_HIT);
    return MN_VERDICT_PROCEED;
}
