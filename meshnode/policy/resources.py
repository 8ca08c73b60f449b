"""The resource kinds: typed, strict, versioned by the store.

A resource is a document `{kind, name, spec}` (plus `version` when read back). Each kind's spec
is a frozen msgspec Struct: unknown fields are rejected, field names are camelCase in documents
and snake_case in Python, and each struct checks its own values in `__post_init__` (msgspec
reports the path of the field that failed). Adding a kind is one Struct and one line in `KINDS`;
the stores keep any kind as an opaque validated document and never change for it.

Pure: imports nothing of meshnode's but errors.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from meshnode.errors import UsageError
from meshnode.policy.spec import _Spec

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "1-63 lowercase letters, digits and '-', starting and ending alphanumeric"


def check_name(name: str, what: str = "service") -> str:
    """A resource name is a DNS label, so `<name>.mesh` is always a valid name."""
    if not NAME_RE.fullmatch(name):  # match's $ would let a trailing newline through
        raise UsageError(f"invalid {what} name {name!r}", f"use {NAME_RULE}")
    return name


LB_ALGORITHMS = ("p2c-ewma", "round-robin", "random", "ring-hash")
Algorithm = Literal["p2c-ewma", "round-robin", "random", "ring-hash"]
# tcp: an opaque byte relay; http: HTTP/1.1; http2: HTTP/2 with prior knowledge (h2c, both
# sides); grpc: http2 whose statuses are gRPC's; auto: HTTP/1.1 or HTTP/2 when the client's first
# bytes say so within `http.detectTimeout`, else tcp (a server-first protocol never waits longer).
Protocol = Literal["tcp", "http", "http2", "grpc", "auto"]
PROTOCOLS = ("tcp", "http", "http2", "grpc", "auto")
L7_PROTOCOLS = frozenset({"http", "http2", "grpc", "auto"})
# What a retry may be attempted on (the request was not answered yet, or answered so):
# connect-failure (no connection to the endpoint; safe for any method), reset (the endpoint
# closed or reset before a response), gateway-error (502, 503 or 504), 5xx (any 5xx),
# unavailable (gRPC status 14, in headers or trailers), refused-stream (HTTP/2 REFUSED_STREAM).
RetryOn = Literal["connect-failure", "reset", "gateway-error", "5xx", "unavailable",
                  "refused-stream"]
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
# How a service's endpoints accept connections from other hosts: STRICT only over the mesh's
# mutual TLS (plaintext from another host is refused in the kernel), PERMISSIVE both (the
# plaintext ones counted), DISABLE plaintext only (the service opts out of mTLS).
MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
# Who balances a service's connections (ServicePolicy.datapath).
Datapath = Literal["proxy", "kernel", "auto"]
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")


class BalancerConfig(_Spec, frozen=True):
    """How a service's endpoints are chosen. `locality` prefers endpoints on this node, then
    this zone, spilling over when they are unhealthy or overloaded; ring-hash hashes the client
    address."""

    algorithm: Algorithm = "p2c-ewma"
    locality: bool = True


class OutlierConfig(_Spec, frozen=True):
    """Passive ejection: `consecutive_failures` connect failures in a row (or, on HTTP ports,
    `consecutive_5xx` 5xx answers or resets: 0 turns that off) eject an endpoint for
    `base_ejection` seconds times the number of times it was ejected (at most
    `max_ejection`), never more than `max_ejected_share` of the service's endpoints at once."""

    consecutive_failures: int = 5
    consecutive_5xx: int = msgspec.field(default=5, name="consecutive5xx")
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    max_ejected_share: float = 0.5

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutiveFailures must be 1 or more")
        if self.consecutive_5xx < 0:
            raise ValueError("consecutive5xx must be 0 (off) or more")
        if not 0 <= self.max_ejected_share <= 1:
            raise ValueError("maxEjectedShare must be between 0 and 1")
        if self.base_ejection <= 0 or self.max_ejection < self.base_ejection:
            raise ValueError("use 0 < baseEjection <= maxEjection (seconds)")


class HealthConfig(_Spec, frozen=True):
    """Active checks the endpoint's own agent runs. `kind`: "tcp" (connect), "http" (GET
    `path`, 2xx is healthy) or "none"."""

    kind: Literal["tcp", "http", "none"] = "tcp"
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0 or self.timeout > self.interval:
            raise ValueError("use 0 < timeout <= interval (seconds)")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("thresholds are counts of 1 or more")
        if not self.path.startswith("/"):
            raise ValueError(f"path {self.path!r} must start with /")


class Timeouts(_Spec, frozen=True):
    """Per-service connection timeouts, seconds; None takes the agent's default."""

    connect: float | None = None
    idle: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("connect", self.connect), ("idle", self.idle)):
            if value is not None and not 0 < value <= 86_400:
                raise ValueError(f"{name} must be between 0 and 86400 seconds")


class PortSpec(_Spec, frozen=True):
    """A port of the service's VIP with its declared protocol."""

    port: int
    protocol: Protocol = "tcp"

    def __post_init__(self) -> None:
        _check_port(self.port)


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")


class RetryBudget(_Spec, frozen=True):
    """Retries a service's callers may add, per worker: at most `ratio` of the requests of the
    last `window` seconds, plus `min_per_second` (so a quiet service can still retry). When
    every endpoint fails, retries stop here instead of multiplying the load (Linkerd's and
    Envoy's budgets; defaults as Linkerd's)."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 10:
            raise ValueError("retryBudget.ratio must be between 0 and 10")
        if self.min_per_second < 0:
            raise ValueError("retryBudget.minPerSecond must be 0 or more")
        if not 1 <= self.window <= 3600:
            raise ValueError("retryBudget.window must be between 1 and 3600 seconds")


class RetryPolicy(_Spec, frozen=True):
    """When a request is tried again, always on another endpoint when there is one.
    `attempts`: tries after the first (0: never retry). `on`: the conditions (RetryOn).
    `methods`: HTTP methods retried on conditions after the request was sent (a
    connect-failure is retried for any method: nothing reached the endpoint). `grpc_codes`:
    gRPC statuses retried (14, UNAVAILABLE, by default) when `on` lists unavailable.
    `backoff`: the base delay, doubled per retry with full jitter. Only requests whose body
    fits `Http.bufferBytes` are retried (the proxy must still hold it)."""

    attempts: int = 2
    on: tuple[RetryOn, ...] = ("connect-failure", "reset", "gateway-error", "unavailable",
                               "refused-stream")
    methods: tuple[str, ...] = IDEMPOTENT_METHODS
    grpc_codes: tuple[int, ...] = (14,)
    backoff: float = 0.025

    def __post_init__(self) -> None:
        if not 0 <= self.attempts <= 10:
            raise ValueError("retry.attempts must be between 0 and 10")
        if not 0 <= self.backoff <= 10:
            raise ValueError("retry.backoff must be between 0 and 10 seconds")
        for m in self.methods:
            if not re.fullmatch(r"[A-Z]{1,20}", m):
                raise ValueError(f"retry.methods: {m!r} is not an HTTP method in capitals")
        for c in self.grpc_codes:
            if not 1 <= c <= 16:
                raise ValueError(f"retry.grpcCodes: {c} is not a gRPC error code (1-16)")


class HttpTimeouts(_Spec, frozen=True):
    """Per request, seconds. `request`: from the request's first byte to the response's last,
    retries included (None: none); `per_try`: one attempt's wait for the response headers
    (None: up to `request`); `idle`: a client or pooled upstream connection with no request
    in flight is closed after this long (a stream with no bytes either way, too)."""

    request: float | None = 15.0
    per_try: float | None = None
    idle: float = 300.0

    def __post_init__(self) -> None:
        for name, value in (("request", self.request), ("perTry", self.per_try),
                            ("idle", self.idle)):
            if value is not None and not 0 < value <= 86_400:
                raise ValueError(f"timeouts.{name} must be between 0 and 86400 seconds")


class HttpLimits(_Spec, frozen=True):
    """Circuit breaking, per worker and endpoint: `max_requests` in flight to one endpoint
    (0: no limit), `max_pending` requests waiting for a connection or a stream to an endpoint
    (more are answered 503 at once), `max_connections` pooled connections per endpoint.
    `max_header_bytes`: a request's or response's header block (431/502 past it);
    `max_body_bytes`: a request body (413 past it; 0: no limit)."""

    max_requests: int = 0
    max_pending: int = 1024
    max_connections: int = 1024
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 0

    def __post_init__(self) -> None:
        for name, value in (("maxRequests", self.max_requests),
                            ("maxPending", self.max_pending),
                            ("maxConnections", self.max_connections),
                            ("maxBodyBytes", self.max_body_bytes)):
            if value < 0:
                raise ValueError(f"limits.{name} must be 0 or more")
        if not 1024 <= self.max_header_bytes <= 1024 * 1024:
            raise ValueError("limits.maxHeaderBytes must be between 1024 and 1048576")


class HttpMatch(_Spec, frozen=True):
    """Which requests a route takes: all of the given conditions hold (none: every request).
    `path_prefix` matches whole segments ("/api" takes /api and /api/x, not /apix); gRPC
    methods are paths: /package.Service/Method."""

    path_exact: str | None = None
    path_prefix: str | None = None
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, value in (("pathExact", self.path_exact), ("pathPrefix", self.path_prefix)):
            if value is not None and not value.startswith("/"):
                raise ValueError(f"match.{name} {value!r} must start with /")
        if self.path_exact is not None and self.path_prefix is not None:
            raise ValueError("match: give pathExact or pathPrefix, not both")
        for m in self.methods:
            if not re.fullmatch(r"[A-Z]{1,20}", m):
                raise ValueError(f"match.methods: {m!r} is not an HTTP method in capitals")


class HttpRoute(_Spec, frozen=True):
    """A named class of a service's requests with its own timeouts and retries (None: the
    service's). The first route whose `match` takes a request is its route; a request no
    route takes is on route "default". `name` labels the request metrics."""

    name: str
    match: HttpMatch = HttpMatch()
    timeouts: HttpTimeouts | None = None
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        check_route_name(self.name)


def check_route_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"route name {name!r} is invalid: use {NAME_RULE}")
    return name


class HttpPolicy(_Spec, frozen=True):
    """How the proxy handles a service's HTTP, HTTP/2 and gRPC ports (ignored on tcp ports).
    `detect_timeout`: how long an `auto` port waits for the client's first bytes before it
    relays the connection as tcp (a server-first protocol's banner waits at most this long).
    `buffer_bytes`: a request body up to this size is held until the response starts, so the
    request can be retried. `routes`: the first matching one applies (see HttpRoute)."""

    detect_timeout: float = 0.2
    timeouts: HttpTimeouts = HttpTimeouts()
    retry: RetryPolicy = RetryPolicy()
    retry_budget: RetryBudget = RetryBudget()
    limits: HttpLimits = HttpLimits()
    buffer_bytes: int = 64 * 1024
    routes: tuple[HttpRoute, ...] = ()

    def __post_init__(self) -> None:
        if not 0.01 <= self.detect_timeout <= 10:
            raise ValueError("http.detectTimeout must be between 0.01 and 10 seconds")
        if not 0 <= self.buffer_bytes <= 16 * 1024 * 1024:
            raise ValueError("http.bufferBytes must be between 0 and 16 MiB")
        names = [r.name for r in self.routes]
        if len(names) != len(set(names)):
            raise ValueError("http.routes names a route twice")
        if "default" in names:
            raise ValueError("http.routes: 'default' is the name of requests no route takes")

    def route_for(self, method: str, path: str) -> HttpRoute | None:
        """The first of `routes` whose match takes (method, path: its query ignored); None:
        route "default". The worker (proxy/http/exchange.py) and explain both ask this."""
        bare = path.split("?", 1)[0]
        for r in self.routes:
            m = r.match
            if m.methods and method not in m.methods:
                continue
            if m.path_exact is not None and bare != m.path_exact:
                continue
            if m.path_prefix is not None and not _under(bare, m.path_prefix):
                continue
            return r
        return None


def _under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or below it, by whole segments."""
    p = prefix.rstrip("/")
    return not p or path == p or path.startswith(p + "/")


class WorkloadSelector(_Spec, frozen=True):
    """Who may be enrolled as this service, checked against what the kernel says about the
    process at enrollment (each list: any one entry matches; an empty list: anything).
    `uids`: the process's real uid; `executables`: the absolute path of /proc/PID/exe;
    `sha256`: the hex digest of that executable; `nodes`: glob patterns of the hosts that may
    run the service (the CA issues its identity to no other host)."""

    uids: tuple[int, ...] = ()
    executables: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for uid in self.uids:
            if not 0 <= uid < 2**32:
                raise ValueError(f"uid {uid} is out of range")
        for path in self.executables:
            if not path.startswith("/"):
                raise ValueError(f"executable {path!r} must be an absolute path")
        for digest in self.sha256:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"sha256 {digest!r} is not 64 lowercase hex digits")

    @property
    def empty(self) -> bool:
        return not (self.uids or self.executables or self.sha256 or self.nodes)


class ServicePolicy(_Spec, frozen=True):
    """Everything that describes a service (the `Service` kind's spec).

    `port`: VIP:port reaches every endpoint, each on its own port; without it VIP:P reaches the
    endpoints listening on P. `ports` declares the protocol of other VIP ports (`protocol` is
    the default). `vip` pins the VIP (else the registry allocates one). `fail_mode`: what a
    captured connection gets while the proxy cannot serve the service (open: its original
    destination; closed: refused). `max_connections`: active connections the proxy carries
    to this service at once, per worker (0: no limit); more are refused. `mtls`: how its
    endpoints accept connections from other hosts (None: the Mesh resource's default).
    `identity`: which processes may be enrolled as it (its SPIFFE identity is
    spiffe://<trust domain>/svc/<name>). `datapath`: who balances its connections: the proxy
    (`proxy`), or the kernel's connect hook (`kernel`; `auto`: the kernel whenever the policy
    needs nothing of the proxy, see meshnode/policy/datapath.py). `close_removed_connections`:
    on the kernel path, connections to an endpoint that left (removed or unhealthy) are
    closed (sock_diag SOCK_DESTROY) instead of left to finish."""

    port: int | None = None
    protocol: Protocol = "tcp"
    ports: tuple[PortSpec, ...] = ()
    vip: str | None = None
    fail_mode: Literal["open", "closed"] = "open"
    balancer: BalancerConfig = BalancerConfig()
    health: HealthConfig = HealthConfig()
    outlier: OutlierConfig = OutlierConfig()
    timeouts: Timeouts = Timeouts()
    max_connections: int = 0
    mtls: MtlsMode | None = None
    identity: WorkloadSelector = WorkloadSelector()
    http: HttpPolicy = HttpPolicy()
    datapath: Datapath = "proxy"
    close_removed_connections: bool = False

    def __post_init__(self) -> None:
        if self.port is not None:
            _check_port(self.port)
        if self.datapath == "kernel":
            # what the kernel can never do for it; what may change later (routes, policies,
            # mTLS) moves it to the proxy at run time instead, saying why
            if self.l7:
                raise ValueError("datapath kernel carries opaque TCP only, and a port of this "
                                 "service speaks HTTP: use datapath auto or proxy")
            if self.max_connections:
                raise ValueError("datapath kernel cannot enforce maxConnections (the proxy "
                                 "does): drop it or use datapath proxy")
        seen = [p.port for p in self.ports]
        if len(seen) != len(set(seen)):
            raise ValueError("ports lists a port twice")
        if self.vip is not None:
            try:
                ipaddress.IPv4Address(self.vip)
            except ValueError:
                raise ValueError(f"vip {self.vip!r} is not an IPv4 address") from None
        if self.max_connections < 0:
            raise ValueError("maxConnections must be 0 (no limit) or more")

    @property
    def fail_closed(self) -> bool:
        return self.fail_mode == "closed"

    def protocol_for(self, port: int) -> Protocol:
        """The protocol of connections to VIP or endpoint port `port`: the `ports` entry
        naming it, else the service's `protocol`."""
        for p in self.ports:
            if p.port == port:
                return p.protocol
        return self.protocol

    @property
    def l7(self) -> bool:
        """Whether any of its ports is handled per request (not tcp)."""
        return self.protocol in L7_PROTOCOLS or any(p.protocol in L7_PROTOCOLS
                                                    for p in self.ports)


@dataclass(frozen=True, slots=True)
class Reference:
    """A resource named by another one: checked to exist when a set of resources is applied."""

    kind: str
    name: str
    port: int | None = None  # a port the referenced Service must declare
    l7: bool = False  # the referenced Service must have an HTTP-family port (ServicePolicy.l7)


def _no_references(_spec: Any) -> Iterable[Reference]:
    return ()


@dataclass(frozen=True, slots=True)
class KindInfo:
    spec: type[msgspec.Struct]
    summary: str
    # what this kind's spec names elsewhere (the cross-resource checks); none by default
    references: Callable[[Any], Iterable[Reference]] = _no_references
    # the checks across every resource of this kind, on the whole set after a change
    check_set: Callable[[list[Resource]], None] | None = None

    @property
    def refers(self) -> bool:
        """Whether resources of this kind can name others (else the checks skip them)."""
        return self.references is not _no_references


class MeshMtls(_Spec, frozen=True):
    """The mesh-wide default of `Service.mtls`."""

    mode: MtlsMode = "PERMISSIVE"


AuthzAction = Literal["ALLOW", "DENY"]
AUTHZ_TARGET_ALL = "*"  # an AuthorizationPolicy target: every service
# A SPIFFE ID pattern: spiffe://TRUST-DOMAIN/PATH, PATH segments of letters, digits, '.', '_'
# and '-'; the last segment may be '*' (every ID under that path). '*' alone: any
# authenticated caller.
_SPIFFE_PATTERN_RE = re.compile(
    r"^spiffe://[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?(/[A-Za-z0-9._-]+)*(/\*|/[A-Za-z0-9._-]+)$")


def check_identity_pattern(pattern: str) -> str:
    if pattern != "*" and not _SPIFFE_PATTERN_RE.fullmatch(pattern):
        raise ValueError(f"identity {pattern!r} is not a SPIFFE ID pattern: use "
                         "spiffe://TRUST-DOMAIN/PATH, '*' only as the whole last segment "
                         "(spiffe://td/svc/*), or '*' alone for any authenticated service")
    if "/../" in pattern + "/" or "/./" in pattern + "/":
        raise ValueError(f"identity {pattern!r} has a '.' or '..' path segment")
    return pattern


class AuthzSource(_Spec, frozen=True):
    """Who a rule is about (`from`): any listed service (its identity spiffe://*/svc/NAME, in
    the trust domain TLS already checked), any identity matching a pattern, or, with
    `unauthenticated`, callers with no identity (plaintext from another host). All empty:
    any caller."""

    services: tuple[str, ...] = ()
    identities: tuple[str, ...] = ()
    unauthenticated: bool = False

    def __post_init__(self) -> None:
        for name in self.services:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"service name {name!r} is invalid: use {NAME_RULE}")
        for pattern in self.identities:
            check_identity_pattern(pattern)

    @property
    def any(self) -> bool:
        return not (self.services or self.identities or self.unauthenticated)


_METHOD_RE = re.compile(r"[A-Z]{1,20}")
# a rule path as written, less a final "/*": '/', then RFC 3986 pchars ('*' excepted)
_RULE_PATH_RE = re.compile(r"/[A-Za-z0-9\-._~!$&'()+,;=:@%/]{0,1023}")
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})?")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DECODED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/\\")


def _unescape(m: re.Match[str]) -> str:
    hex_ = m.group(1)
    if hex_ is None:
        return "%25"  # a bare '%' is a literal one: it must not pair with what is decoded
    c = chr(int(hex_, 16))
    return c if c in _DECODED else "%" + hex_.upper()


