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
Protocol = Literal["tcp"]  # the L7 issue adds http, http2, grpc and auto
# How a service's endpoints accept connections from other hosts: STRICT only over the mesh's
# mutual TLS (plaintext from another host is refused in the kernel), PERMISSIVE both (the
# plaintext ones counted), DISABLE plaintext only (the service opts out of mTLS).
MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")


class BalancerConfig(_Spec, frozen=True):
    """How a service's endpoints are chosen. `locality` prefers endpoints on this node, then
    this zone, spilling over when they are unhealthy or overloaded; ring-hash hashes the client
    address."""

    algorithm: Algorithm = "p2c-ewma"
    locality: bool = True


class OutlierConfig(_Spec, frozen=True):
    """Passive ejection: `consecutive_failures` connect failures in a row eject an endpoint
    for `base_ejection` seconds times the number of times it was ejected (at most
    `max_ejection`), never more than `max_ejected_share` of the service's endpoints at once."""

    consecutive_failures: int = 5
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    max_ejected_share: float = 0.5

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutiveFailures must be 1 or more")
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
    spiffe://<trust domain>/svc/<name>)."""

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

    def __post_init__(self) -> None:
        if self.port is not None:
            _check_port(self.port)
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


@dataclass(frozen=True, slots=True)
class Reference:
    """A resource named by another one: checked to exist when a set of resources is applied."""

    kind: str
    name: str
    port: int | None = None  # a port the referenced Service must declare


def _no_references(_spec: Any) -> Iterable[Reference]:
    return ()


@dataclass(frozen=True, slots=True)
class KindInfo:
    spec: type[msgspec.Struct]
    summary: str
    # what this kind's spec names elsewhere (the cross-resource checks); none by default
    references: Callable[[Any], Iterable[Reference]] = _no_references

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


class AuthzDestination(_Spec, frozen=True):
    """What a rule is about on the destination (`to`): the endpoint ports (empty: any)."""

    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for port in self.ports:
            _check_port(port)


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
        yield Reference("Service", spec.target)


class MeshAuthorization(_Spec, frozen=True):
    """What authorization does for a service no AuthorizationPolicy decides: `default`
    ALLOW (the mesh is open, as before authorization existed) or DENY (every service takes
    only the callers an ALLOW policy names). `dryRun`: a DENY default is only counted as
    "would deny" (the safe way to turn it on)."""

    default: AuthzAction = "ALLOW"
    dry_run: bool = False


class MeshSpec(_Spec, frozen=True):
    """Mesh-wide settings (the `Mesh` kind; one resource, named `mesh`)."""

    mtls: MeshMtls = MeshMtls()
    authorization: MeshAuthorization = MeshAuthorization()


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
                                    "or identity and port, or dry run",
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
