"""The signed trust bundle: what every agent trusts and which hosts are revoked.

The registry carries the bundle but is not trusted: the CA signs the canonical JSON of every
field but `signature` with its issuing key (ECDSA-SHA256), and an agent takes a bundle only
if (1) the issuing chain in it verifies against roots the agent already trusts (pinned at
join, then the previous bundle's), (2) the signature verifies with the issuing certificate's
key, and (3) its serial is not lower than the one the agent holds (no rollback to a bundle
that did not yet revoke a host). A root rotation therefore publishes the new root in a bundle
signed by the old issuer first, and only then signs with the new one (meshnode.security.ca).

Pure: imports nothing of meshnode's but the identity kinds, certs and errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import msgspec

from meshnode.errors import TrustError
from meshnode.policy.identity import TrustBundleSpec
from meshnode.security import certs


def canonical(spec: TrustBundleSpec) -> bytes:
    """Every field but the signature, defaults included, as sorted compact JSON."""
    fields = {name: msgspec.to_builtins(getattr(spec, name))
              for name in spec.__struct_fields__ if name != "signature"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign(spec: TrustBundleSpec, issuer_key: certs.Key) -> TrustBundleSpec:
    return msgspec.structs.replace(spec, signature=certs.sign(issuer_key, canonical(spec)))


def verify(spec: TrustBundleSpec, trusted_root_pems: Iterable[str], min_serial: int,
           at: float | None = None) -> None:
    """TrustError unless the bundle is signed by an issuer chaining to `trusted_root_pems`
    (at time `at`, default now) and its serial is at least `min_serial` (pass the serial of
    the bundle held: an equal one is the same bundle read again)."""
    from meshnode.security import clock

    if spec.serial < min_serial:
        raise TrustError(f"trust bundle serial {spec.serial} is older than the one held "
                         f"({min_serial}): refused (a rollback)",
                         "the registry holds a stale bundle; the CA host republishes it")
    if not spec.signature:
        raise TrustError("the trust bundle is not signed", "the CA host publishes it signed")
    if not spec.issuer_chain:
        raise TrustError("the trust bundle has no issuer chain", "the CA host republishes it")
    issuer = certs.load_chain(spec.issuer_chain[:1])[0]
    when = clock.now() if at is None else at
    _verify_issuer(list(spec.issuer_chain), list(trusted_root_pems), when)
    if certs.identity_of(issuer) != f"spiffe://{spec.trust_domain}":
        raise TrustError(f"the trust bundle names trust domain {spec.trust_domain}, its issuer "
                         f"{certs.identity_of(issuer)}: refused", "the CA host republishes it")
    try:
        certs.verify_signature(issuer, canonical(spec), spec.signature)
    except TrustError:
        raise TrustError("the trust bundle's signature does not verify: refused",
                         "someone other than the CA wrote it, or it was altered") from None


def _verify_issuer(chain: list[str], roots: list[str], at: float) -> None:
    try:
        certs.verify_ca_chain(chain, roots, at)
    except TrustError as exc:
        raise TrustError(f"the trust bundle's issuer is not trusted: {exc.message}",
                         "the agent trusts other roots (another mesh, or a root rotation it "
                         "missed: join again with a new token)") from None
