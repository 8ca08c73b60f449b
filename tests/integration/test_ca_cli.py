"""The mesh CA as an operator drives it: `meshnode ca init / status / token create /
revoke-host / root add|activate|remove` against a running agent on the embedded registry,
checked by what the registry then holds (the signed bundle, the answers to requests) and by
one-line errors for bad input."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meshnode.policy.document import parse
from meshnode.policy.identity import node_id, request_name
from meshnode.security import bundle, certs, clock, tokens
from tests.harness import Host, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

TD = "mesh.test"


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.args, r.returncode, r.stderr)
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.args, r.returncode, r.stderr)
    assert len(lines) == 1 and text in lines[0] and "hint:" in lines[0], (r.args, r.stderr)


def get(h: Host, kind: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ok(h.cli("get", kind, name, "-o", "json")))
    return out


def ca_status(h: Host) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ok(h.cli("ca", "status", "-o", "json")))
    return out


def test_ca_init_status_tokens_revoke_and_rotation(make_host, tmp_path: Path) -> None:
    h = make_host("iptables", workers=1)
    h.start()
    one_line_error(h.cli("ca", "status"), 66, "holds no mesh CA")

    out = ok(h.cli("ca", "init", "--trust-domain", TD))
    assert out.startswith(f"mesh CA created for trust domain {TD}: a self-signed root")
    one_line_error(h.cli("ca", "init", "--trust-domain", TD), 65, "already exists")
    ca_dir = tmp_path / "h0" / "state" / h.tag / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in ca_dir.iterdir())

    s = ca_status(h)
    [root] = s["roots"]
    assert s["trust_domain"] == TD and root["active"] and root["not_after"] > clock.now()
    # the agent published the signed bundle before answering
    tb = get(h, "TrustBundle", "mesh")["spec"]
    root_pem = (ca_dir / f"root-{root['fingerprint']}.pem").read_text()
    spec = parse({"kind": "TrustBundle", "name": "mesh", "spec": tb}, "test").spec
    bundle.verify(spec, [root_pem], 0)
    assert s["published_serial"] == s["bundle_serial"] == tb["serial"]

    text = ok(h.cli("ca", "status"))
    assert f"trust domain  {TD}" in text and root["fingerprint"] in text
    assert "join tokens outstanding: 0" in text and "revoked hosts: none" in text

    # a join token: printed alone (scriptable), naming the active root
    token = ok(h.cli("ca", "token", "create", "--ttl", "10m")).strip()
    tid, secret, fp = tokens.parse(token)
    assert fp == root["fingerprint"]
    assert "join tokens outstanding: 1" in ok(h.cli("ca", "status"))
    one_line_error(h.cli("ca", "token", "create", "--ttl", "10x"), 64, "invalid TTL '10x'")
    one_line_error(h.cli("ca", "token", "create", "--ttl", "30d"), 64, "between 1 s and 7 days")

    # a new host's request through the registry: the CA answers with a node certificate
    key = certs.make_key()
    ident = node_id(TD, "joiner")
    csr = certs.make_csr(key, ident, "joiner")
    name = request_name("joiner", ident)
    doc = {"kind": "CertificateRequest", "name": name,
           "spec": {"node": "joiner", "identity": ident, "csr": csr, "tokenId": tid,
                    "tokenMac": tokens.mac(secret, certs.csr_der(csr))}}
    (tmp_path / "req.json").write_text(json.dumps(doc))
    ok(h.cli("apply", "-f", str(tmp_path / "req.json")))

    def answered() -> dict[str, Any] | None:
        r = h.cli("get", "Certificate", name, "-o", "json")
        return json.loads(r.stdout)["spec"] if r.returncode == 0 else None

    cert = wait_for("the CA's answer", answered, timeout=20)
    assert not cert.get("error"), cert
    leaf = certs.verify_chain(cert["chain"], [root_pem], clock.now())
    assert certs.identity_of(leaf) == ident
    s = ca_status(h)
    assert any(c["identity"] == ident for c in s["hosts"]["joiner"])
    assert s["tokens"] == []  # used up

    # a pre-provisioned host instead of a token: key made by the CLI, chain from the CA
    out = ok(h.cli("ca", "node-cert", "prov-1", "--out", str(tmp_path), "--ttl", "7d"))
    assert out.startswith(f"{node_id(TD, 'prov-1')}: ")
    for f in ("prov-1.pem", "prov-1.key"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o600
    chain = certs.split_pem((tmp_path / "prov-1.pem").read_text())
    prov = certs.verify_chain(chain, [root_pem], clock.now())
    assert certs.identity_of(prov) == node_id(TD, "prov-1")
    assert certs.not_after(prov) > clock.now() + 6 * 86_400
    assert certs.key_matches(prov, (tmp_path / "prov-1.key").read_text())
    one_line_error(h.cli("ca", "node-cert", "prov-2", "--ttl", "60d"), 64, "at most 30 days")

    # root rotation by overlap, and its bad input
    one_line_error(h.cli("ca", "root", "activate", "deadbeefdeadbeef"), 64,
                   "is not a root of this CA")
    one_line_error(h.cli("ca", "root", "remove", root["fingerprint"]), 64, "is the active one")
    added = ok(h.cli("ca", "root", "add"))
    new_fp = added.split()[1]
    assert len(get(h, "TrustBundle", "mesh")["spec"]["roots"]) == 2
    ok(h.cli("ca", "root", "activate", new_fp))
    # the joiner's leaf still chains to the old root (it has not renewed: it is no agent)
    one_line_error(h.cli("ca", "root", "remove", root["fingerprint"]), 65, "still chain to root")

    # revoke: the bundle says so, with a higher serial (the provisioned host too: its leaf
    # would otherwise hold the old root up as well)
    ok(h.cli("ca", "revoke-host", "prov-1"))
    before = ca_status(h)["bundle_serial"]
    assert ok(h.cli("ca", "revoke-host", "joiner")).startswith("host joiner revoked")
    tb = get(h, "TrustBundle", "mesh")["spec"]
    assert tb["revokedNodes"] == ["joiner", "prov-1"] and tb["serial"] > before
    assert "already revoked" in ok(h.cli("ca", "revoke-host", "joiner"))
    text = ok(h.cli("ca", "status"))
    assert "revoked hosts: joiner, prov-1" in text and "joiner (REVOKED)" in text

    # a revoked host's leaves do not hold the old root up: it goes, and with it the leaf
    ok(h.cli("ca", "root", "remove", root["fingerprint"]))
    s = ca_status(h)
    assert [r["fingerprint"] for r in s["roots"]] == [new_fp]
    tb = get(h, "TrustBundle", "mesh")["spec"]
    assert len(tb["roots"]) == 1
    with pytest.raises(Exception, match="does not chain"):
        certs.verify_chain(cert["chain"], tb["roots"], clock.now())

    # an operator root given as a file that is not there: one line naming the option
    one_line_error(h.cli("ca", "root", "add", "--root-cert", str(tmp_path / "nope.pem"),
                         "--root-key", str(tmp_path / "nope.key")), 64, "cannot read root cert")


def test_ca_init_under_an_operator_root(make_host, tmp_path: Path) -> None:
    h = make_host("iptables", workers=1)
    h.start()
    k = certs.make_key()
    root = certs.cert_pem(certs.ca_cert(k, "corp root", "corp.example", 3650 * 86_400,
                                        clock.now()))
    (tmp_path / "root.pem").write_text(root)
    (tmp_path / "root.key").write_text(certs.key_pem(k))
    one_line_error(h.cli("ca", "init", "--root-cert", str(tmp_path / "root.pem")), 64,
                   "go together")
    out = ok(h.cli("ca", "init", "--trust-domain", TD, "--root-cert", str(tmp_path / "root.pem"),
                   "--root-key", str(tmp_path / "root.key")))
    assert "an intermediate under your root" in out
    s = ca_status(h)
    assert s["roots"][0]["issuer"]["intermediate"] and s["roots"][0]["fingerprint"] == \
        certs.fp16(root)
    ca_dir = tmp_path / "h0" / "state" / h.tag / "ca"
    kept = b"".join(f.read_bytes() for f in ca_dir.iterdir())
    assert certs.key_pem(k).encode() not in kept
    # a restarted agent signs again from the same directory; the bundle is not republished
    version = get(h, "TrustBundle", "mesh")["version"]
    h.stop()
    h.start()
    assert ca_status(h)["roots"][0]["fingerprint"] == certs.fp16(root)
    assert get(h, "TrustBundle", "mesh")["version"] == version
    token = ok(h.cli("ca", "token", "create", "--ttl", "90s", "--node", "web-*")).strip()
    assert tokens.parse(token)[2] == certs.fp16(root)
