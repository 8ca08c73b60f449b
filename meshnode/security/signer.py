"""The CA's decision on one CertificateRequest: issue, or refuse with the reason.

The rules (docs: /tmp/issue14/DESIGN.md, "CA"):
- the CSR is well formed, self-signed, names exactly the identity and host asked for, and the
  identity belongs to this trust domain;
- a revoked host gets nothing;
- a join (token_id set) gets only the host's own node identity, with an unexpired token bound
  to it (if bound), a correct HMAC of the CSR, and unused (or used by this host for this very
  CSR: a retry);
- anything else is authenticated by the host's current node certificate: node_chain verifies
  against the CA's roots now, is that host's node identity, and its key signed the CSR. Then a
  node identity is a renewal; a service identity X is issued only if the host's own report
  lists X as enrolled there (registry.hosts()[node]["enrolled"]), the Service X exists, and
  its identity.nodes globs, if any, match the host (a compromised host cannot mint the
  identities of services it does not run).

`decide` never raises for a bad request: the answer carries the reason. Pure but for the
CA's own files (tokens used up, leaves recorded).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from meshnode.errors import MeshnodeError, TrustError
from meshnode.policy.identity import CertificateRequestSpec, CertificateSpec, node_id, parse_id
from meshnode.policy.resources import Resource
from meshnode.security import certs
from meshnode.security.ca import CertificateAuthority


def decide(req: CertificateRequestSpec, ca: CertificateAuthority,
           hosts: Mapping[str, Mapping[str, Any]], resources: Mapping[tuple[str, str], Resource],
           now: float) -> CertificateSpec:
    """The Certificate answering `req`: the chain, or `error` saying why not."""
    digest = ""
    try:
        digest = certs.csr_sha256(req.csr)
        chain = _issue(req, ca, hosts, resources, now)
    except MeshnodeError as exc:
        return CertificateSpec(req.node, req.identity, digest, error=exc.message)
    leaf = certs.load_cert(chain[0])
    return CertificateSpec(req.node, req.identity, digest, tuple(chain), certs.not_after(leaf))


def _issue(req: CertificateRequestSpec, ca: CertificateAuthority,
           hosts: Mapping[str, Mapping[str, Any]], resources: Mapping[tuple[str, str], Resource],
           now: float) -> list[str]:
    csr, san, ou = certs.verify_csr(req.csr)
    if san != req.identity:
        raise TrustError(f"the CSR names {san}, the request {req.identity}", "")
    if ou != req.node:
        raise TrustError(f"the CSR is for host {ou!r}, the request for {req.node!r}", "")
    try:
        td, kind, name = parse_id(req.identity)
    except ValueError as exc:
        raise TrustError(str(exc), "") from None
    if td != ca.trust_domain:
        raise TrustError(f"{req.identity} is outside trust domain {ca.trust_domain}", "")
    if req.node in ca.revoked:
        raise TrustError(f"host {req.node} is revoked", "")
    der = certs.csr_der(req.csr)
    if req.token_id:
        if kind != "node" or name != req.node:
            raise TrustError("a join token is only good for the host's own node identity "
                             f"({node_id(td, req.node)})", "")
        token = ca.tokens.check(req.token_id, req.token_mac, der, req.node, now)
        # A token names no host unless bound: it must not take over one that exists (a
        # leaked token would otherwise become h1, and h1's peers would dial it).
        taken = any(r["node"] == req.node and r["kind"] == "node" and r["not_after"] > now
                    for r in ca.issued())
        if taken and token.used_by != req.node and not token.node:
            raise TrustError(f"host {req.node} already holds a node certificate: a join token "
                             "may not take its name", "")
        chain = ca.issue(csr, req.identity, req.node, now)
        ca.tokens.redeem(token, req.node, der, now)
        return chain
    if not req.node_chain or not req.node_signature:
        raise TrustError("the request is not authenticated (no join token, no node "
                         "certificate)", "")
    try:
        node_leaf = certs.verify_chain(req.node_chain, ca.root_pems(), now)
    except TrustError as exc:
        raise TrustError(f"the node certificate is not valid: {exc.message}", "") from None
    if certs.identity_of(node_leaf) != node_id(td, req.node) or \
            certs.node_of(node_leaf) != req.node:
        raise TrustError(f"the request is signed by {certs.identity_of(node_leaf)}, not by "
                         f"host {req.node}", "")
    try:
        certs.verify_signature(node_leaf, der, req.node_signature)
    except TrustError:
        raise TrustError("the node signature over the CSR does not verify", "") from None
    if kind == "node":
        if name != req.node:
            raise TrustError(f"host {req.node} cannot have the node identity of {name}", "")
        return ca.issue(csr, req.identity, req.node, now)
    enrolled = (hosts.get(req.node) or {}).get("enrolled") or []
    if name not in enrolled:
        raise TrustError(f"service {name} is not enrolled on host {req.node} (its report "
                         "lists " + (", ".join(sorted(map(str, enrolled))) or "none") + ")", "")
    service = resources.get(("Service", name))
    if service is None:
        raise TrustError(f"no Service {name}", "")
    globs = service.spec.identity.nodes
    if globs and not any(fnmatch.fnmatchcase(req.node, g) for g in globs):
        raise TrustError(f"Service {name} may run only on hosts {', '.join(globs)}, not on "
                         f"{req.node}", "")
    return ca.issue(csr, req.identity, req.node, now)
