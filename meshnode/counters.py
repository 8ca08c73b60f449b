"""The declared counter schema: every traffic figure a proxy worker keeps, how the agent sums
it, and what /metrics calls it.

One declaration drives four places that used to list the fields by hand:
- the worker (proxy/stats.py): a pair's counters are `PairStats` attributes named here, sent by
  name in the stats reply (wire.StatsReply);
- the agent's sums (telemetry/aggregate.py): by `kind`, a counter adds over workers and over
  the processes a restart retired (so it never falls back), a gauge adds over the live workers
  only, a max takes the largest live value;
- the Prometheus families (telemetry/metrics.py): family name, help and constant labels;
- `meshnode status` (per service: the pair fields summed over sources; per endpoint: the
  ENDPOINT fields), read from the same sums as `stat` and /metrics.

Kernel-path connections (no proxy: the connect hook balances them) fill the same pair fields
from BPF maps in the agent (telemetry/kernel_flows.py), plus KERNEL_PAIR_FIELDS and
KERNEL_FIELDS; /metrics tells the two apart by a `path` label.

Adding a counter: one `Field` here and the code that bumps it in the worker. The agent, the
wire and /metrics follow without an edit. Names a peer sends that are not declared here (a newer
worker's) are ignored by the sums.

Pure, shared by the worker and the agent: imports nothing of meshnode's but histogram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshnode.histogram import CONNECT_BUCKETS, DURATION_BUCKETS, REQUEST_BUCKETS

__all__ = ["ENDPOINT_FIELDS", "FAILURES", "KERNEL_FIELDS", "KERNEL_PAIR_FIELDS", "KERNEL_PATH",
           "LABELLED_FIELDS", "NOT_ESTABLISHED", "PAIR_FIELDS", "PAIR_HISTOGRAMS", "PROXY_PATH",
           "REQUEST_FIELDS", "SECURITY_FIELDS",
           "SELECTIONS", "WORKER_FIELDS", "Field", "HistogramField", "Kind", "LabelledField",
           "request_succeeded"]

Kind = Literal["counter", "gauge", "max"]


@dataclass(frozen=True, slots=True)
class Field:
    """One figure. `family` is its Prometheus family ("": not exported); fields sharing a family
    are told apart by the constant `labels`; `scale` converts the value to the family's unit."""

    name: str
    kind: Kind
    family: str
    help: str
    labels: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class HistogramField:
    """A fixed-bucket histogram (meshnode.histogram): counts per bucket and their sum."""

    name: str
    bounds: tuple[float, ...]
    family: str
    help: str


@dataclass(frozen=True, slots=True)
class LabelledField:
    """A figure kept per combination of `labels` values (wire.StatsReply.labelled: rows of
    label values and a number); `const` labels tell apart fields sharing a family."""

    name: str
    kind: Kind
    family: str
    help: str
    labels: tuple[str, ...]
    const: tuple[tuple[str, str], ...] = ()


_BYTES_HELP = "Bytes relayed; direction up is client to endpoint, down is endpoint to client."

# Per (source service, destination service) pair. The source is "unknown" when the client's
# service cannot be told.
PAIR_FIELDS: tuple[Field, ...] = (
    Field("connections", "counter", "meshnode_connections_opened",
          "Connections accepted for a destination service (VIP or endpoint address), "
          "including those that then found no endpoint or failed every connect."),
    Field("active", "gauge", "meshnode_connections_active", "Connections open now."),
    Field("closed", "counter", "meshnode_connections_closed", "Connections that ended."),
    Field("bytes_up", "counter", "meshnode_bytes", _BYTES_HELP, (("direction", "up"),)),
    Field("bytes_down", "counter", "meshnode_bytes", _BYTES_HELP, (("direction", "down"),)),
    Field("connect_errors", "counter", "meshnode_connect_attempt_errors",
          "Failed upstream connect attempts, retried ones included."),
)

# Per pair and reason (no_endpoint, refused, timeout, unreachable, error: the last attempt's;
# the kernel path cannot tell why, its reason is NOT_ESTABLISHED).
FAILURES = Field("failures", "counter", "meshnode_connect_failures",
                 "Connections that never reached an endpoint, by reason (no_endpoint, refused, "
                 "timeout, unreachable, error; kernel path: not_established).")

# Who carried a pair's connections: the `path` label of the pair families. Kernel-path ones
# were balanced by the cgroup connect hook with no proxy on the path (Service `datapath`);
# the agent reads their figures from BPF maps (telemetry/kernel_flows.py), not from workers.
PROXY_PATH = "proxy"
KERNEL_PATH = "kernel"
NOT_ESTABLISHED = "not_established"

