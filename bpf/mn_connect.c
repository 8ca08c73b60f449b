/* mn_connect.c: cgroup/connect4 and cgroup/connect6 on the apps cgroup, and the
 * getpeername4/6 hooks of the kernel path.
 *
 * A TCP connect from an enrolled process to a mesh destination (mn_dest) is, by the flags of
 * the service it belongs to (mn_svc):
 *   kernel, or fallback and not ready
 *                         -> the kernel path: an endpoint is picked from the service's table
 *                            for the dialled port (mn_lb_table/mn_lb_slot) and the connect
 *                            rewritten to it; the app talks to the endpoint directly. The
 *                            socket is remembered (mn_ksock) so getpeername shows what the
 *                            app dialled and its close adds bytes/RTT to mn_kflow;
 *   ready                 -> rewritten to 127.0.0.1:MN_OUTBOUND_PORT, the original destination
 *                            saved under the socket cookie (mn_sockops moves it on);
 *   fail-closed, not ready -> refused (connect fails with EPERM at once);
 *   otherwise             -> untouched: fail open, straight to the original destination.
 * A kernel-path connect to an endpoint's own address goes there (counted); one to a VIP port
 * with no table (no healthy endpoint on it) is left to the VIP, where nothing listens: the app
 * sees ECONNREFUSED, as from the proxy. Everything else, and every internal failure, proceeds
 * untouched. The saved entry also names the caller (cgroup id, process id): the proxy (or the
 * kernel-path telemetry) attributes the connection to a source service.
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
    MN_ACT_KERNEL = 3,   /* balance it here (kernel path) */
};

/* What mn_dest said of a destination. */
struct mn_match {
    __u32 service;
    __u32 exact; /* 1: the destination is an endpoint's own address; 0: a VIP */
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
static __always_inline enum mn_action mn_classify(__u32 ip, __u16 port, struct mn_match *m)
{
    struct mn_addr4 key = {.ip = ip, .port = port, .pad = 0};
    m->exact = 1;
    __u32 *svc = mn_dest.lookup(&key);
    if (!svc) {
        key.port = 0;
        svc = mn_dest.lookup(&key);
        if (!svc)
            return MN_ACT_PASS;
        m->exact = 0;
    }
    __u32 id = *svc;
    m->service = id;
    __u32 *flags = mn_svc.lookup(&id);
    __u32 f = flags ? *flags : 0;
    if ((f & MN_SVC_KERNEL) || (!(f & MN_SVC_READY) && (f & MN_SVC_FALLBACK)))
        return MN_ACT_KERNEL;
    if (f & MN_SVC_READY)
        return MN_ACT_REDIRECT;
    if (f & MN_SVC_FAIL_CLOSED) {
        mn_count(MN_STAT_REFUSED);
        return MN_ACT_REFUSE;
    }
    mn_count(MN_STAT_PASSTHROUGH);
    return MN_ACT_PASS;
}

/* The slot a kernel-path connect takes in a table of `n` slots (1..MN_LB_MAX_SLOTS). */
static __always_inline __u32 mn_pick_slot(struct mn_lb_table *t, __u32 n)
{
    if (t->pick == MN_LB_PICK_RANDOM)
        return bpf_get_prandom_u32() % n;
    if (t->pick == MN_LB_PICK_HASH) {
        /* the calling process: one client keeps its endpoint while the table holds it */
        __u32 h = (__u32)(bpf_get_current_pid_tgid() >> 32) * 2654435761u;
        return (h ^ (h >> 16)) % n;
    }
    /* rotation: every CPU advances one shared cursor, so weights hold exactly per round */
    return (__u32)(__sync_fetch_and_add(&t->cursor, 1) % n);
}

/* Pick the endpoint for a kernel-path connect to (ip, port) of service m->service. Returns 0
 * with `ep` set, or -1: no endpoint (no table for the port, or an empty one). */
static __always_inline int mn_pick_endpoint(__u32 ip, __u16 port, struct mn_match *m,
                                            struct mn_addr4 *ep)
{
    if (m->exact) { /* an endpoint's own address: nothing to choose */
        ep->ip = ip;
        ep->port = port;
        ep->pad = 0;
        return 0;
    }
    struct mn_lb_key lk = {.service = m->service, .port = port, .pad = 0};
    struct mn_lb_table *t = mn_lb_table.lookup(&lk);
    if (!t) {
        lk.port = 0;
        t = mn_lb_table.lookup(&lk);
        if (!t)
            return -1;
    }
    __u32 n = t->slots;
    if (n == 0 || n > MN_LB_MAX_SLOTS)
        return -1;
    struct mn_lb_slot_key sk = {.service = m->service, .port = lk.port,
                                .slot = (__u16)mn_pick_slot(t, n)};
    struct mn_addr4 *e = mn_lb_slot.lookup(&sk);
    if (!e)
        return -1;
    *ep = *e;
    return 0;
}

/* Remember a kernel-path socket (getpeername, telemetry at close) and count its connect. A
 * socket that cannot be remembered is still balanced: only its telemetry is lost. */
static __always_inline void mn_kernel_track(struct bpf_sock_addr *ctx, __u32 ip, __u16 port,
                                            struct mn_match *m, struct mn_addr4 *ep)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct mn_ksock ks = {};
    ks.key.cgroup = (__u32)bpf_get_current_cgroup_id();
    ks.key.service = m->service;
    ks.key.endpoint = *ep;
    ks.vip.ip = ip;
    ks.vip.port = port;
    ks.start_ns = bpf_ktime_get_ns();
    ks.pid = (__u32)(bpf_get_current_pid_tgid() >> 32);
    mn_ksock.update(&cookie, &ks);
    struct mn_flow_stats zero = {};
    struct mn_flow_stats *row = mn_kflow.lookup_or_try_init(&ks.key, &zero);
    if (row)
        row->connects += 1; /* per-CPU value: no atomic needed */
    mn_count(MN_STAT_KERNEL);
}

/* The kernel path for a connect: the endpoint to write into the context, or -1 (no endpoint:
 * the connect proceeds to what the app dialled). */
static __always_inline int mn_kernel_connect(struct bpf_sock_addr *ctx, __u32 ip, __u16 port,
                                             struct mn_match *m, struct mn_addr4 *ep)
{
    if (mn_pick_endpoint(ip, port, m, ep) < 0) {
        mn_count(MN_STAT_KERNEL_NOEP);
        return -1;
    }
    mn_kernel_track(ctx, ip, port, m, ep);
    return 0;
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
    struct mn_match m = {};
    enum mn_action act = mn_classify(ip, port, &m);
    if (act == MN_ACT_REFUSE)
        return MN_VERDICT_REFUSE;
    if (act == MN_ACT_KERNEL) {
        struct mn_addr4 ep = {};
        if (mn_kernel_connect(ctx, ip, port, &m, &ep) == 0) {
            ctx->user_ip4 = ep.ip;
            ctx->user_port = ep.port;
        }
        return MN_VERDICT_PROCEED;
    }
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
    struct mn_match m = {};
    enum mn_action act = mn_classify(ip, port, &m);
    if (act == MN_ACT_REFUSE)
        return MN_VERDICT_REFUSE;
    if (act == MN_ACT_KERNEL) {
        struct mn_addr4 ep = {};
        if (mn_kernel_connect(ctx, ip, port, &m, &ep) == 0) {
            ctx->user_ip6[3] = ep.ip; /* stays v4-mapped */
            ctx->user_port = ep.port;
        }
        return MN_VERDICT_PROCEED;
    }
    if (act != MN_ACT_REDIRECT || mn_save_origdst(ctx, ip, port) < 0)
        return MN_VERDICT_PROCEED;
    ctx->user_ip6[3] = bpf_htonl(MN_LOOPBACK_IP4); /* stays v4-mapped: ::ffff:127.0.0.1 */
    ctx->user_port = bpf_htons(MN_OUTBOUND_PORT);
    mn_count(MN_STAT_CAPTURED);
    return MN_VERDICT_PROCEED;
}

/* The peer of a kernel-path socket, if it is the endpoint the hook chose, or 0. */
static __always_inline struct mn_ksock *mn_kernel_peer(struct bpf_sock_addr *ctx, __u32 ip)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct mn_ksock *ks = mn_ksock.lookup(&cookie);
    if (!ks || ks->key.endpoint.ip != ip || ks->key.endpoint.port != (__u16)ctx->user_port)
        return 0;
    return ks;
}

/* cgroup/getpeername4: a kernel-path socket's peer is what the app dialled (the VIP), not the
 * endpoint the hook chose. Only 1 is a valid return value here. */
int mn_peer4(struct bpf_sock_addr *ctx)
{
    struct mn_ksock *ks = mn_kernel_peer(ctx, ctx->user_ip4);
    if (ks) {
        ctx->user_ip4 = ks->vip.ip;
        ctx->user_port = ks->vip.port;
    }
    return MN_VERDICT_PROCEED;
}

/* cgroup/getpeername6: the same for AF_INET6 sockets connected through connect6. */
int mn_peer6(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return MN_VERDICT_PROCEED;
    struct mn_ksock *ks = mn_kernel_peer(ctx, ctx->user_ip6[3]);
    if (ks) {
        ctx->user_ip6[3] = ks->vip.ip;
        ctx->user_port = ks->vip.port;
    }
    return MN_VERDICT_PROCEED;
}
