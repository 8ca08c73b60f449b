/* mn_connect.c: cgroup/connect4 and cgroup/connect6 on the apps cgroup.
 *
 * A TCP connect from an enrolled process to a mesh destination (mn_dest) is, by the flags of
 * the service it belongs to (mn_svc):
 *   ready                 -> rewritten to 127.0.0.1:MN_OUTBOUND_PORT, the original destination
 *                            saved under the socket cookie (mn_sockops moves it on);
 *   fail-closed, not ready -> refused (connect fails with EPERM at once);
 *   otherwise             -> untouched: fail open, straight to the original destination.
 * Everything else, and every internal failure, proceeds untouched. The saved entry also names
 * the caller (cgroup id, process id): the proxy attributes the connection to a source service.
 */
#include "mn_maps.h"

/* Bump one MN_STAT_* counter (per-CPU slot: no atomic needed). */
static __always_inline void mn_count(__u32 slot)
{
    __u64 *n = mn_stats.lookup(&slot);
    if (n)
        *n += 1;
}

#define MN_LOOPBACK_IP4 0x7f000001 /* 127.0.0.1, host byte order */

/* What to do with one connect, decided from the destination alone. */
enum mn_action {
    MN_ACT_PASS = 0,     /* not ours, or the service's proxy is not ready (fail open) */
    MN_ACT_REDIRECT = 1, /* send it to the proxy */
    MN_ACT_REFUSE = 2,   /* fail-closed service without a ready proxy */
};

/* The sockets we never touch: not TCP, or the proxy's own upstream connects (SO_MARK). The
 * proxy lives outside the apps cgroup already; the mark check keeps a misplaced worker from
 * capturing itself in a loop that ends only when descriptors run out. */
static __always_inline int mn_skip_socket(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (sk && sk->mark == MN_PROXY_MARK)
        return 1;
    return 0;
}

/* Classify a destination (both fields network byte order): exact endpoint first, then the
 * whole VIP (port 0). */
static __always_inline enum mn_action mn_classify(__u32 ip, __u16 port)
{
    struct mn_addr4 key = {.ip = ip, .port = port, .pad = 0};
    __u32 *svc = mn_dest.lookup(&key);
    if (!svc) {
        key.port = 0;
        svc = mn_dest.lookup(&key);
        if (!svc)
            return MN_ACT_PASS;
    }
    __u32 id = *svc;
    __u32 *flags = mn_svc.lookup(&id);
    __u32 f = flags ? *flags : 0;
    if (f & MN_SVC_READY)
        return MN_ACT_REDIRECT;
    if (f & MN_SVC_FAIL_CLOSED) {
        mn_count(MN_STAT_REFUSED);
        return MN_ACT_REFUSE;
    }
    mn_count(MN_STAT_PASSTHROUGH);
    return MN_ACT_PASS;
}

/* Remember where the socket meant to go. Returns 0, or a negative errno if the entry could not
 * be stored: then the caller must not redirect, since the proxy could never learn the
 * destination (fail open rather than send a connection nowhere). */
static __always_inline int mn_save_origdst(struct bpf_sock_addr *ctx, __u32 ip, __u16 port)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct mn_orig orig = {.dst = {.ip = ip, .port = port, .pad = 0},
                           .cgroup = (__u32)bpf_get_current_cgroup_id(),
                           .pid = (__u32)(bpf_get_current_pid_tgid() >> 32)};
    return mn_cookie.update(&cookie, &orig);
}

int mn_connect4(struct bpf_sock_addr *ctx)
{
    if (mn_skip_socket(ctx))
        return MN_VERDICT_PROCEED;
    __u32 ip = ctx->user_ip4;
    __u16 port = (__u16)ctx->user_port; /* network order in the low 16 bits */
    enum mn_action act = mn_classify(ip, port);
    if (act == MN_ACT_REFUSE)
        return MN_VERDICT_REFUSE;
    if (act != MN_ACT_REDIRECT || mn_save_origdst(ctx, ip, port) < 0)
        return MN_VERDICT_PROCEED;
    ctx->user_ip4 = bpf_htonl(MN_LOOPBACK_IP4);
    ctx->user_port = bpf_htons(MN_OUTBOUND_PORT);
    mn_count(MN_STAT_CAPTURED);
    return MN_VERDICT_PROCEED;
}

/* An AF_INET6 socket connecting to ::ffff:a.b.c.d goes through IPv4 underneath but never
 * through connect4, so mesh destinations reached that way are handled here. Native IPv6
 * destinations are not mesh destinations (VIPs and endpoints are IPv4). */
int mn_connect6(struct bpf_sock_addr *ctx)
{
    if (mn_skip_socket(ctx))
        return MN_VERDICT_PROCEED;
    /* user_ip6 must be read and written in 4-byte words (verifier rule for this context). */
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return MN_VERDICT_PROCEED;
    __u32 ip = ctx->user_ip6[3];
    __u16 port = (__u16)ctx->user_port;
    enum mn_action act = mn_classify(ip, port);
    if (act == MN_ACT_REFUSE)
        return MN_VERDICT_REFUSE;
    if (act != MN_ACT_REDIRECT || mn_save_origdst(ctx, ip, port) < 0)
        return MN_VERDICT_PROCEED;
    ctx->user_ip6[3] = bpf_htonl(MN_LOOPBACK_IP4); /* stays v4-mapped: ::ffff:127.0.0.1 */
    ctx->user_port = bpf_htons(MN_OUTBOUND_PORT);
    mn_count(MN_STAT_CAPTURED);
    return MN_VERDICT_PROCEED;
}