# Per kernel-path pair, beside its PAIR_FIELDS: the kernel sums lifetime and smoothed RTT at
# close (no buckets), so they are summaries whose count is `kernel_closed`.
KERNEL_PAIR_FIELDS: tuple[Field, ...] = (
    Field("kernel_closed", "counter", "",
          "Kernel-path connections closed after being established (the sums' count)."),
    Field("duration_us", "counter", "meshnode_kernel_connection_duration_seconds",
          "Lifetime of kernel-path connections, connect to close (established ones).",
          scale=1e-6),
    Field("rtt_us", "counter", "meshnode_kernel_connection_rtt_seconds",
          "Smoothed TCP round-trip time of kernel-path connections at close.", scale=1e-6),
)

PAIR_HISTOGRAMS: tuple[HistogramField, ...] = (
    HistogramField("connect", CONNECT_BUCKETS, "meshnode_connect_latency_seconds",
                   "Upstream connect latency."),
    HistogramField("duration", DURATION_BUCKETS, "meshnode_connection_duration_seconds",
                   "Connection lifetime, accept to close."),
    HistogramField("request", REQUEST_BUCKETS, "meshnode_request_duration_seconds",
                   "HTTP, HTTP/2 and gRPC request latency, first request byte to last "
                   "response byte, retries included."),
)

# Per (destination service, endpoint), from the worker's balancer load records
# (proxy/routing.ServiceTable.endpoint_report). Reported for the services a worker routes now.
ENDPOINT_FIELDS: tuple[Field, ...] = (
    Field("active", "gauge", "meshnode_endpoint_connections_active",
          "Connections to the endpoint open now."),
    Field("connections", "counter", "meshnode_endpoint_connections",
          "Connections the balancer made to the endpoint."),
    Field("connect_errors", "counter", "meshnode_endpoint_connect_errors",
          "Failed connect attempts to the endpoint."),
    Field("ewma_ms", "max", "meshnode_endpoint_connect_ewma_seconds",
          "The balancer's moving average of connect latency (the slowest worker's).",
          scale=0.001),
    Field("ejected_for", "max", "meshnode_endpoint_ejected_seconds",
          "Seconds the endpoint stays ejected by outlier detection (0: in rotation)."),
)

# Per (destination service, endpoint): connect attempts the balancer sent there, kept after the
# service goes away.
SELECTIONS = Field("selections", "counter", "meshnode_endpoint_selections",
                   "Connect attempts the balancer sent to an endpoint.")

# Per worker, summed over the host.
WORKER_FIELDS: tuple[Field, ...] = (
    Field("unrouted", "counter", "meshnode_passthrough_connections",
          "Captured connections to no mesh destination, sent on unchanged."),
    Field("origdst_errors", "counter", "meshnode_origdst_errors",
          "Connections refused: original destination unreadable."),
    Field("active", "gauge", "", "Client connections open in the workers now."),
    Field("unknown_messages", "counter", "meshnode_worker_unknown_messages",
          "Agent messages of a kind the workers do not know (a newer agent's), ignored."),
)

# mTLS between hosts and authorization (proxy/tunnel.py, proxy/inbound.py). Label values are
# bounded: sides, causes and reasons are fixed words; peers are hosts; identities and policies
# are the mesh's own (services, hosts, AuthorizationPolicy names).
_IDS = ("src_identity", "dst_identity")
_INBOUND_BYTES = ("Bytes relayed for tunnels this host accepted; up is the remote client to "
                  "the local endpoint.")
SECURITY_FIELDS: tuple[LabelledField, ...] = (
    LabelledField("tls_handshakes", "counter", "meshnode_tls_handshakes",
                  "TLS handshakes of tunnels by side (client: dialed, server: accepted) and "
                  "result: full, resumed, or why it failed (timeout, eof, protocol, "
                  "no_client_cert, untrusted, trust_domain, revoked, expired, not_yet_valid, "
                  "wrong_peer, bad_identity).", ("side", "result")),
    LabelledField("tunnels", "counter", "meshnode_tunnel_connections",
                  "Tunnel connections established, by direction (out: dialed, in: accepted) "
                  "and peer host.", ("direction", "peer")),
    LabelledField("tunnel_refusals", "counter", "meshnode_tunnel_refusals",
                  "Connections between hosts refused by this host, by side and reason (client: "
                  "no_peer, no_identity, or the peer's answer peer_<reason>; server: "
                  "the preamble answer's reason, no_identity, overload).",
                  ("side", "reason")),
    LabelledField("authz_denied", "counter", "meshnode_authz_denied",
                  "Connections authorization refused, by source identity, destination service "
                  "and deciding policy (\"\": the mesh default).", ("src", "dst", "policy")),
    LabelledField("authz_would_deny", "counter", "meshnode_authz_would_deny",
                  "Connections a dry-run policy would have refused (they were allowed).",
                  ("src", "dst", "policy")),
    LabelledField("inbound_connections", "counter", "meshnode_inbound_connections",
                  "Tunnel connections accepted and authorized, by both identities.", _IDS),
    LabelledField("inbound_active", "gauge", "meshnode_inbound_connections_active",
                  "Accepted tunnel connections open now.", _IDS),
    LabelledField("inbound_bytes_up", "counter", "meshnode_inbound_bytes", _INBOUND_BYTES, _IDS,
                  (("direction", "up"),)),
    LabelledField("inbound_bytes_down", "counter", "meshnode_inbound_bytes", _INBOUND_BYTES,
                  _IDS, (("direction", "down"),)),
)

