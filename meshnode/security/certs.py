"""X.509 for the mesh, on `cryptography`: keys, CSRs, certificates, chains, signatures.

Keys are EC P-256 (a full mTLS handshake costs a third of RSA-2048's). Every mesh leaf has
exactly one URI SAN (its SPIFFE ID) and names the host it was issued to in its subject
(OU=<node>; CN=<service> or node/<node>), so a revoked host's certificates are recognised by
OU alone. Chain verification is written out here (cryptography 38 has no path validation):
each certificate signed by the next, the last one by a trusted root, every one valid at the
given time, issuers CA with keyCertSign, the leaf not a CA. Times are seconds since the epoch.

Every failure is a TrustError whose message says what is wrong. Pure: imports nothing of
meshnode's but errors.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshnode.errors import TrustError

__all__ = [
    "Key", "ca_cert", "cert_pem", "csr_der", "csr_sha256", "fingerprint", "fp16",
    "identity_of", "issue_leaf", "key_matches", "key_pem", "load_any_key", "load_cert",
    "load_chain", "load_csr", "load_key", "make_csr", "make_key", "node_of", "not_after",
    "not_after_pem", "not_before", "sign", "split_pem", "subject_of",
    "verify_ca_chain", "verify_chain", "verify_csr", "verify_signature",
]

Key = ec.EllipticCurvePrivateKey
SKEW = 300.0  # seconds a leaf's notBefore is backdated: hosts' clocks differ a little


def make_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def load_key(pem: str | bytes) -> Key:
    """An EC private key from PEM (an operator's RSA root key is read by load_any_key)."""
    key = load_any_key(pem)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError("the key is not an EC key", "meshnode keys are EC P-256")
    return key


def load_any_key(pem: str | bytes) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"not a PEM private key: {exc}".splitlines()[0],
                         "give an unencrypted PEM key (openssl pkey -in KEY -out PLAIN)"
                         ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TrustError(f"unsupported key type {type(key).__name__}", "use an EC or RSA key")
    return key


def _name(node: str, cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, node),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cn_for(identity: str, node: str) -> str:
    kind, _, name = identity.rpartition("/")
    return f"node/{node}" if kind.endswith("/node") else name


def make_csr(key: Key, identity: str, node: str) -> str:
    """A CSR (PEM) for `identity` (a SPIFFE ID) held by host `node`."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(_name(node, _cn_for(identity, node)))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(pem.encode())
    except (ValueError, TypeError) as exc:
        raise TrustError(f"the CSR does not parse: {exc}".splitlines()[0],
                         "send a PEM certificate signing request") from None


def csr_der(pem: str) -> bytes:
    return load_csr(pem).public_bytes(serialization.Encoding.DER)


def csr_sha256(pem: str) -> str:
    """The hex digest of the CSR's DER: what a Certificate says it answers."""
    return hashlib.sha256(csr_der(pem)).hexdigest()


def verify_csr(pem: str) -> tuple[x509.CertificateSigningRequest, str, str]:
    """(the CSR, its one URI SAN, its subject OU), once its self-signature is checked."""
    csr = load_csr(pem)
    if not csr.is_signature_valid:
        raise TrustError("the CSR's signature does not verify", "send the CSR unchanged")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise TrustError("the CSR's key is not an EC key", "meshnode keys are EC P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TrustError("the CSR has no SPIFFE ID (URI SAN)",
                         "build it with make_csr") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san)) != 1:
        raise TrustError("the CSR must have exactly one SAN, a SPIFFE URI",
                         "build it with make_csr")
    return csr, uris[0], _ou(csr.subject)


def _ou(name: x509.Name) -> str:
    ous = name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(ous[0].value) if len(ous) == 1 else ""


def load_cert(pem: str | bytes) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"not a PEM certificate: {exc}".splitlines()[0],
                         "give a PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def load_chain(pems: Iterable[str]) -> list[x509.Certificate]:
    """Certificates from PEM strings; a string may hold several (a bundle file)."""
    out: list[x509.Certificate] = []
    for pem in pems:
        for block in pem.split("-----END CERTIFICATE-----"):
            if "-----BEGIN CERTIFICATE-----" in block:
                out.append(load_cert(block.strip() + "\n-----END CERTIFICATE-----\n"))
    return out


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _cert(cert: x509.Certificate | str) -> x509.Certificate:
    return load_cert(cert) if isinstance(cert, str) else cert


