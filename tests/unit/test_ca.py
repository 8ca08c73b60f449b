"""The mesh CA without an agent: init both ways, issuing, chain checks at injected times, join
tokens, the signed bundle, every signer refusal, root rotation by overlap, and the CA service
over a real embedded registry."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meshnode.agent.ca_service import CaService
from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.errors import ConflictError, TrustError, UsageError
from meshnode.policy.document import parse
from meshnode.policy.identity import (
    CertificateRequestSpec,
    node_id,
    request_name,
    service_id,
)
from meshnode.policy.resources import Resource
from meshnode.security import bundle, certs, clock, signer, tokens
from meshnode.security.ca import CertificateAuthority

TD = "mesh.test"
NOW = time.time()
HOUR = 3600.0


def new_ca(tmp: Path, **kw: Any) -> CertificateAuthority:
    return CertificateAuthority.init(tmp / "ca", TD, NOW, **kw)


def issue(ca: CertificateAuthority, identity: str, node: str,
          at: float = NOW) -> tuple[list[str], certs.Key]:
    key = certs.make_key()
    csr, _, _ = certs.verify_csr(certs.make_csr(key, identity, node))
    return ca.issue(csr, identity, node, at), key


# -- init, issuing, chains ---------------------------------------------------------------------
def test_init_self_signed_issues_leaves_that_verify(tmp_path: Path) -> None:
    ca = new_ca(tmp_path)
    d = tmp_path / "ca"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in d.iterdir())
    assert not list(d.glob(".*.tmp"))  # atomic writes leave no temporaries
    chain, _ = issue(ca, service_id(TD, "web"), "h1")
    assert len(chain) == 2  # leaf, root (the root is the issuer)
    leaf = certs.verify_chain(chain, ca.root_pems(), NOW)
    assert certs.identity_of(leaf) == "spiffe://mesh.test/svc/web"
    assert certs.node_of(leaf) == "h1"
    assert abs(certs.not_after(leaf) - (NOW + 24 * HOUR)) < 2
    # reopened from disk: the same CA
    again = CertificateAuthority.open(d)
    assert again.root_pems() == ca.root_pems() and again.trust_domain == TD


def test_init_under_an_operator_root_keeps_no_operator_key(tmp_path: Path) -> None:
    op_key = certs.make_key()
    op_root = certs.ca_cert(op_key, "corp root", "corp.example", 3650 * 86_400, NOW)
    root_pem, key_pem = certs.cert_pem(op_root), certs.key_pem(op_key)
    ca = new_ca(tmp_path, root_cert_pem=root_pem, root_key_pem=key_pem)
    chain, _ = issue(ca, node_id(TD, "h1"), "h1")
    assert len(chain) == 3  # leaf, intermediate, operator root
    assert ca.root_pems() == [root_pem]
    certs.verify_chain(chain, [root_pem], NOW)
    stored = b"".join(f.read_bytes() for f in (tmp_path / "ca").iterdir())
    assert key_pem.encode() not in stored
    inter = certs.load_cert(chain[1])
    assert certs.not_after(inter) <= NOW + 366 * 86_400  # an intermediate: 1 year at most
    # the intermediate is the bundle's issuer and the bundle verifies under the operator root
    b = ca.bundle()
    bundle.verify(b, [root_pem], 0, at=NOW)
    # a key that is not the root's is refused
    with pytest.raises(UsageError, match="does not belong"):
        CertificateAuthority.init(tmp_path / "ca2", TD, NOW, root_cert_pem=root_pem,
                                  root_key_pem=certs.key_pem(certs.make_key()))


def test_init_twice_and_bad_input(tmp_path: Path) -> None:
    new_ca(tmp_path)
    with pytest.raises(ConflictError, match="already exists"):
        new_ca(tmp_path)
    with pytest.raises(UsageError, match="trust domain"):
        CertificateAuthority.init(tmp_path / "x", "Not A Domain", NOW)
    with pytest.raises(UsageError, match="go together"):
        CertificateAuthority.init(tmp_path / "y", TD, NOW, root_cert_pem="x")


def test_expiry_at_an_injected_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = new_ca(tmp_path)
    chain, _ = issue(ca, service_id(TD, "web"), "h1")
    certs.verify_chain(chain, ca.root_pems(), NOW + 23 * HOUR)
    with pytest.raises(TrustError, match="expired"):
        certs.verify_chain(chain, ca.root_pems(), NOW + 25 * HOUR)
    with pytest.raises(TrustError, match="not valid yet"):
        certs.verify_chain(chain, ca.root_pems(), NOW - HOUR)
    monkeypatch.setenv(clock.OFFSET_ENV, str(25 * HOUR))
    assert clock.now() - time.time() == pytest.approx(25 * HOUR, abs=1)
    with pytest.raises(TrustError, match="expired"):
        certs.verify_chain(chain, ca.root_pems(), clock.now())


def test_chain_from_another_ca_or_tampered_is_refused(tmp_path: Path) -> None:
    ca, other = new_ca(tmp_path), CertificateAuthority.init(tmp_path / "o", TD, NOW)
    chain, _ = issue(other, service_id(TD, "web"), "h1")
    with pytest.raises(TrustError, match="does not chain to a trusted root"):
        certs.verify_chain(chain, ca.root_pems(), NOW)
    # another CA's leaf presented with our root as its "issuer"
    with pytest.raises(TrustError):
        certs.verify_chain([chain[0], *ca.root_pems()], ca.root_pems(), NOW)
    with pytest.raises(TrustError, match="CA certificate"):
        certs.verify_chain(ca.root_pems(), ca.root_pems(), NOW)


def test_signatures(tmp_path: Path) -> None:
    ca = new_ca(tmp_path)
    chain, key = issue(ca, node_id(TD, "h1"), "h1")
    leaf = certs.load_chain(chain)[0]
    sig = certs.sign(key, b"data")
    certs.verify_signature(leaf, b"data", sig)
    with pytest.raises(TrustError, match="does not verify"):
        certs.verify_signature(leaf, b"other", sig)
    with pytest.raises(TrustError, match="does not verify"):
        certs.verify_signature(leaf, b"data", certs.sign(certs.make_key(), b"data"))
    assert certs.key_matches(leaf, certs.key_pem(key))
    assert not certs.key_matches(leaf, certs.key_pem(certs.make_key()))
    assert certs.split_pem("".join(chain) + certs.key_pem(key)) == tuple(chain)


# -- join tokens ----------------------------------------------------------------------------------
def csr_for(identity: str, node: str) -> tuple[str, bytes]:
    pem = certs.make_csr(certs.make_key(), identity, node)
    return pem, certs.csr_der(pem)


def test_token_format_single_use_expiry_and_mac(tmp_path: Path) -> None:
    ca = new_ca(tmp_path)
    t = ca.tokens.create(600, ca.active.fp, NOW)
    tid, secret, fp = tokens.parse(t.text())
    assert (tid, fp) == (t.id, ca.active.fp) and certs.fingerprint(ca.root_pems()[0])[:16] == fp
    with pytest.raises(UsageError, match="malformed"):
        tokens.parse("mnj1.abc")
    _, der = csr_for(node_id(TD, "h1"), "h1")
    good = tokens.mac(secret, der)
    with pytest.raises(TrustError, match=r"proof .* is wrong"):
        ca.tokens.check(tid, tokens.mac("0" * 64, der), der, "h1", NOW)
    with pytest.raises(TrustError, match="expired"):
        ca.tokens.check(tid, good, der, "h1", NOW + 601)
    with pytest.raises(TrustError, match="unknown join token"):
        ca.tokens.check("0" * 16, good, der, "h1", NOW)
    tok = ca.tokens.check(tid, good, der, "h1", NOW)
    ca.tokens.redeem(tok, "h1", der, NOW)
    # the same host retrying the same CSR: accepted (its answer may have been lost)
    ca.tokens.check(tid, good, der, "h1", NOW + 1)
    # anyone else, or another CSR: refused
    with pytest.raises(TrustError, match="already used by h1"):
        ca.tokens.check(tid, good, der, "h2", NOW + 1)
    _, der2 = csr_for(node_id(TD, "h1"), "h1")
    with pytest.raises(TrustError, match="already used"):
        ca.tokens.check(tid, tokens.mac(secret, der2), der2, "h1", NOW + 1)
    assert ca.tokens.outstanding(NOW) == []
    # bound to a node name
    bound = ca.tokens.create(600, ca.active.fp, NOW, node="web-*")
    with pytest.raises(TrustError, match="is for node"):
        ca.tokens.check(bound.id, tokens.mac(bound.secret, der), der, "h1", NOW)
    with pytest.raises(UsageError, match="TTL"):
        ca.tokens.create(30 * 86_400, ca.active.fp, NOW)
    assert stat.S_IMODE((tmp_path / "ca" / "tokens.json").stat().st_mode) == 0o600


# -- the bundle ----------------------------------------------------------------------------------
def test_bundle_signature_tamper_and_rollback(tmp_path: Path) -> None:
    ca = new_ca(tmp_path)
    roots = ca.root_pems()
    b1 = ca.bundle()
    bundle.verify(b1, roots, 0, at=NOW)
    tampered = msgspec.structs.replace(b1, revoked_nodes=("h9",))
    with pytest.raises(TrustError, match="signature does not verify"):
        bundle.verify(tampered, roots, 0, at=NOW)
    extra_root = msgspec.structs.replace(b1, roots=(*b1.roots, *new_ca(tmp_path / "x")
                                                    .root_pems()))
    with pytest.raises(TrustError, match="signature"):
        bundle.verify(extra_root, roots, 0, at=NOW)
    assert ca.revoke("h9")
    b2 = ca.bundle()
    assert b2.serial == b1.serial + 1 and b2.revoked_nodes == ("h9",)
    bundle.verify(b2, roots, b1.serial + 1, at=NOW)
    with pytest.raises(TrustError, match="rollback"):
        bundle.verify(b1, roots, b2.serial, at=NOW)
    # signed by another CA: not under the roots held
    other = CertificateAuthority.init(tmp_path / "o", TD, NOW)
    with pytest.raises(TrustError, match="issuer is not trusted"):
        bundle.verify(other.bundle(), roots, 0, at=NOW)
    # signed by the CA but naming another trust domain than its issuer
    renamed = bundle.sign(msgspec.structs.replace(b2, trust_domain="other.test"),
                          ca.active.key)  # type: ignore[arg-type]
    with pytest.raises(TrustError, match=r"names trust domain other\.test"):
        bundle.verify(renamed, roots, 0, at=NOW)
    unsigned = msgspec.structs.replace(b2, signature="")
    with pytest.raises(TrustError, match="not signed"):
        bundle.verify(unsigned, roots, 0, at=NOW)


# -- the signer ----------------------------------------------------------------------------------
class Mesh:
    """A CA with hosts' reports and Service resources, as the signer reads them."""

    def __init__(self, tmp: Path) -> None:
        self.ca = new_ca(tmp)
        self.hosts: dict[str, dict[str, Any]] = {}
        self.resources: dict[tuple[str, str], Resource] = {}

    def service(self, name: str, nodes: tuple[str, ...] = ()) -> None:
        spec = {"identity": {"nodes": list(nodes)}} if nodes else {}
        self.resources[("Service", name)] = parse({"kind": "Service", "name": name,
                                                   "spec": spec}, "test")

    def decide(self, req: CertificateRequestSpec, at: float = NOW) -> Any:
        return signer.decide(req, self.ca, self.hosts, self.resources, at)

    def join(self, node: str) -> tuple[tuple[str, ...], certs.Key]:
        t = self.ca.tokens.create(600, self.ca.active.fp, NOW)
        key = certs.make_key()
        pem = certs.make_csr(key, node_id(TD, node), node)
        out = self.decide(CertificateRequestSpec(
            node, node_id(TD, node), pem, token_id=t.id,
            token_mac=tokens.mac(t.secret, certs.csr_der(pem))))
        assert not out.error, out.error
        return out.chain, key

    def signed(self, node: str, identity: str, chain: tuple[str, ...], node_key: certs.Key,
               csr_node: str | None = None) -> CertificateRequestSpec:
        pem = certs.make_csr(certs.make_key(), identity, csr_node or node)
        return CertificateRequestSpec(node, identity, pem, node_chain=chain,
                                      node_signature=certs.sign(node_key, certs.csr_der(pem)))


def test_signer_issues_join_renewal_and_workload(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    chain, key = m.join("h1")
    leaf = certs.verify_chain(chain, m.ca.root_pems(), NOW)
    assert certs.identity_of(leaf) == node_id(TD, "h1")
    renewal = m.decide(m.signed("h1", node_id(TD, "h1"), chain, key))
    assert not renewal.error and renewal.not_after > NOW
    m.hosts["h1"] = {"enrolled": ["web"]}
    m.service("web", nodes=("h*",))
    req = m.signed("h1", service_id(TD, "web"), chain, key)
    out = m.decide(req)
    assert not out.error, out.error
    assert out.csr_sha256 == certs.csr_sha256(req.csr)
    assert certs.identity_of(certs.load_chain(out.chain)[0]) == service_id(TD, "web")
    assert {(r["node"], r["kind"]) for r in m.ca.issued()} == {("h1", "node"),
                                                               ("h1", "workload")}


def test_signer_refusals_each_say_why(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    chain, key = m.join("h1")
    chain2, key2 = m.join("h2")
    m.hosts["h1"] = {"enrolled": ["web", "ghost"]}
    m.service("web", nodes=("db-*",))
    m.service("api")
    web, api, ghost = (service_id(TD, s) for s in ("web", "api", "ghost"))

    def refused(req: CertificateRequestSpec, at: float = NOW) -> str:
        out = m.decide(req, at)
        assert out.error and not out.chain
        return str(out.error)

    pem = certs.make_csr(certs.make_key(), api, "h1")
    assert "not authenticated" in refused(CertificateRequestSpec("h1", api, pem))
    assert "not enrolled on host h1" in refused(m.signed("h1", api, chain, key))
    assert "no Service ghost" in refused(m.signed("h1", ghost, chain, key))
    assert "may run only on hosts db-*" in refused(m.signed("h1", web, chain, key))
    # a host asking with another host's node certificate, or for another host's node identity
    assert "not by host h1" in refused(m.signed("h1", node_id(TD, "h1"), chain2, key2))
    assert "cannot have the node identity of h2" in refused(
        m.signed("h1", node_id(TD, "h2"), chain, key, csr_node="h1"))
    # the node signature made with another key
    req = m.signed("h1", node_id(TD, "h1"), chain, key)
    assert "node signature" in refused(msgspec.structs.replace(
        req, node_signature=certs.sign(key2, certs.csr_der(req.csr))))
    # CSR and request disagree; another trust domain
    assert "the CSR names" in refused(msgspec.structs.replace(
        m.signed("h1", node_id(TD, "h1"), chain, key), identity=api))
    assert "the CSR is for host" in refused(m.signed("h1", node_id(TD, "h1"), chain, key,
                                                     csr_node="h2"))
    assert "outside trust domain" in refused(m.signed("h1", "spiffe://other/node/h1", chain,
                                                      key))
    # an expired node certificate
    assert "expired" in refused(m.signed("h1", node_id(TD, "h1"), chain, key), NOW + 25 * HOUR)
    # a node certificate from another CA
    other = CertificateAuthority.init(tmp_path / "o", TD, NOW)
    foreign, fkey = issue(other, node_id(TD, "h1"), "h1")
    assert "does not chain" in refused(m.signed("h1", node_id(TD, "h1"), tuple(foreign),
                                                fkey))
    # a join token used for a workload identity
    t = m.ca.tokens.create(600, m.ca.active.fp, NOW)
    pem = certs.make_csr(certs.make_key(), api, "h3")
    assert "only good for the host's own node identity" in refused(CertificateRequestSpec(
        "h3", api, pem, token_id=t.id, token_mac=tokens.mac(t.secret, certs.csr_der(pem))))
    # revoked: nothing, not even a renewal
    m.ca.revoke("h1")
    assert "host h1 is revoked" in refused(m.signed("h1", node_id(TD, "h1"), chain, key))
    # garbage CSR
    assert "does not parse" in refused(CertificateRequestSpec("h2", api, "garbage"))


# -- root rotation by overlap --------------------------------------------------------------------
def test_root_rotation_overlap(tmp_path: Path) -> None:
    ca = new_ca(tmp_path)
    old_fp = ca.active.fp
    old_leaf, _ = issue(ca, service_id(TD, "web"), "h1")
    agent_roots = ca.root_pems()  # what an agent pinned
    new_fp = ca.add_root(NOW)
    # 1. the new root is published, signed by the old issuer: agents holding the old root
    #    take it and now trust both
    b = ca.bundle()
    bundle.verify(b, agent_roots, 0, at=NOW)
    assert len(b.roots) == 2 and ca.active.fp == old_fp
    agent_roots = list(b.roots)
    # 2. activate: new leaves chain to the new root; the bundle is signed by the new issuer,
    #    which agents already trust
    with pytest.raises(UsageError, match="is not a root of this CA"):
        ca.activate("deadbeefdeadbeef")
    ca.activate(new_fp[:8])
    bundle.verify(ca.bundle(), agent_roots, b.serial + 1, at=NOW)
    new_leaf, _ = issue(ca, service_id(TD, "web"), "h2")
    for chain in (old_leaf, new_leaf):  # both verify while both roots are trusted
        certs.verify_chain(chain, agent_roots, NOW)
    # 3. removal refused while unexpired leaves chain to the old root, unless forced (or
    #    once they are renewed / expired)
    with pytest.raises(UsageError, match="is the active one"):
        ca.remove_root(new_fp, NOW)
    with pytest.raises(ConflictError, match="still chain to root"):
        ca.remove_root(old_fp, NOW)
    ca.remove_root(old_fp, NOW + 25 * HOUR)  # the old leaves expired by then
    final = ca.bundle()
    bundle.verify(final, agent_roots, 0, at=NOW)
    assert len(final.roots) == 1
    with pytest.raises(TrustError, match="does not chain to a trusted root"):
        certs.verify_chain(old_leaf, final.roots, NOW)
    certs.verify_chain(new_leaf, final.roots, NOW)
    assert not list((tmp_path / "ca").glob(f"*{old_fp}*"))


def test_root_rotation_with_operator_roots(tmp_path: Path) -> None:
    def op_root(name: str) -> tuple[str, str]:
        k = certs.make_key()
        return certs.cert_pem(certs.ca_cert(k, name, "corp", 3650 * 86_400, NOW)), \
            certs.key_pem(k)

    r1, k1 = op_root("corp root 1")
    r2, k2 = op_root("corp root 2")
    ca = new_ca(tmp_path, root_cert_pem=r1, root_key_pem=k1)
    old_leaf, _ = issue(ca, node_id(TD, "h1"), "h1")
    fp = ca.add_root(NOW, r2, k2)
    ca.activate(fp)
    new_leaf, _ = issue(ca, node_id(TD, "h1"), "h1")
    certs.verify_chain(new_leaf, [r2], NOW)
    certs.verify_chain(old_leaf, ca.root_pems(), NOW)
    ca.remove_root(certs.fp16(r1), NOW, force=True)
    with pytest.raises(TrustError):
        certs.verify_chain(old_leaf, ca.root_pems(), NOW)


# -- the CA service over the embedded registry --------------------------------------------------
def test_ca_service_publishes_bundle_and_answers_requests(tmp_path: Path) -> None:
    async def run() -> None:
        reg = EmbeddedRegistry(tmp_path / "registry.json")
        await reg.start()
        ca = new_ca(tmp_path)
        svc = CaService(reg, tmp_path / "ca", "ca-host")
        await svc.start()
        try:
            await svc.sync()
            stored = reg.resources()[("TrustBundle", "mesh")]
            bundle.verify(stored.spec, ca.root_pems(), 0)
            assert not await svc.publish_bundle()  # the same bundle: not written again
            t = ca.tokens.create(600, ca.active.fp, clock.now())
            pem = certs.make_csr(certs.make_key(), node_id(TD, "h1"), "h1")
            name = request_name("h1", node_id(TD, "h1"))
            req = CertificateRequestSpec("h1", node_id(TD, "h1"), pem, token_id=t.id,
                                         token_mac=tokens.mac(t.secret, certs.csr_der(pem)))
            bad = CertificateRequestSpec("h2", node_id(TD, "h2"), certs.make_csr(
                certs.make_key(), node_id(TD, "h2"), "h2"))
            await reg.apply([Resource("CertificateRequest", name, req),
                             Resource("CertificateRequest", "csr-bad", bad)])
            assert await svc.answer_requests() == 2
            cert = reg.resources()[("Certificate", name)].spec
            assert cert.csr_sha256 == certs.csr_sha256(pem) and not cert.error
            certs.verify_chain(cert.chain, ca.root_pems(), clock.now())
            refused = reg.resources()[("Certificate", "csr-bad")].spec
            assert "not authenticated" in refused.error
            assert await svc.answer_requests() == 0  # each request is answered once
            # the CA host's own agent
            own = svc.issue_local(node_id(TD, "ca-host"),
                                  certs.make_csr(certs.make_key(), node_id(TD, "ca-host"),
                                                 "ca-host"))
            certs.verify_chain(own, ca.root_pems(), clock.now())
            with pytest.raises(TrustError):
                svc.issue_local(node_id(TD, "ca-host"),
                                certs.make_csr(certs.make_key(), node_id(TD, "x"), "x"))
            # a bundle someone else wrote (not signed by this CA) is replaced, its serial
            # not taken over; one of ours with a higher serial (a restored backup) is
            live = svc.require()
            forged = msgspec.structs.replace(stored.spec, serial=10**9)
            await reg.apply([Resource("TrustBundle", "mesh", forged)])
            assert await svc.publish_bundle()
            assert reg.resources()[("TrustBundle", "mesh")].spec.serial == live.serial == 1
            live.revoke("x")
            await svc.changed()
            live.settings["bundle_serial"] = 1  # an older backup of the directory
            assert await svc.publish_bundle()
            assert reg.resources()[("TrustBundle", "mesh")].spec.serial == live.serial == 3
            # a revocation is published with a higher serial
            live.revoke("h1")
            await svc.changed()
            assert reg.resources()[("TrustBundle", "mesh")].spec.revoked_nodes == ("h1", "x")
        finally:
            await svc.stop()
            await reg.close()

    asyncio.run(run())


def test_clock_offset_garbage_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(clock.OFFSET_ENV, "soon")
    assert abs(clock.now() - time.time()) < 1
    monkeypatch.delenv(clock.OFFSET_ENV)
    assert os.environ.get(clock.OFFSET_ENV) is None


# -- what shows expiry: doctor, the gauge, the CLI's durations -----------------------------------
def test_doctor_warns_about_roots_issuers_and_leaves() -> None:
    from meshnode.diagnose.doctor import HeldCert, certificate_checks

    day = 86_400.0
    assert certificate_checks([], NOW) == []
    fine = [HeldCert("root", "root", NOW - day, NOW + 3000 * day),
            HeldCert("node", "node", NOW - HOUR, NOW + 23 * HOUR)]
    assert [c.status for c in certificate_checks(fine, NOW)] == ["ok", "ok"]
    soon = [HeldCert("issuer x", "issuer", NOW - day, NOW + 20 * day)]
    [c] = certificate_checks(soon, NOW)
    assert c.status == "warn" and "issuer x in 20d" in c.detail and "ca root add" in c.fix
    gone = [HeldCert("root y", "root", NOW - day, NOW - 1)]
    assert certificate_checks(gone, NOW)[0].status == "fail"
    old = [HeldCert("w", "workload", NOW - 19 * HOUR, NOW + 5 * HOUR),
           HeldCert("v", "workload", NOW - 25 * HOUR, NOW - HOUR)]
    [c] = certificate_checks(old, NOW)
    assert c.status == "warn" and "w past 3/4 of its life" in c.detail and "v expired" in c.detail


def test_cert_expiry_gauge() -> None:
    from meshnode.telemetry.metrics import cert_expiry

    fam = cert_expiry([("spiffe://mesh.test/svc/web", "workload", 3600.0),
                       ("meshnode root mesh.test", "root", -5.0)])
    assert fam.name == "meshnode_cert_expiry_seconds"
    got = {(s.labels["identity"], s.labels["kind"]): s.value for s in fam.samples}
    assert got == {("spiffe://mesh.test/svc/web", "workload"): 3600.0,
                   ("meshnode root mesh.test", "root"): -5.0}


def test_cli_durations() -> None:
    from meshnode.cli.ca import parse_duration

    assert parse_duration("10m") == 600 and parse_duration("24h") == 86_400
    assert parse_duration("90") == 90 and parse_duration("1.5d") == 1.5 * 86_400
    for bad in ("10x", "", "-5m", "0", "m"):
        with pytest.raises(UsageError, match="invalid TTL"):
            parse_duration(bad)


# -- OpenSSL takes what the CA issues ----------------------------------------------------------
@pytest.mark.parametrize("operator_root", [False, True])
def test_issued_chains_work_for_mutual_tls_13(tmp_path: Path, operator_root: bool) -> None:
    """A TLS 1.3 mutual handshake through Python's ssl (OpenSSL) with the CA's leaves, both
    when the root issues and when an intermediate under an operator's root does."""
    import socket
    import ssl
    import threading

    kw: dict[str, str] = {}
    if operator_root:
        k = certs.make_key()
        kw = {"root_cert_pem": certs.cert_pem(certs.ca_cert(k, "corp", "corp", 3650 * 86_400,
                                                            time.time())),
              "root_key_pem": certs.key_pem(k)}
    ca = CertificateAuthority.init(tmp_path / "ca", TD, time.time(), **kw)
    roots = tmp_path / "roots.pem"
    roots.write_text("".join(ca.root_pems()))

    def context(identity: str, node: str, server: bool) -> ssl.SSLContext:
        chain, key = issue(ca, identity, node, time.time())
        path = tmp_path / f"{node}.pem"
        path.write_text("".join(chain) + certs.key_pem(key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(path)
        ctx.load_verify_locations(roots)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False
        return ctx

    server_ctx = context(node_id(TD, "h2"), "h2", server=True)
    client_ctx = context(service_id(TD, "web"), "h1", server=False)
    a, b = socket.socketpair()
    seen: dict[str, Any] = {}

    def serve() -> None:
        with server_ctx.wrap_socket(b, server_side=True) as s:
            seen["client"] = s.getpeercert()
            s.sendall(b"ok")

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(a) as c:
        peer = c.getpeercert()
        assert c.recv(2) == b"ok" and c.version() == "TLSv1.3"
    t.join(10)
    assert ("URI", node_id(TD, "h2")) in peer["subjectAltName"]
    assert ("URI", service_id(TD, "web")) in seen["client"]["subjectAltName"]
    assert ((("organizationalUnitName", "h1"),) in seen["client"]["subject"])


def test_an_unbound_token_cannot_take_the_name_of_a_host_that_exists(tmp_path: Path) -> None:
    """A leaked token must not become h1 (h1's peers would then dial the thief)."""
    m = Mesh(tmp_path)
    m.join("h1")
    t = m.ca.tokens.create(600, m.ca.active.fp, NOW)
    pem = certs.make_csr(certs.make_key(), node_id(TD, "h1"), "h1")
    out = m.decide(CertificateRequestSpec("h1", node_id(TD, "h1"), pem, token_id=t.id,
                                          token_mac=tokens.mac(t.secret, certs.csr_der(pem))))
    assert out.error == ("host h1 already holds a node certificate: a join token may not take "
                         "its name"), out.error
    bound = m.ca.tokens.create(600, m.ca.active.fp, NOW, node="h1")  # the operator means it
    out = m.decide(CertificateRequestSpec("h1", node_id(TD, "h1"), pem, token_id=bound.id,
                                          token_mac=tokens.mac(bound.secret,
                                                               certs.csr_der(pem))))
    assert not out.error, out.error