# Requests on HTTP, HTTP/2 and gRPC ports (proxy/http/). Label values are bounded: services and
# routes are the mesh's own, methods a fixed set plus "other" (exchange.method_label),
# status_class "1xx".."5xx", "none" (no response) or a gRPC status name.
_ROUTE = ("src", "dst", "route")
REQUEST_FIELDS: tuple[LabelledField, ...] = (
    LabelledField("requests", "counter", "meshnode_requests",
                  "Requests proxied, by source and destination service, route, method and "
                  "status class (the gRPC status for gRPC calls; none: no response).",
                  ("src", "dst", "route", "method", "status_class")),
    LabelledField("request_retries", "counter", "meshnode_request_retries",
                  "Retries of requests (each retry once), on another endpoint when there is "
                  "one.", _ROUTE),
    LabelledField("retry_budget_exhausted", "counter", "meshnode_retry_budget_exhausted",
                  "Retries not made because the service's retry budget was spent.", _ROUTE),
    LabelledField("request_failures", "counter", "meshnode_request_failures",
                  "Requests that got no response from an endpoint, by why (timeout, reset, "
                  "no_endpoint, circuit_open, denied, bad_request, upstream_error, "
                  "client_gone).", ("src", "dst", "route", "reason")),
    LabelledField("protocol_detections", "counter", "meshnode_protocol_detections",
                  "Connections to auto ports by what detection found: http1, h2, tcp (other "
                  "bytes) or timeout (the client said nothing within http.detectTimeout).",
                  ("dst", "result")),
    LabelledField("mirror_sent", "counter", "meshnode_mirror_requests",
                  "Mirrored copies of requests (a Route rule's mirror) the mirror answered, "
                  "whatever the status, by source and mirror service.", ("src", "dst")),
    LabelledField("mirror_dropped", "counter", "meshnode_mirror_dropped",
                  "Mirrored copies not made or not answered, by why: overload (the worker's "
                  "copies in flight or bytes held at their bound), too_large (the body was not "
                  "held), no_endpoint, denied, protocol (a gRPC call to an HTTP/1.1 port), "
                  "connect, timeout, reset, error.",
                  ("src", "dst", "reason")),
)

# Every labelled field a worker sends (wire.StatsReply.labelled), by name.
LABELLED_FIELDS: tuple[LabelledField, ...] = SECURITY_FIELDS + REQUEST_FIELDS

# Kernel-path connections per endpoint (the agent's, from mn_kflow rows). Label values are
# bounded: services are the mesh's own, endpoints the destination's registered ones ("other"
# for an address no longer registered).
_KERNEL_EP = ("src", "dst", "endpoint")
KERNEL_FIELDS: tuple[LabelledField, ...] = (
    LabelledField("kernel_endpoint_connections", "counter",
                  "meshnode_kernel_endpoint_connections",
                  "Kernel-path connections the connect hook sent to an endpoint.", _KERNEL_EP),
    LabelledField("kernel_endpoint_failures", "counter", "meshnode_kernel_endpoint_failures",
                  "Kernel-path connections to an endpoint closed without being established.",
                  _KERNEL_EP),
    LabelledField("kernel_endpoint_active", "gauge", "meshnode_kernel_endpoint_connections_active",
                  "Kernel-path connections to an endpoint open now.", _KERNEL_EP),
)


def request_succeeded(status_class: str) -> bool:
    """Whether the requests of a `requests` row count as successes, everywhere a success rate
    is shown (stat, top, the dashboard, tap --failed): an answer that is not a 5xx, and for
    gRPC calls (status_class a gRPC status name) OK only. "none", no answer at all, fails;
    4xx is the caller's error, not the service's (as Linkerd counts)."""
    if status_class.endswith("xx"):
        return status_class != "5xx"
    return status_class == "OK"
