"""Test certificates for the mTLS data path, made with `cryptography` (no CA code of meshnode's).

A root for trust domain `td`, and leaves shaped like the mesh CA's (DESIGN "Identities"): EC
P-256, exactly one SPIFFE URI SAN, subject OU=<node>, CN=<service> or node/<node>. Each leaf is
written as one PEM file holding the certificate then its key (what wire.Identities points at),
plus odd ones for the bad-input tests: expired, not yet valid, another trust domain (same
root, so only the SPIFFE check refuses it), and one from a root nobody trusts.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Pki", "foreign_pair", "make_pki", "web_certs"]

DAY = dt.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, ou: str = "") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshnode")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class _Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _root(td: str) -> _Ca:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    name = _name(f"meshnode root {td}")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return _Ca(key, cert)


def _leaf(ca: _Ca, uri: str, cn: str, ou: str, not_before: dt.datetime,
          not_after: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (x509.CertificateBuilder().subject_name(_name(cn, ou))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    return cert, key


@dataclass
class Pki:
    """Files under `dir`: `bundle` (the root), and leaves by name (cert + key in one PEM)."""

    dir: Path
    td: str
    bundle: Path
    _ca: _Ca
    leaves: dict[str, Path] = field(default_factory=dict)

    def node(self, node: str, **kw: float) -> Path:
        return self.leaf(f"node-{node}", f"spiffe://{self.td}/node/{node}", f"node/{node}",
                         node, **kw)

    def service(self, service: str, node: str, **kw: float) -> Path:
        return self.leaf(f"svc-{service}-{node}", f"spiffe://{self.td}/svc/{service}", service,
                         node, **kw)

    def leaf(self, name: str, uri: str, cn: str, ou: str, start_days: float = -1,
             end_days: float = 1, ca: _Ca | None = None) -> Path:
        """A leaf valid from now + start_days to now + end_days (days)."""
        now = dt.datetime.now(dt.UTC)
        cert, key = _leaf(ca or self._ca, uri, cn, ou, now + start_days * DAY,
                          now + end_days * DAY)
        path = self.dir / f"{name}.pem"
        path.write_bytes(_pem(cert) + _key_pem(key))
        path.chmod(0o600)
        self.leaves[name] = path
        return path

    def foreign(self, name: str, uri: str, ou: str) -> Path:
        """A leaf shaped right but signed by a root that `bundle` does not hold."""
        return self.leaf(name, uri, uri.rsplit("/", 1)[-1], ou, ca=_root("elsewhere.test"))


def make_pki(directory: Path, td: str = "mesh.test") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _root(td)
    bundle = directory / "bundle.pem"
    bundle.write_bytes(_pem(ca.cert))
    return Pki(directory, td, bundle, ca)


def foreign_pair(directory: Path, uri: str = "spiffe://mesh/svc/client",
                 ou: str = "intruder") -> tuple[Path, Path]:
    """A certificate and key in two files (what a stranger's TLS client loads): shaped like a
    mesh identity, signed by a root of its own that no bundle holds."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = _leaf(_root("elsewhere.test"), uri, uri.rsplit("/", 1)[-1], ou,
                      dt.datetime.now(dt.UTC) - DAY, dt.datetime.now(dt.UTC) + DAY)
    cert_path, key_path = directory / "foreign.pem", directory / "foreign.key"
    cert_path.write_bytes(_pem(cert))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path


def web_certs(directory: Path,
              sites: dict[str, list[str]]) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """Server certificates as an operator brings them to a gateway: a root of their own
    (`ca.pem`, what a client is told to trust), and per site a leaf for its DNS names, the
    chain and the key in two files: (root path, {site: (cert path, key path)})."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _root("web.test")
    root = directory / "ca.pem"
    root.write_bytes(_pem(ca.cert))
    now = dt.datetime.now(dt.UTC)
    out = {}
    for site, hosts in sites.items():
        key = _key()
        cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
                .issuer_name(ca.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - DAY).not_valid_after(now + 30 * DAY)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca.key, hashes.SHA256()))
        cert_path, key_path = directory / f"{site}.pem", directory / f"{site}.key"
        cert_path.write_bytes(_pem(cert) + _pem(ca.cert))
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        out[site] = (cert_path, key_path)
    return root, out