def fingerprint(cert: x509.Certificate | str) -> str:
    """Hex SHA-256 of the certificate's DER (a certificate or its PEM)."""
    return hashlib.sha256(_cert(cert).public_bytes(serialization.Encoding.DER)).hexdigest()


def fp16(cert: x509.Certificate | str) -> str:
    """The short fingerprint join tokens and the CLI use (16 hex digits)."""
    return fingerprint(cert)[:16]


def split_pem(text: str) -> tuple[str, ...]:
    """The certificates of a PEM file (a chain, maybe with a key: the key is skipped), each
    as its own PEM string, in file order."""
    return tuple(cert_pem(c) for c in load_chain([text]))


def subject_of(cert: x509.Certificate | str) -> str:
    """A short name for a certificate: its SPIFFE ID (a leaf) or its CN (a CA)."""
    return _label(_cert(cert))


def not_after_pem(pem: str) -> float:
    return not_after(load_cert(pem))


def key_matches(cert: x509.Certificate | str, key_pem: str) -> bool:
    """Whether `key_pem` is the private key of the certificate's public key."""
    try:
        key = load_any_key(key_pem)
    except TrustError:
        return False
    def spki(pub: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | object) -> bytes:
        if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            return b"?"
        return pub.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)

    return spki(key.public_key()) == spki(_cert(cert).public_key())


