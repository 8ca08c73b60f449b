/* mn_sockops.c: sock_ops on the apps cgroup.
 *
 * When a captured connect completes (ACTIVE_ESTABLISHED), the original destination saved by
 * mn_connect under the socket cookie moves to mn_origdst, keyed by the client's local
 * (ip, port): the one thing the proxy can see of this socket (its accepted socket's peer).
 * The callback runs before the proxy's accept() can return the connection, so the proxy never
 * races it. Sockets that were not captured have no cookie entry and cost one lookup.
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

int mn_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        mn_publish_origdst(skops);
    return 1; /* sock_ops return value is ignored for this callback; 1 is "ok" */
}
