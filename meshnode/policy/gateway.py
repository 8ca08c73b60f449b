"""The `Gateway` kind: an ingress listener of the agent's proxy workers on the hosts it names.

A Gateway takes connections from clients outside the mesh on a host address, terminates TLS
with the operator's certificates (one per set of host names, picked by SNI; the first is the
default when a client names none or names another), and serves the requests as the mesh does
(the Routes whose `hosts` list the request's host decide where each goes). It calls into the
mesh as its `service`: the CA issues that service's workload certificate to the gateway's
hosts, so mTLS to other hosts presents it and AuthorizationPolicy can name it.

The certificate and key files are read by the agent of each host that runs the gateway, not
here (they live on those hosts): a file it cannot read, or a key that does not match its
certificate, leaves that listener closed with the reason in the agent's log and status.

Pure: imports nothing of meshnode's but the resource base.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Literal

from meshnode.policy.resources import NAME_RE, NAME_RULE, Reference, _check_port
from meshnode.policy.spec import _Spec

__all__ = ["GatewayCertificate", "GatewayListener", "GatewaySpec", "gateway_references",
           "host_matches"]

# a host name a certificate serves: DNS labels, lowercase; "*." + name: any one label before it
_HOST_RE = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                      r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NODE_GLOB_RE = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,253}$")
MAX_LISTENERS = 64
MAX_CERTIFICATES = 256


class GatewayCertificate(_Spec, frozen=True):
    """A certificate chain (PEM: the leaf, then its issuers) and its key, for the `hosts`
    named (exact names, or "*.example.com": any one label before example.com)."""

    hosts: tuple[str, ...]
    cert_file: str
    key_file: str

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValueError("a certificate needs hosts: the names it serves "
                             "(e.g. [shop.example.com, '*.example.com'])")
        for h in self.hosts:
            if len(h) > 253 or not _HOST_RE.fullmatch(h):
                raise ValueError(f"host {h!r} is not a lowercase DNS name or '*.' + one "
                                 "(e.g. shop.example.com, *.example.com)")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError("a certificate lists a host twice")
        for what, path in (("certFile", self.cert_file), ("keyFile", self.key_file)):
            if not path.startswith("/") or "\0" in path:
                raise ValueError(f"{what} {path!r} must be an absolute path (read by the "
                                 "agent of each gateway host)")


class GatewayListener(_Spec, frozen=True):
    """An address:port of the gateway's hosts. `protocol`: https (TLS with `certificates`,
    HTTP/2 or HTTP/1.1 by ALPN) or http (plaintext HTTP/1.1, no certificates)."""

    address: str
    port: int
    protocol: Literal["https", "http"] = "https"
    certificates: tuple[GatewayCertificate, ...] = ()

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.address)
        except ValueError:
            raise ValueError(f"address {self.address!r} is not an IPv4 address (write the "
                             "host address to listen on, e.g. 198.18.1.10)") from None
        _check_port(self.port)
        where = f"listener {self.address}:{self.port}"
        if self.protocol == "https" and not self.certificates:
            raise ValueError(f"{where} is https: give at least one certificate "
                             "(hosts, certFile, keyFile)")
        if self.protocol == "http" and self.certificates:
            raise ValueError(f"{where} is plaintext http: remove its certificates, or make "
                             "it https")
        if len(self.certificates) > MAX_CERTIFICATES:
            raise ValueError(f"{where} has more than {MAX_CERTIFICATES} certificates")
        seen: set[str] = set()
        for c in self.certificates:
            for h in c.hosts:
                if h in seen:
                    raise ValueError(f"{where}: host {h} has two certificates: keep one")
                seen.add(h)


class GatewaySpec(_Spec, frozen=True):
    """An ingress gateway (the `Gateway` kind). `nodes`: glob patterns of the hosts that run
    it (required: a gateway listens on a host address). `service`: the Service whose
    identity it calls into the mesh with (AuthorizationPolicy names it). `listeners`: where
    it accepts clients."""

    nodes: tuple[str, ...]
    service: str
    listeners: tuple[GatewayListener, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("nodes is empty: name the hosts that run the gateway "
                             "(glob patterns, e.g. [edge-*])")
        for g in self.nodes:
            if not _NODE_GLOB_RE.fullmatch(g):
                raise ValueError(f"nodes: {g!r} is not a host name or glob pattern")
        if not NAME_RE.fullmatch(self.service):
            raise ValueError(f"service name {self.service!r} is invalid: use {NAME_RULE}")
        if not self.listeners:
            raise ValueError("listeners is empty: give at least one (address, port)")
        if len(self.listeners) > MAX_LISTENERS:
            raise ValueError(f"more than {MAX_LISTENERS} listeners")
        taken: dict[int, set[str]] = {}
        for li in self.listeners:
            on_port = taken.setdefault(li.port, set())
            if li.address in on_port or (on_port and "0.0.0.0" in (li.address, *on_port)):
                raise ValueError(f"two listeners on {li.address}:{li.port} (0.0.0.0 takes "
                                 "the port on every address): give each its own port")
            on_port.add(li.address)


def gateway_references(spec: GatewaySpec) -> Iterable[Reference]:
    yield Reference("Service", spec.service)


def host_matches(pattern: str, host: str) -> bool:
    """Whether a certificate's host `pattern` serves `host` (lowercase, no port): exact, or
    "*.b.c" for any single label before b.c (as TLS clients check a wildcard)."""
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == host
