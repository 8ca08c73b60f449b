"""The `Route` kind: traffic control for a service's calls (and a gateway's hosts).

A Route names the service whose calls it governs (`service`: calls to its VIP or
`<name>.mesh`) and/or the host names an ingress gateway serves with it (`hosts`). Its HTTP
`rules` are tried in order; the first whose `match` takes a request decides where it goes
(weighted `backends`, each a service or a subset of its endpoints by label), what is done to
it on the way (`fault` delay or abort, `mirror` copy, `rateLimit`) and its timeouts and
retries. `tcp` splits a service's TCP connections by weight.

Everything that can be wrong with a table is refused here, at apply time: a regex RE2 does
not take (RE2 matches in linear time: no pattern can backtrack catastrophically), a rule no
request can reach, weights summing to zero, a mirror that sends a request where it goes
anyway, tables past the size limits; and, across Routes (`check_routes`), two Routes for one
service or one host, and mirror loops. The compiled form the workers run per request is
meshnode/route/traffic.py.

Pure: imports nothing of meshnode's but the resource base and errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from meshnode.errors import UsageError
from meshnode.policy.labels import LabelError, labels_from
from meshnode.policy.resources import (
    NAME_RE,
    NAME_RULE,
    HttpTimeouts,
    Reference,
    RetryPolicy,
    check_method,
)
from meshnode.policy.spec import _Spec

if TYPE_CHECKING:
    from meshnode.policy.resources import Resource

__all__ = ["Backend", "Fault", "HeaderMatch", "Mirror", "RateLimit", "RouteMatch", "RouteRule",
           "RouteSpec", "TcpRoute", "backend_refs", "check_routes", "compile_regex",
           "subset_key"]

# Size limits: a table is evaluated per request, rule by rule; past these it is a mistake or
# an attack on the control plane, not a routing table.
MAX_RULES = 128
MAX_MATCHES = 16  # match entries per rule
MAX_CONDITIONS = 16  # header / cookie / query conditions per match entry
MAX_BACKENDS = 16
MAX_HOSTS = 64
MAX_PATTERN = 512  # characters of a regex
MAX_VALUE = 1024  # characters of an exact or prefix value
MAX_WEIGHT = 10_000
MAX_LABELS = 16

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")  # an HTTP field name (RFC 9110)
_HOST_RE = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}"
                      r"[a-z0-9])?)*")
_GRPC_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

Subset = tuple[tuple[str, str], ...]



def compile_regex(pattern: str, where: str) -> Any:
    """An RE2 pattern (linear-time matching), or ValueError saying why not."""
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"{where}: regex is {len(pattern)} characters (at most {MAX_PATTERN})")
    # imported on first use: ~3 MB in every process, and most meshes route without a regex
    import re2

    options = re2.Options()
    options.log_errors = False  # the error is ours to report, not absl's on stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        why = why.decode(errors="replace") if isinstance(why, bytes) else str(why)
        raise ValueError(f"{where}: regex {pattern!r} is not valid RE2 syntax ({why}); RE2 "
                         "has no backreferences or lookaround") from None


def _one_of(where: str, **given: object) -> None:
    set_ = [k for k, v in given.items() if v is not None]
    if len(set_) != 1:
        raise ValueError(f"{where}: give exactly one of {', '.join(given)}"
                         + (f" (got {', '.join(set_)})" if set_ else ""))


def _check_value(value: str | None, where: str) -> None:
    if value is not None and len(value) > MAX_VALUE:
        raise ValueError(f"{where}: value is {len(value)} characters (at most {MAX_VALUE})")


class _ValueMatch(_Spec, frozen=True):
    """A named value's condition: `exact`, `regex` (RE2, whole value) or `present` (true: the
    name is there; false: it is not)."""

    name: str
    exact: str | None = None
    regex: str | None = None
    present: bool | None = None

    def _check(self, what: str, name_re: re.Pattern[str], **extra: object) -> None:
        where = f"{what} {self.name!r}"
        if not name_re.fullmatch(self.name):
            raise ValueError(f"{what} name {self.name!r} is not a valid name")
        _one_of(where, exact=self.exact, regex=self.regex, present=self.present, **extra)
        _check_value(self.exact, where)
        if self.regex is not None:
            compile_regex(self.regex, where)

    @property
    def atom(self) -> tuple[str, ...]:
        return (type(self).__name__, self.name.lower(), repr(self.exact), repr(self.regex),
                repr(self.present), repr(getattr(self, "prefix", None)))


class HeaderMatch(_ValueMatch, frozen=True):
    """A request header (name case-insensitive; repeats joined with ", "): `exact`,
    `prefix`, `regex` or `present`."""

    prefix: str | None = None

    def __post_init__(self) -> None:
        self._check("header", _TOKEN_RE, prefix=self.prefix)
        _check_value(self.prefix, f"header {self.name!r}")


class CookieMatch(_ValueMatch, frozen=True):
    """A cookie of the request's Cookie header, by name (case-sensitive)."""

    def __post_init__(self) -> None:
        self._check("cookie", _TOKEN_RE)


