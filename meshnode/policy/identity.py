"""Workload and node identities, and the resource kinds that carry the CA's traffic.

SPIFFE IDs: a service is `spiffe://<trust domain>/svc/<name>`, a host (its agent) is
`spiffe://<trust domain>/node/<name>`. A workload certificate also names the host it was
issued to (subject OU), so revoking a host revokes everything it was given.

The CA talks to agents through the registry, as resources every agent already follows, so it
needs no listener of its own and works the same on the embedded store and on etcd:
- `TrustBundle` (one, named `mesh`): the trust anchors, the issuing chain and the revoked
  hosts, signed by the issuer. The registry is a transport, not trusted: an agent takes a
  bundle only if its signature verifies against roots it already trusts (pinned at join) and
  its serial is newer than the one it holds.
- `CertificateRequest` (one per host and identity): a CSR, authenticated by a join token's MAC
  (a new host) or by a signature of the host's current node key (renewals, workload identities).
- `Certificate` (same name as its request): what the CA issued for it, or why it refused.

Pure: imports nothing of meshnode's but the resource base and errors.
"""

from __future__ import annotations

import hashlib
import re

from meshnode.errors import UsageError
from meshnode.policy.spec import _Spec

__all__ = [
    "BUNDLE_NAME",
    "CertificateRequestSpec",
    "CertificateSpec",
    "TrustBundleSpec",
    "node_id",
    "parse_id",
    "request_name",
    "service_id",
]

BUNDLE_NAME = "mesh"  # the one TrustBundle resource's name
TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")


def check_trust_domain(td: str) -> str:
    if not TRUST_DOMAIN_RE.fullmatch(td):
        raise UsageError(f"invalid trust domain {td!r}",
                         "use lowercase letters, digits, '.' and '-' (e.g. mesh.example.org)")
    return td


def service_id(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/svc/{service}"


def node_id(trust_domain: str, node: str) -> str:
    return f"spiffe://{trust_domain}/node/{node}"


def parse_id(spiffe: str) -> tuple[str, str, str]:
    """(trust domain, "svc" | "node", name) of a meshnode SPIFFE ID; ValueError otherwise."""
    m = re.fullmatch(r"spiffe://([^/]+)/(svc|node)/([A-Za-z0-9._-]+)", spiffe)
    if m is None:
        raise ValueError(f"{spiffe!r} is not a meshnode SPIFFE ID")
    return m.group(1), m.group(2), m.group(3)


def request_name(node: str, identity: str) -> str:
    """The resource name of a host's request for an identity (a DNS label, stable)."""
    return "csr-" + hashlib.sha256(f"{node}\0{identity}".encode()).hexdigest()[:24]


class TrustBundleSpec(_Spec, frozen=True):
    """What every agent trusts and who is revoked; `signature` (base64) is the issuer key's
    over the canonical JSON of every other field (meshnode.security.bundle)."""

    trust_domain: str
    roots: tuple[str, ...]  # PEM trust anchors; two during a root rotation
    issuer_chain: tuple[str, ...]  # PEM: the issuing CA certificate, then up to a root
    revoked_nodes: tuple[str, ...] = ()
    serial: int = 0  # grows with every change: an agent refuses one older than it holds
    signature: str = ""


class CertificateRequestSpec(_Spec, frozen=True):
    node: str
    identity: str  # the SPIFFE ID asked for
    csr: str  # PEM
    token_id: str = ""  # a join: the token's id, and HMAC-SHA256(secret, CSR DER) in hex
    token_mac: str = ""
    node_chain: tuple[str, ...] = ()  # otherwise: the host's current node certificate chain
    node_signature: str = ""  # base64, by the node key over the CSR DER
    created: float = 0.0  # wall clock, seconds


class CertificateSpec(_Spec, frozen=True):
    node: str
    identity: str
    csr_sha256: str  # which request this answers (hex of the CSR DER's digest)
    chain: tuple[str, ...] = ()  # PEM: the leaf, then its issuers
    not_after: float = 0.0
    error: str = ""  # refused: why (then chain is empty)
