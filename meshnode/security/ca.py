"""The mesh CA's directory and what it does with it: roots, the issuing key, revocations.

`<agent state dir>/ca/` (0700; every file 0600, replaced atomically), never in the registry:
- `ca.json`: trust domain, leaf TTL, the active authority, the bundle serial, the
  revoked hosts;
- per authority (a trust anchor, named by its root's short fingerprint FP): `root-FP.pem`,
  and when it can issue, `issuer-FP.pem` + `issuer-FP.key`. A self-signed authority issues
  with its root's own key (the issuer is the root); an operator's authority is an
  intermediate under the operator's root, whose key is used once to sign it and never kept;
- `tokens.json` (meshnode.security.tokens), `issued.json` (the newest leaf per host and
  identity: what `ca status`, `doctor` and `ca root remove` look at).

Root rotation by overlapping anchors: `add_root` (trusted, published, not issuing), then
`activate` (issue from it: agents renew leaves that do not chain to the active issuer), then
`remove_root` (refused while unexpired leaves still chain to it, unless forced). Every change
of what the bundle says bumps its serial.

Imports nothing of meshnode's but the security modules, the identity kinds, errors and the
state-file writer.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from meshnode.errors import ConflictError, NotFoundError, TrustError, UsageError
from meshnode.host.statefile import write_atomic, write_json
from meshnode.policy.identity import TrustBundleSpec, check_trust_domain, parse_id
from meshnode.security import bundle, certs
from meshnode.security.tokens import TokenStore

DAY = 86_400.0
ROOT_TTL = 10 * 365 * DAY
ISSUER_TTL = 365 * DAY  # an intermediate under an operator's root
LEAF_TTL = DAY
CA_HINT = "create one on this host: meshnode ca init --trust-domain DOMAIN"


@dataclass(frozen=True)
class Authority:
    """A trust anchor, and the CA that issues under it when this CA can."""

    fp: str  # 16 hex digits of the root's fingerprint
    root: x509.Certificate
    issuer: x509.Certificate | None  # the root itself (self-signed) or an intermediate
    key: certs.Key | None

    @property
    def chain(self) -> list[str]:
        """The issuing chain as published: the issuer, then the root when they differ."""
        if self.issuer is None:
            return []
        out = [certs.cert_pem(self.issuer)]
        if certs.fingerprint(self.issuer) != certs.fingerprint(self.root):
            out.append(certs.cert_pem(self.root))
        return out


class CertificateAuthority:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.tokens = TokenStore(directory / "tokens.json")
        self.settings: dict[str, Any] = {}
        self.authorities: dict[str, Authority] = {}

    # -- creating and opening ---------------------------------------------------------------
    @classmethod
    def exists(cls, directory: Path) -> bool:
        return (directory / "ca.json").exists()

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        if not cls.exists(directory):
            raise NotFoundError(f"no mesh CA in {directory}", CA_HINT)
        ca = cls(directory)
        ca._load()
        return ca

    @classmethod
    def init(cls, directory: Path, trust_domain: str, now: float, *,
             root_cert_pem: str = "", root_key_pem: str = "", leaf_ttl: float = LEAF_TTL,
             root_ttl: float = ROOT_TTL, issuer_ttl: float = ISSUER_TTL
             ) -> CertificateAuthority:
        """A new CA: a self-signed root, or (both PEMs given) an intermediate under the
        operator's root. ConflictError when one exists already."""
        check_trust_domain(trust_domain)
        if cls.exists(directory):
            raise ConflictError(f"a mesh CA already exists in {directory}",
                                "see it with: meshnode ca status; rotate roots with: "
                                "meshnode ca root add")
        if not 3600 <= leaf_ttl <= 30 * DAY:
            raise UsageError(f"leaf TTL {leaf_ttl:g} s is out of range",
                             "use between 1h and 30d (default 24h)")
        ca = cls(directory)
        ca.settings = {"format": 1, "trust_domain": trust_domain, "leaf_ttl": leaf_ttl,
                       "active": "", "bundle_serial": 1, "revoked": []}
        ca._make_dir()
        auth = ca._new_authority(now, root_cert_pem, root_key_pem, root_ttl, issuer_ttl)
        ca.settings["active"] = auth.fp
        ca._save()
        return ca

    def _make_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def _load(self) -> None:
        try:
            self.settings = json.loads((self.dir / "ca.json").read_text())
            for root_file in sorted(self.dir.glob("root-*.pem")):
                fp = root_file.stem.removeprefix("root-")
                root = certs.load_cert(root_file.read_bytes())
                issuer_file, key_file = self.dir / f"issuer-{fp}.pem", self.dir / f"issuer-{fp}.key"
                issuer = certs.load_cert(issuer_file.read_bytes()) if issuer_file.exists() \
                    else None
                key = certs.load_key(key_file.read_bytes()) if key_file.exists() else None
                self.authorities[fp] = Authority(fp, root, issuer, key)
        except (OSError, ValueError, TrustError) as exc:
            raise TrustError(f"the CA directory {self.dir} is damaged: {exc}",
                             "restore it from a backup") from exc
        if self.settings.get("active") not in self.authorities:
            raise TrustError(f"the CA directory {self.dir} has no active authority",
                             "restore it from a backup")

    def _save(self) -> None:
        write_json(self.dir / "ca.json", self.settings)

    # -- authorities --------------------------------------------------------------------------
    def _new_authority(self, now: float, root_cert_pem: str, root_key_pem: str,
                       root_ttl: float, issuer_ttl: float) -> Authority:
        td = self.trust_domain
        if bool(root_cert_pem) != bool(root_key_pem):
            raise UsageError("--root-cert and --root-key go together",
                             "give both (an intermediate is made under that root), or neither "
                             "(a new self-signed root)")
        key = certs.make_key()
        if not root_cert_pem:
            root = certs.ca_cert(key, f"meshnode root {td}", td, root_ttl, now)
            issuer = root
        else:
            root = certs.load_cert(root_cert_pem)
            root_key = certs.load_any_key(root_key_pem)
            if not certs.key_matches(root, root_key_pem):
                raise UsageError("the root key does not belong to the root certificate",
                                 "give the key of the certificate passed with --root-cert")
            try:
                certs.verify_ca_chain([certs.cert_pem(root)], [certs.cert_pem(root)], now)
            except TrustError as exc:
                raise UsageError(f"the operator root cannot be used: {exc.message}",
                                 "give a valid CA certificate (basicConstraints CA:TRUE)"
                                 ) from None
            life = min(issuer_ttl, certs.not_after(root) - now)
            if life < 2 * self.leaf_ttl:
                raise UsageError("the operator root expires too soon to issue from",
                                 "renew the root in your PKI first")
            issuer = certs.ca_cert(key, f"meshnode issuer {td}", td, life, now, root, root_key)
        fp = certs.fp16(root)
        if fp in self.authorities:
            raise ConflictError(f"root {fp} is already trusted", "see meshnode ca status")
        self._make_dir()
        write_atomic(self.dir / f"issuer-{fp}.key", certs.key_pem(key).encode())
        write_atomic(self.dir / f"issuer-{fp}.pem", certs.cert_pem(issuer).encode())
        write_atomic(self.dir / f"root-{fp}.pem", certs.cert_pem(root).encode())
        auth = self.authorities[fp] = Authority(fp, root, issuer, key)
        return auth

    def find(self, fp: str) -> Authority:
        """The authority whose root fingerprint starts with `fp` (8 hex digits or more)."""
        want = fp.strip().lower()
        matches = [a for a in self.authorities.values()
                   if len(want) >= 8 and certs.fingerprint(a.root).startswith(want)]
        if len(matches) != 1:
            known = ", ".join(sorted(self.authorities)) or "none"
            what = "matches several roots" if matches else "is not a root of this CA"
            raise UsageError(f"root fingerprint {fp!r} {what}",
                             f"use one of {known}; see meshnode ca status")
        return matches[0]

    def add_root(self, now: float, root_cert_pem: str = "", root_key_pem: str = "") -> str:
        """Trust a new root (published in the bundle at once) without issuing from it."""
        auth = self._new_authority(now, root_cert_pem, root_key_pem, ROOT_TTL, ISSUER_TTL)
        self._bump()
        return auth.fp

    def activate(self, fp: str) -> str:
        auth = self.find(fp)
        if auth.key is None or auth.issuer is None:
            raise UsageError(f"root {auth.fp} has no issuing key here", "activate another root")
        if auth.fp != self.settings["active"]:
            self.settings["active"] = auth.fp
            self._bump()
        return auth.fp

    def remove_root(self, fp: str, now: float, force: bool = False) -> str:
        auth = self.find(fp)
        if auth.fp == self.settings["active"]:
            raise UsageError(f"root {auth.fp} is the active one",
                             "activate another first: meshnode ca root activate FP")
        # a revoked host's leaves are refused anyway: they do not hold the root up
        live = [r for r in self.issued() if r["root"] == auth.fp and r["not_after"] > now
                and r["node"] not in self.revoked]
        if live and not force:
            raise ConflictError(
                f"{len(live)} unexpired certificates still chain to root {auth.fp}",
                "wait until agents renewed them from the active root (meshnode ca status), "
                "or pass --force")
        for name in (f"root-{auth.fp}.pem", f"issuer-{auth.fp}.pem", f"issuer-{auth.fp}.key"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
        del self.authorities[auth.fp]
        self._bump()
        return auth.fp

    # -- what the CA says -------------------------------------------------------------------
    @property
    def trust_domain(self) -> str:
        return str(self.settings["trust_domain"])

    @property
    def leaf_ttl(self) -> float:
        return float(self.settings.get("leaf_ttl", LEAF_TTL))

    @property
    def active(self) -> Authority:
        return self.authorities[self.settings["active"]]

    @property
    def serial(self) -> int:
        return int(self.settings.get("bundle_serial", 1))

    def root_pems(self) -> list[str]:
        return [certs.cert_pem(a.root) for _, a in sorted(self.authorities.items())]

    @property
    def revoked(self) -> tuple[str, ...]:
        return tuple(sorted(self.settings.get("revoked", [])))

    def _bump(self) -> None:
        self.settings["bundle_serial"] = self.serial + 1
        self._save()

    def raise_serial(self, above: int) -> None:
        """The registry holds a bundle with serial `above` (a CA directory restored from an
        older backup): continue above it, so agents take the next one."""
        if self.serial <= above:
            self.settings["bundle_serial"] = above + 1
            self._save()

    def revoke(self, node: str) -> bool:
        """Revoke a host (False: it already was)."""
        if node in self.revoked:
            return False
        self.settings["revoked"] = sorted({*self.revoked, node})
        self._bump()
        return True

    def bundle(self) -> TrustBundleSpec:
        auth = self.active
        assert auth.key is not None
        spec = TrustBundleSpec(self.trust_domain, tuple(self.root_pems()), tuple(auth.chain),
                               self.revoked, self.serial)
        return bundle.sign(spec, auth.key)

    # -- issuing ------------------------------------------------------------------------------
    def issue(self, csr: x509.CertificateSigningRequest, identity: str, node: str,
              now: float, lifetime: float | None = None) -> list[str]:
        """A leaf for `identity` held by `node`, from the active issuer: the chain as PEM.
        The caller decided the request may have it (meshnode.security.signer). `lifetime`:
        the leaf TTL unless given (a pre-provisioned node certificate may outlive it)."""
        auth = self.active
        assert auth.issuer is not None and auth.key is not None
        td, kind, _ = parse_id(identity)
        if td != self.trust_domain:
            raise TrustError(f"{identity} is outside trust domain {self.trust_domain}",
                             "ask for an identity of this mesh")
        leaf = certs.issue_leaf(csr, identity, node, auth.issuer, auth.key,
                                lifetime or self.leaf_ttl, now)
        issued = self._issued()
        issued[f"{node} {identity}"] = {
            "node": node, "identity": identity, "root": auth.fp,
            "kind": "node" if kind == "node" else "workload",
            "serial": format(leaf.serial_number, "x"), "not_before": certs.not_before(leaf),
            "not_after": certs.not_after(leaf), "issued_at": now}
        write_json(self.dir / "issued.json", issued)
        return [certs.cert_pem(leaf), *auth.chain]

    def _issued(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.dir / "issued.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a record for status only: a damaged one is rebuilt as leaves renew
        return data if isinstance(data, dict) else {}

    def issued(self) -> list[dict[str, Any]]:
        return sorted(self._issued().values(), key=lambda r: (r["node"], r["identity"]))

    def status(self, now: float) -> dict[str, Any]:
        """What `meshnode ca status` shows."""
        active = self.settings["active"]
        roots = []
        for fp, a in sorted(self.authorities.items(), key=lambda kv: (kv[0] != active, kv[0])):
            roots.append({
                "fingerprint": fp, "subject": a.root.subject.rfc4514_string(),
                "not_after": certs.not_after(a.root), "active": fp == active,
                "issuer": None if a.issuer is None else {
                    "subject": a.issuer.subject.rfc4514_string(),
                    "not_after": certs.not_after(a.issuer),
                    "intermediate": certs.fingerprint(a.issuer) != certs.fingerprint(a.root)},
                "leaves": sum(1 for r in self.issued()
                              if r["root"] == fp and r["not_after"] > now)})
        hosts: dict[str, list[dict[str, Any]]] = {}
        for r in self.issued():
            hosts.setdefault(r["node"], []).append(r)
        return {"trust_domain": self.trust_domain, "directory": str(self.dir),
                "leaf_ttl": self.leaf_ttl, "bundle_serial": self.serial, "roots": roots,
                "hosts": hosts, "revoked": list(self.revoked),
                "tokens": [t.describe(now) for t in self.tokens.outstanding(now)], "now": now}