class QueryMatch(_ValueMatch, frozen=True):
    """A query parameter, by name (decoded; the first occurrence)."""

    def __post_init__(self) -> None:
        self._check("query parameter", re.compile(r"[^\x00-\x20&=#]{1,256}"))


class PathMatch(_Spec, frozen=True):
    """The request path (matched normalized, without the query): `exact`, `prefix` of whole
    segments ("/api" takes /api and /api/x, not /apix) or `regex` (RE2, the whole path)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    def __post_init__(self) -> None:
        _one_of("path", exact=self.exact, prefix=self.prefix, regex=self.regex)
        for name, value in (("exact", self.exact), ("prefix", self.prefix)):
            if value is not None:
                if not value.startswith("/"):
                    raise ValueError(f"path.{name} {value!r} must start with /")
                _check_value(value, f"path.{name}")
        if self.regex is not None:
            compile_regex(self.regex, "path.regex")


class GrpcMatch(_Spec, frozen=True):
    """A gRPC call: `service` ("package.Service") and optionally `method` ("Get"): the path
    /package.Service/Get, or every method of the service."""

    service: str
    method: str | None = None

    def __post_init__(self) -> None:
        if not _GRPC_NAME_RE.fullmatch(self.service):
            raise ValueError(f"grpc.service {self.service!r} is not a gRPC service name "
                             "(package.Service)")
        if self.method is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.method):
            raise ValueError(f"grpc.method {self.method!r} is not a gRPC method name")


class RouteMatch(_Spec, frozen=True):
    """One way a request can match: every given condition holds (none given: any request)."""

    path: PathMatch | None = None
    grpc: GrpcMatch | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    cookies: tuple[CookieMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()

    def __post_init__(self) -> None:
        if self.path is not None and self.grpc is not None:
            raise ValueError("match: give path or grpc, not both (a gRPC method is a path)")
        for m in self.methods:
            check_method(m)
        if len(self.headers) + len(self.cookies) + len(self.query) > MAX_CONDITIONS:
            raise ValueError(f"match: at most {MAX_CONDITIONS} header, cookie and query "
                             "conditions")

    def atoms(self) -> frozenset[tuple[str, ...]]:
        """The conditions other than path and methods, for the reachability check."""
        return frozenset(c.atom for c in (*self.headers, *self.cookies, *self.query))

    def path_spec(self) -> tuple[str, str] | None:
        """The path condition as (kind, value), a grpc condition included."""
        if self.grpc is not None:
            if self.grpc.method is None:
                return ("prefix", f"/{self.grpc.service}")
            return ("exact", f"/{self.grpc.service}/{self.grpc.method}")
        p = self.path
        if p is None:
            return None
        if p.exact is not None:
            return ("exact", p.exact)
        if p.prefix is not None:
            return ("prefix", p.prefix)
        return ("regex", p.regex or "")

    def covers(self, other: RouteMatch) -> bool:
        """Whether every request `other` takes is taken by this one (so a rule after one
        with this match can never be reached through `other`). Conservative: True only when
        it is sure."""
        if self.methods and (not other.methods or not set(other.methods) <= set(self.methods)):
            return False
        if not self.atoms() <= other.atoms():
            return False
        mine, theirs = self.path_spec(), other.path_spec()
        if mine is None:
            return True
        if theirs is None:
            return False
        kind, value = mine
        if kind == "regex" or theirs[0] == "regex":
            return mine == theirs
        if kind == "exact":
            return theirs == mine
        return _under(theirs[1], value)


def _under(path: str, prefix: str) -> bool:
    p = prefix.rstrip("/")
    return not p or path == p or path.startswith(p + "/")


def check_labels(labels: Mapping[str, str], where: str) -> Subset:
    """Endpoint labels as a subset key (sorted pairs), or ValueError (labels.py's rules)."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{where}: at most {MAX_LABELS} labels")
    try:
        return labels_from(labels)
    except LabelError as exc:
        raise ValueError(f"{where}: {exc}") from None


def subset_key(labels: Mapping[str, str]) -> Subset:
    return tuple(sorted(labels.items()))


def _check_service(name: str, where: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"{where}: service name {name!r} is invalid: use {NAME_RULE}")


class Backend(_Spec, frozen=True):
    """Where a share of the requests (or connections) goes: `service`, only its endpoints
    carrying every label of `subset` (empty: all of them), on `port` (None: the port the
    caller dialled, or the service's `port`). `weight`: its share against the rule's other
    backends (0: none, while it stays listed)."""

    service: str
    subset: dict[str, str] = {}
    weight: int = 1
    port: int | None = None

    def __post_init__(self) -> None:
        _check_service(self.service, "backend")
        check_labels(self.subset, f"backend {self.service} subset")
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"backend {self.service}: weight must be between 0 and "
                             f"{MAX_WEIGHT}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"backend {self.service}: port {self.port} is out of range")

    @property
    def key(self) -> tuple[str, Subset, int | None]:
        return (self.service, subset_key(self.subset), self.port)


def _check_backends(backends: tuple[Backend, ...], where: str) -> None:
    if len(backends) > MAX_BACKENDS:
        raise ValueError(f"{where}: at most {MAX_BACKENDS} backends")
    if backends and sum(b.weight for b in backends) <= 0:
        raise ValueError(f"{where}: the backends' weights sum to zero: no request could go "
                         "anywhere (give one a weight above 0)")
    keys = [b.key for b in backends]
    if len(keys) != len(set(keys)):
        raise ValueError(f"{where}: a backend is listed twice (same service, subset and "
                         "port): merge their weights")


def _check_percent(value: float, where: str) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"{where}: percent must be between 0 and 100")