def normalize_path(path: str) -> str:
    """A request path as authorization matches it: the query and fragment dropped, an
    absolute-form target ("http://host/a") reduced to its path, %-escapes of unreserved
    characters, '/' and '\\' decoded (the others upper-cased, a bare '%' written %25),
    '\\' read as '/', empty segments merged and '.' and '..' resolved (RFC 3986 5.2.4).
    Idempotent (what rules are checked against). So "/a/../admin",
    "//admin", "/%61dmin" and "/x%2F..%2Fadmin" are all "/admin": a backend that reads them
    so cannot be reached past a rule on "/admin". A target that is not a path ("*",
    "host:443") is returned as it is: only a rule on any path ("*") matches it."""
    if path[:1] == "/" and "%" not in path and "//" not in path and "/." not in path \
            and "?" not in path and "\\" not in path and "#" not in path:
        return path  # the common case (it runs per request): nothing to rewrite
    for c in "?#":
        i = path.find(c)
        if i >= 0:
            path = path[:i]
    if not path.startswith("/"):
        m = _SCHEME_RE.match(path)
        if m is None:
            return path
        i = path.find("/", m.end())
        path = path[i:] if i >= 0 else "/"
    if "%" in path:
        path = _PCT_RE.sub(_unescape, path)  # one pass: "%252e" stays, never "."
    parts = path.replace("\\", "/").split("/")
    out: list[str] = []
    for seg in parts[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg and seg != ".":
            out.append(seg)
    tail = "/" if out and parts[-1] in ("", ".", "..") else ""
    return "/" + "/".join(out) + tail


def check_method(method: str) -> str:
    if not _METHOD_RE.fullmatch(method):
        raise ValueError(f"method {method!r} is not an HTTP method: write it in capitals, "
                         "e.g. GET (gRPC calls are POST)")
    return method


def check_rule_path(path: str) -> str:
    """A `to.paths` entry: "*", an exact normalized path, or one followed by "/*"."""
    if path == "*":
        return path
    if not path.startswith("/"):
        raise ValueError(f"path {path!r} must start with '/' (or be '*': any path)")
    body = path[:-2] if path.endswith("/*") else path
    if "*" in body:
        raise ValueError(f"path {path!r}: '*' is only allowed as the whole last segment "
                         "('/a/*': /a and below) or alone ('*': any path)")
    if body and not _RULE_PATH_RE.fullmatch(body):
        raise ValueError(f"path {path!r} holds a character a path cannot carry as it is "
                         "(space, '?', '#', control, non-ASCII): percent-encode it")
    if re.search(r"%(?![0-9A-Fa-f]{2})", body):
        raise ValueError(f"path {path!r} has a '%' not followed by two hex digits: write "
                         "'%25' for a literal '%'")
    want = normalize_path(body) if body else body
    if body.endswith("/") and body != path:
        want = want.rstrip("/")
    if want != body:
        raise ValueError(f"path {path!r} is not in normal form (requests are matched "
                         f"normalized): write {want + path[len(body):]!r}")
    return path


class AuthzDestination(_Spec, frozen=True):
    """What a rule is about on the destination (`to`); all given conditions must hold.

    `ports`: the endpoint ports (empty: any). On HTTP, HTTP/2 and gRPC ports, per request:
    `methods`, HTTP methods in capitals (GET, POST; empty: any), and `paths` (empty: any),
    each an exact path "/a/b", a prefix of whole segments "/a/*" (/a and /a/x, not /ab), or
    "*" (any path). gRPC calls are POSTs to the path "/package.Service/Method": write
    "/package.Service/Method" for one method, "/package.Service/*" for all of a service's.
    Request paths are matched normalized (`normalize_path`: no query, escapes and dot
    segments resolved), so a rule's path must be written normalized. A rule with methods or
    paths needs a target Service with an HTTP-family port; how it is decided for a
    connection before its requests is in policy/authz.py."""

    ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for port in self.ports:
            _check_port(port)
        for method in self.methods:
            check_method(method)
        for path in self.paths:
            check_rule_path(path)

    @property
    def http(self) -> bool:
        """Whether the rule has HTTP conditions (it is then checked per request)."""
        return bool(self.methods or self.paths)


class AuthzRule(_Spec, frozen=True):
    """A rule matches a connection when both its `from` and its `to` do."""

    from_: AuthzSource = msgspec.field(default=AuthzSource(), name="from")
    to: AuthzDestination = AuthzDestination()


class AuthorizationPolicySpec(_Spec, frozen=True):
    """Who may call a service (the `AuthorizationPolicy` kind; semantics in
    meshnode/policy/authz.py). `target`: a service name, or "*" for every service. `action`:
    DENY wins over ALLOW; once any ALLOW policy targets a service, callers no ALLOW policy
    matches are denied. `rules`: any one matching is a match (none: every caller matches).
    `dryRun`: evaluated and counted as "would deny", never enforced."""

    target: str
    action: AuthzAction = "ALLOW"
    dry_run: bool = False
    rules: tuple[AuthzRule, ...] = ()

    def __post_init__(self) -> None:
        if self.target != AUTHZ_TARGET_ALL and not NAME_RE.fullmatch(self.target):
            raise ValueError(f"target {self.target!r} is neither a service name ({NAME_RULE}) "
                             "nor '*' (every service)")


def _authz_references(spec: AuthorizationPolicySpec) -> Iterable[Reference]:
    if spec.target != AUTHZ_TARGET_ALL:
        yield Reference("Service", spec.target, l7=any(r.to.http for r in spec.rules))


class MeshAuthorization(_Spec, frozen=True):
    """What authorization does for a service no AuthorizationPolicy decides: `default`
    ALLOW (the mesh is open, as before authorization existed) or DENY (every service takes
    only the callers an ALLOW policy names). `dryRun`: a DENY default is only counted as
    "would deny" (the safe way to turn it on)."""

    default: AuthzAction = "ALLOW"
    dry_run: bool = False


class MeshTracing(_Spec, frozen=True):
    """Request tracing on HTTP, HTTP/2 and gRPC ports. W3C `traceparent`/`tracestate` are
    always propagated; a request that arrives without one starts a trace, sampled with
    probability `sampling` (an incoming traceparent's sampled flag is kept). Spans of sampled
    requests are exported over OTLP/HTTP (protobuf) to `otlp_endpoint` ("host:port" or an
    http:// URL; "": spans are not exported), batched off the request path: a collector that
    is down costs dropped spans, never a request."""

    otlp_endpoint: str = ""
    sampling: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.sampling <= 1:
            raise ValueError("tracing.sampling must be between 0 and 1")
        ep = self.otlp_endpoint
        if ep and not re.fullmatch(r"(https?://)?[A-Za-z0-9.-]+:\d{1,5}(/[\x21-\x7e]*)?", ep):
            raise ValueError(f"tracing.otlpEndpoint {ep!r} is not host:port or an http URL")


class MeshSpec(_Spec, frozen=True):
    """Mesh-wide settings (the `Mesh` kind; one resource, named `mesh`)."""

    mtls: MeshMtls = MeshMtls()
    authorization: MeshAuthorization = MeshAuthorization()
    tracing: MeshTracing = MeshTracing()


MESH_NAME = "mesh"  # the one Mesh resource's name


def mtls_mode(service: ServicePolicy, mesh: MeshSpec | None) -> MtlsMode:
    """A service's effective mTLS mode: its own, else the mesh's default."""
    if service.mtls is not None:
        return service.mtls
    return (mesh or MeshSpec()).mtls.mode


KINDS: dict[str, KindInfo] = {
    "Service": KindInfo(ServicePolicy, "a service: ports and protocols, VIP, fail mode, "
                                      "balancing, health, outlier ejection, timeouts, limits, "
                                      "mTLS mode, workload selectors"),
    "Mesh": KindInfo(MeshSpec, "mesh-wide settings (one, named mesh): default mTLS mode, "
                               "default authorization"),
    "AuthorizationPolicy": KindInfo(AuthorizationPolicySpec,
                                    "who may call a service: ALLOW or DENY by caller service "
                                    "or identity, port, HTTP method and path, or dry run",
                                    _authz_references),
}


def kind_info(kind: str) -> KindInfo:
    info = KINDS.get(kind)
    if info is None:
        raise UsageError(f"unknown kind {kind!r}", "use one of: " + ", ".join(sorted(KINDS)))
    return info


@dataclass(frozen=True, slots=True)
class Resource:
    """A validated document. `version` is the store's version it was read at (0: not read
    from a store; in a document, the version an apply expects to replace)."""

    kind: str
    name: str
    spec: Any  # the kind's spec struct
    version: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    def to_doc(self, *, with_version: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if with_version and self.version:
            doc["version"] = self.version
        doc["spec"] = msgspec.to_builtins(self.spec)
        return doc

    def spec_builtins(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self.spec)
        return out


def default_spec(kind: str) -> Any:
    return kind_info(kind).spec()


def spec_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a kind's spec (`meshnode schema KIND`)."""
    out: dict[str, Any] = msgspec.json.schema(kind_info(kind).spec)
    return out


# The CA's kinds live with the identity rules; registered here so every reader of KINDS
# (documents, the store, the CLI) knows them. Imported last: identity.py builds on _Spec.
from meshnode.policy import identity as _identity  # noqa: E402

KINDS.update({
    "TrustBundle": KindInfo(_identity.TrustBundleSpec,
                            "the mesh's trust anchors and revoked hosts, signed by the CA"),
    "CertificateRequest": KindInfo(_identity.CertificateRequestSpec,
                                   "a host's request for a node or workload certificate"),
    "Certificate": KindInfo(_identity.CertificateSpec, "what the CA issued for a request"),
})

from meshnode.policy import traffic as _traffic  # noqa: E402

KINDS["Route"] = KindInfo(_traffic.RouteSpec,
                          "traffic control for a service's calls or a gateway's hosts: rules "
                          "matching path, method, headers, cookies, query or gRPC method; "
                          "weighted backends and subsets, faults, mirroring, rate limits",
                          _traffic.route_references, _traffic.check_routes)

# The ingress gateway's kind lives in its own module (it builds on Reference and _Spec).
from meshnode.policy import gateway as _gateway  # noqa: E402

KINDS["Gateway"] = KindInfo(_gateway.GatewaySpec,
                            "an ingress gateway: TLS listeners on the hosts it names, routing "
                            "requests by host into the mesh with its service's identity",
                            _gateway.gateway_references)