def identity_of(cert: x509.Certificate | str) -> str:
    """The certificate's SPIFFE ID: its one URI SAN."""
    cert = _cert(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TrustError("the certificate has no SPIFFE ID (URI SAN)",
                         "it was not issued by the mesh CA") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise TrustError(f"the certificate has {len(uris)} URI SANs, not one",
                         "it was not issued by the mesh CA")
    return str(uris[0])


def node_of(cert: x509.Certificate | str) -> str:
    """The host a mesh leaf was issued to (subject OU); "" when it names none."""
    return _ou(_cert(cert).subject)


def _ts(d: dt.datetime) -> float:
    return d.replace(tzinfo=dt.UTC).timestamp()  # cryptography 38: naive UTC


def _dt(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC).replace(tzinfo=None)


def not_after(cert: x509.Certificate) -> float:
    return _ts(cert.not_valid_after)


def not_before(cert: x509.Certificate) -> float:
    return _ts(cert.not_valid_before)


def _serial() -> int:
    return secrets.randbits(127) | 1 << 126  # positive, 16 bytes, never 0


def _ski(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
         ) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def ca_cert(key: Key, subject: str, trust_domain: str, lifetime: float, now: float,
            issuer: x509.Certificate | None = None,
            issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
            ) -> x509.Certificate:
    """A CA certificate for `key`: self-signed (a root) or signed by `issuer` (an
    intermediate under it). Its URI SAN is the trust domain (spiffe://TD), as SPIFFE does."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer = key if issuer_key is None else issuer_key
    b = (x509.CertificateBuilder()
         .subject_name(name)
         .issuer_name(name if issuer is None else issuer.subject)
         .public_key(key.public_key())
         .serial_number(_serial())
         .not_valid_before(_dt(now - SKEW))
         .not_valid_after(_dt(now + lifetime))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None
                                              else 0), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                      False), critical=True)
         .add_extension(x509.SubjectAlternativeName(
             [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
         .add_extension(_ski(key.public_key()), critical=False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()), critical=False)  # type: ignore[arg-type]
    return b.sign(signer, hashes.SHA256())


def issue_leaf(csr: x509.CertificateSigningRequest, identity: str, node: str,
               issuer: x509.Certificate, issuer_key: Key, lifetime: float,
               now: float) -> x509.Certificate:
    """A mesh leaf for the CSR's key: `identity` as its one URI SAN, OU=`node`, client and
    server auth, ending at `now + lifetime` but never after its issuer."""
    end = min(now + lifetime, not_after(issuer))
    b = (x509.CertificateBuilder()
         .subject_name(_name(node, _cn_for(identity, node)))
         .issuer_name(issuer.subject)
         .public_key(csr.public_key())
         .serial_number(_serial())
         .not_valid_before(_dt(now - SKEW))
         .not_valid_after(_dt(end))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False,
                                      False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                        critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer_key.public_key()), critical=False))
    return b.sign(issuer_key, hashes.SHA256())


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    pub = issuer.public_key()
    algo = cert.signature_hash_algorithm
    if algo is None:
        return False
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algo))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algo)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(ku.key_cert_sign)


def _check_time(cert: x509.Certificate, at: float, what: str) -> None:
    if at < not_before(cert):
        raise TrustError(f"{what} is not valid yet (from {_iso(not_before(cert))})",
                         "check the clocks of both hosts")
    if at > not_after(cert):
        raise TrustError(f"{what} expired at {_iso(not_after(cert))}",
                         "renew it (the agent renews leaves at half-life); see meshnode ca "
                         "status")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_chain(chain_pems: Sequence[str], root_pems: Iterable[str],
                 at: float) -> x509.Certificate:
    """The leaf of `chain_pems` (leaf first, then its issuers) once the chain is checked up to
    one of `root_pems` at time `at`; TrustError saying what is wrong otherwise. A root given
    in the chain itself is checked against the trusted ones, never trusted for being there."""
    chain = load_chain(chain_pems)
    if chain and _is_ca(chain[0]):
        raise TrustError("the leaf is a CA certificate", "present a mesh leaf")
    return _verify_path(chain, load_chain(root_pems), at)


def verify_ca_chain(chain_pems: Sequence[str], root_pems: Iterable[str],
                    at: float) -> x509.Certificate:
    """The issuing CA certificate chain_pems[0] (a trusted root itself, or chaining to one)."""
    chain = load_chain(chain_pems)
    roots = load_chain(root_pems)
    if chain and not _is_ca(chain[0]):
        raise TrustError(f"{_label(chain[0])} is not a CA certificate", "give the issuing CA")
    if chain and fingerprint(chain[0]) in {fingerprint(r) for r in roots}:
        _check_time(chain[0], at, f"the root {_label(chain[0])}")
        return chain[0]
    return _verify_path(chain, roots, at)


def _verify_path(chain: list[x509.Certificate], roots: list[x509.Certificate],
                 at: float) -> x509.Certificate:
    if not chain:
        raise TrustError("no certificate presented", "present the leaf and its issuers")
    if not roots:
        raise TrustError("no trusted roots", "the trust bundle has no roots")
    root_fps = {fingerprint(r) for r in roots}
    leaf = chain[0]
    what = f"the certificate of {_label(leaf)}"
    _check_time(leaf, at, what)
    current = leaf
    for depth, nxt in enumerate(chain[1:], start=1):
        if fingerprint(nxt) in root_fps:
            break
        if not _signed_by(current, nxt):
            raise TrustError(f"{_label(current)} is not signed by the next certificate in its "
                             "chain", "present the chain in order: leaf, then its issuers")
        if not _is_ca(nxt):
            raise TrustError(f"{_label(nxt)} is not a CA but signs {_label(current)}",
                             "present the issuing CA's certificate")
        _check_time(nxt, at, f"the issuing CA {_label(nxt)}")
        if depth > 4:
            raise TrustError("the chain is too long", "present at most leaf, issuer, root")
        current = nxt
    for root in roots:
        if _is_ca(root) and _signed_by(current, root):
            _check_time(root, at, f"the root {_label(root)}")
            return leaf
    raise TrustError(f"{what} does not chain to a trusted root",
                     "it comes from another CA or trust domain, or its root was removed "
                     "(see meshnode ca status)")


def _label(cert: x509.Certificate) -> str:
    try:
        return identity_of(cert) if not _is_ca(cert) else _cn(cert)
    except TrustError:
        return _cn(cert)


def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def sign(key: Key, data: bytes) -> str:
    """Base64 of the key's ECDSA-SHA256 signature over `data`."""
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def verify_signature(cert: x509.Certificate, data: bytes, signature_b64: str) -> None:
    """TrustError unless `signature_b64` is the certificate key's signature over `data`."""
    pub = cert.public_key()
    try:
        sig = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        raise TrustError("the signature is not base64", "send it as sign() makes it") from None
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise TrustError("unsupported key type", "use an EC key")
    except InvalidSignature:
        raise TrustError(f"the signature does not verify with the key of {_label(cert)}",
                         "sign with the key the certificate was issued for") from None