class FaultDelay(_Spec, frozen=True):
    """Hold `percent` % of the requests `seconds` before they are sent."""

    seconds: float
    percent: float = 100.0

    def __post_init__(self) -> None:
        if not 0 < self.seconds <= 3600:
            raise ValueError("fault.delay.seconds must be between 0 and 3600")
        _check_percent(self.percent, "fault.delay")


class FaultAbort(_Spec, frozen=True):
    """Answer `percent` % of the requests at once with `status` (HTTP) or, for gRPC calls,
    `grpc_status` (a gRPC call with only `status` gets the status gRPC maps it to)."""

    status: int | None = None
    grpc_status: int | None = None
    percent: float = 100.0

    def __post_init__(self) -> None:
        if self.status is None and self.grpc_status is None:
            raise ValueError("fault.abort: give status (HTTP) or grpcStatus (gRPC), or both")
        if self.status is not None and not 200 <= self.status <= 599:
            raise ValueError(f"fault.abort.status {self.status} is not between 200 and 599")
        if self.grpc_status is not None and not 1 <= self.grpc_status <= 16:
            raise ValueError(f"fault.abort.grpcStatus {self.grpc_status} is not a gRPC error "
                             "code (1-16)")
        _check_percent(self.percent, "fault.abort")


class Fault(_Spec, frozen=True):
    """Fault injection: `delay` and/or `abort`, to the requests carrying every header
    condition in `headers` (none: every request the rule takes)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    headers: tuple[HeaderMatch, ...] = ()

    def __post_init__(self) -> None:
        if self.delay is None and self.abort is None:
            raise ValueError("fault: give delay, abort or both")
        if len(self.headers) > MAX_CONDITIONS:
            raise ValueError(f"fault.headers: at most {MAX_CONDITIONS}")


class Mirror(_Spec, frozen=True):
    """Send a copy of `percent` % of the requests to `service` (its `subset`, on `port`),
    fire-and-forget: the copy's response is discarded, and a slow or dead mirror never
    slows or fails the request. Only requests whose body the proxy holds whole
    (`Service.http.bufferBytes`) are copied."""

    service: str
    subset: dict[str, str] = {}
    port: int | None = None
    percent: float = 100.0

    def __post_init__(self) -> None:
        _check_service(self.service, "mirror")
        check_labels(self.subset, f"mirror {self.service} subset")
        _check_percent(self.percent, "mirror")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"mirror: port {self.port} is out of range")


class RateLimit(_Spec, frozen=True):
    """A token bucket per host (shared by its proxy workers): `requests_per_second` refill,
    `burst` tokens at most (None: one second's worth). `per_source`: one bucket per calling
    service (its identity), else one for the rule. Requests past it are answered 429 with
    Retry-After (gRPC: RESOURCE_EXHAUSTED)."""

    requests_per_second: float
    burst: int | None = None
    per_source: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.requests_per_second <= 1_000_000:
            raise ValueError("rateLimit.requestsPerSecond must be between 0 and 1000000")
        if self.burst is not None and not 1 <= self.burst <= 1_000_000:
            raise ValueError("rateLimit.burst must be between 1 and 1000000")


class RouteRule(_Spec, frozen=True):
    """One rule: which requests (`match`: any entry; none: every request), where they go
    (`backends`, weighted; none: the Route's service) and what is done on the way. `name`
    labels the request metrics (`route`)."""

    name: str
    match: tuple[RouteMatch, ...] = ()
    backends: tuple[Backend, ...] = ()
    fault: Fault | None = None
    mirror: Mirror | None = None
    rate_limit: RateLimit | None = None
    timeouts: HttpTimeouts | None = None
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"rule name {self.name!r} is invalid: use {NAME_RULE}")
        if self.name == "default":
            raise ValueError("rule name 'default' is taken: it labels requests no rule takes")
        if len(self.match) > MAX_MATCHES:
            raise ValueError(f"rule {self.name}: at most {MAX_MATCHES} match entries")
        _check_backends(self.backends, f"rule {self.name}")

    def covers(self, other: RouteRule) -> bool:
        """Whether this rule takes every request `other` would (so `other`, after it, can
        never match)."""
        mine = self.match or (RouteMatch(),)
        theirs = other.match or (RouteMatch(),)
        return all(any(m.covers(t) for m in mine) for t in theirs)


class TcpRoute(_Spec, frozen=True):
    """The TCP ports of the Route's service: each connection goes to one of `backends`, by
    weight."""

    backends: tuple[Backend, ...]

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("tcp.backends: give at least one backend")
        _check_backends(self.backends, "tcp")


class RouteSpec(_Spec, frozen=True):
    """Traffic control (the `Route` kind): see the module docstring."""

    service: str | None = None
    hosts: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    tcp: TcpRoute | None = None

    def __post_init__(self) -> None:
        if self.service is None and not self.hosts:
            raise ValueError("give service (calls in the mesh), hosts (a gateway's) or both")
        if self.service is not None:
            _check_service(self.service, "route")
        if len(self.hosts) > MAX_HOSTS:
            raise ValueError(f"hosts: at most {MAX_HOSTS}")
        for h in self.hosts:
            if not _HOST_RE.fullmatch(h) or len(h) > 253:
                raise ValueError(f"host {h!r} is not a lowercase DNS name (a leading '*.' "
                                 "takes every name under it; no port)")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError("hosts: a host is listed twice")
        if len(self.rules) > MAX_RULES:
            raise ValueError(f"rules: at most {MAX_RULES} (this table has {len(self.rules)})")
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"rules: the name {dup!r} is used twice")
        for i, rule in enumerate(self.rules):
            for earlier in self.rules[:i]:
                if earlier.covers(rule):
                    raise ValueError(f"rule {rule.name} can never match: rule {earlier.name} "
                                     "before it takes every request it would (move it up or "
                                     "narrow the earlier match)")
            if self.service is None and not rule.backends:
                raise ValueError(f"rule {rule.name}: a Route with no service must name "
                                 "backends in every rule")
            m = rule.mirror
            if m is not None:
                targets: list[tuple[str | None, Subset]] = \
                    [b.key[:2] for b in rule.backends if b.weight] or [(self.service, ())]
                if (m.service, subset_key(m.subset)) in targets:
                    raise ValueError(f"rule {rule.name}: the mirror is a backend of the same "
                                     "rule (a copy would go where the request goes): mirror "
                                     "to another service or subset")
        if self.tcp is not None and self.service is None:
            raise ValueError("tcp: splits connections to the Route's service: give service")

    def route_backends(self) -> Iterator[Backend]:
        for rule in self.rules:
            yield from rule.backends
        if self.tcp is not None:
            yield from self.tcp.backends


def backend_refs(spec: RouteSpec) -> Iterator[tuple[str, Subset]]:
    """Every (service, subset) a Route sends requests, connections or copies to."""
    for b in spec.route_backends():
        yield (b.service, subset_key(b.subset))
    for rule in spec.rules:
        if rule.mirror is not None:
            yield (rule.mirror.service, subset_key(rule.mirror.subset))


def route_references(spec: RouteSpec) -> Iterable[Reference]:
    seen: set[tuple[str, bool]] = set()
    http_targets = {b.service for r in spec.rules for b in r.backends} | \
        {r.mirror.service for r in spec.rules if r.mirror is not None}
    if spec.service is not None and spec.rules:
        http_targets.add(spec.service)
    for name in sorted(http_targets):
        seen.add((name, True))
        yield Reference("Service", name, l7=True)
    names = {b.service for b in spec.tcp.backends} if spec.tcp is not None else set()
    if spec.service is not None:
        names.add(spec.service)
    for name in sorted(names):
        if (name, True) not in seen:
            yield Reference("Service", name)


def check_routes(routes: Iterable[Resource]) -> None:
    """The checks across Routes, on the whole set after a change: one Route per service and
    per host, and no mirror loop (a service's copies reaching, through mirrors, a service
    that copies back to it)."""
    by_service: dict[str, str] = {}
    by_host: dict[str, str] = {}
    mirrors: dict[str, set[str]] = {}
    for r in routes:
        spec: RouteSpec = r.spec
        if spec.service is not None:
            other = by_service.setdefault(spec.service, r.name)
            if other != r.name:
                raise UsageError(f"Routes {other} and {r.name} both govern service "
                                 f"{spec.service}: which one applies would be ambiguous",
                                 f"merge their rules into one Route for {spec.service}")
        for h in spec.hosts:
            other = by_host.setdefault(h, r.name)
            if other != r.name:
                raise UsageError(f"Routes {other} and {r.name} both claim host {h}",
                                 f"keep host {h} in one of them")
        sources = [spec.service] if spec.service else []
        sources += [b.service for rule in spec.rules for b in rule.backends]
        for rule in spec.rules:
            if rule.mirror is not None:
                for s in sources:
                    mirrors.setdefault(s, set()).add(rule.mirror.service)
    cycle = _cycle(mirrors)
    if cycle:
        raise UsageError("mirror loop: " + " -> ".join(cycle) + " (copies of copies would "
                         "multiply the load)", "remove one of these mirrors")


def _cycle(graph: Mapping[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue  # a copy to another subset of the same service goes straight to
                # its endpoints, never through this Route again
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []
