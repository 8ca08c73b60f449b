/* mn_dns.c: DNS redirect on the apps cgroup (sendmsg4, connect4, recvmsg4, getpeername4).
 *
 * While the agent's DNS server is up (mn_dns_cfg: MN_DNS_ENABLED and its port), an enrolled
 * process's DNS query to any resolver (port MN_DNS_SERVICE_PORT) goes to 127.0.0.1:<port>:
 *   sendmsg4     unconnected UDP sendto(resolver:53)                -> rewritten;
 *   connect4     UDP or TCP connect(resolver:53) (glibc connects)   -> rewritten;
 * the resolver it asked is kept under the socket cookie (mn_dns_orig), and the reverse hooks
 * make the agent's replies look like the resolver's:
 *   recvmsg4     source of a datagram from 127.0.0.1:<port>         -> the resolver;
 *   getpeername4 peer 127.0.0.1:<port> of a redirected socket       -> the resolver.
 * glibc's resolver drops replies whose source is not the server it asked ("not from our
 * server"), so the recvmsg4 half is what makes getaddrinfo() work at all.
 *
 * The reverse hooks are not gated by the flag: a query redirected just before the agent turned
 * DNS off still gets its reply rewritten. The DNS port stays in mn_dns_cfg when DNS is off for
 * that reason. Everything else, and every internal failure, proceeds untouched (fail open).
 *
 * Known limit: one original resolver per socket. An unconnected socket querying two resolvers
 * at once sees both replies come from the one it asked last (glibc uses one connected socket
 * per nameserver, so it is not affected).
 */
#include "mn_maps.h"

#ifndef SOCK_DGRAM
#define SOCK_DGRAM 2
#endif

#define MN_LOOPBACK_IP4 0x7f000001 /* 127.0.0.1, host byte order */

/* The agent's switch (struct mn_dns_cfg, in mn_maps.h). One slot (MN_DNS_CFG_SLOT). An array:
 * the slot always exists, all zero = off. */
BPF_TABLE_PINNED("array", __u32, struct mn_dns_cfg, mn_dns_cfg, 1, MN_PIN_DIR "/mn_dns_cfg");
/* Socket cookie -> the resolver the socket asked. LRU: nothing deletes an entry when the
 * socket closes, and a resolver socket lives as long as its process may. */
BPF_TABLE_PINNED("lru_hash", __u64, struct mn_addr4, mn_dns_orig, MN_MAP_DNS_ENTRIES,
                 MN_PIN_DIR "/mn_dns_orig");

/* Bump one MN_STAT_* counter (per-CPU slot: no atomic needed). */
static __always_inline void mn_count(__u32 slot)
{
    __u64 *n = mn_stats.lookup(&slot);
    if (n)
        *n += 1;
}

/* The agent's DNS port (host order), or 0. `want_enabled`: only while redirecting is on (the
 * reverse direction asks with 0: a known port is enough). */
static __always_inline __u32 mn_dns_port(int want_enabled)
{
    __u32 slot = MN_DNS_CFG_SLOT;
    struct mn_dns_cfg *cfg = mn_dns_cfg.lookup(&slot);
    if (!cfg)
        return 0;
    if (want_enabled && !(cfg->flags & MN_DNS_ENABLED))
        return 0;
    return cfg->port & 0xffff;
}

/* Send a query for a resolver to the agent instead, remembering the resolver. */
static __always_inline void mn_dns_redirect(struct bpf_sock_addr *ctx)
{
    /* user_port holds the port in network order in its low 16 bits. */
    if ((__u16)ctx->user_port != bpf_htons(MN_DNS_SERVICE_PORT))
        return;
    struct bpf_sock *sk = ctx->sk;
    if (sk && sk->mark == MN_PROXY_MARK)
        return; /* a misplaced proxy worker: never capture it (see mn_connect.c) */
    __u32 port = mn_dns_port(1);
    if (!port)
        return;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    /* mn_connect4 balanced it in the kernel to an endpoint that listens on port 53: that is
     * where it goes, not to the agent's DNS server */
    if (mn_ksock.lookup(&cookie))
        return;
    struct mn_addr4 orig = {.ip = ctx->user_ip4, .port = (__u16)ctx->user_port, .pad = 0};
    /* No entry, no redirect: a reply the app could not match to its resolver is worse than
     * the query going to that resolver itself. */
    if (mn_dns_orig.update(&cookie, &orig) < 0)
        return;
    ctx->user_ip4 = bpf_htonl(MN_LOOPBACK_IP4);
    ctx->user_port = bpf_htons((__u16)port);
    mn_count(MN_STAT_DNS_REDIRECTED);
}

/* If the address is the agent's DNS server and this socket was redirected, put back the
 * resolver the socket asked. */
static __always_inline void mn_dns_restore(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(MN_LOOPBACK_IP4))
        return;
    __u32 port = mn_dns_port(0);
    if (!port || (__u16)ctx->user_port != bpf_htons((__u16)port))
        return;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct mn_addr4 *orig = mn_dns_orig.lookup(&cookie);
    if (!orig)
        return; /* a process that talks to the agent's port itself: leave it alone */
    ctx->user_ip4 = orig->ip;
    ctx->user_port = orig->port;
}

/* cgroup/sendmsg4: runs for UDP sends that carry an address (unconnected sockets) only. */
int mn_dns_sendmsg4(struct bpf_sock_addr *ctx)
{
    mn_dns_redirect(ctx);
    return MN_VERDICT_PROCEED;
}

/* cgroup/connect4, a second program beside mn_connect4 (both attached with
 * BPF_F_ALLOW_MULTI; the kernel runs them in attach order, each seeing the address the one
 * before left). mn_connect4 runs first and takes TCP connects to mesh destinations, whatever
 * their port; this one then only sees port MN_DNS_SERVICE_PORT destinations that are not
 * mesh destinations (or that mn_connect4 balanced to an endpoint on that port: skipped). */
int mn_dns_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_DGRAM && ctx->type != SOCK_STREAM)
        return MN_VERDICT_PROCEED;
    mn_dns_redirect(ctx);
    return MN_VERDICT_PROCEED;
}

/* cgroup/recvmsg4: runs when a UDP receive asks for the source address. The verifier accepts
 * only 1 as this hook's return value. */
int mn_dns_recvmsg4(struct bpf_sock_addr *ctx)
{
    mn_dns_restore(ctx);
    return MN_VERDICT_PROCEED;
}

/* cgroup/getpeername4: connected UDP and TCP sockets see the resolver as their peer. Only 1
 * is a valid return value here too. */
int mn_dns_peer4(struct bpf_sock_addr *ctx)
{
    mn_dns_restore(ctx);
    return MN_VERDICT_PROCEED;
}
