"""The Gateway kind: what apply accepts and the one-line reason it refuses the rest; the
certificate checks the agent makes on the files; the worker's SNI choice of certificate."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path
from typing import Any

import pytest

from meshnode.agent.gateway import read_certificate
from meshnode.errors import ConfigError, UsageError
from meshnode.policy.document import check_references, parse
from meshnode.policy.gateway import GatewayCertificate, host_matches
from meshnode.policy.resources import Resource, ServicePolicy
from meshnode.proxy.gateway import sni_contexts
from tests.tls_certs import web_certs


def gateway(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "nodes": ["edge-*"], "service": "edge",
        "listeners": [{"address": "127.0.0.1", "port": 8443, "certificates": [
            {"hosts": ["shop.example.com"], "certFile": "/etc/c.pem", "keyFile": "/etc/c.key"}]}]}
    base.update(spec)
    return {"kind": "Gateway", "name": "edge", "spec": base}


def refused(doc: dict[str, Any]) -> str:
    with pytest.raises(UsageError) as exc:
        parse(doc)
    message = exc.value.message
    assert "\n" not in message
    return message


def test_a_gateway_parses_with_defaults() -> None:
    r = parse(gateway())
    li = r.spec.listeners[0]
    assert (r.spec.nodes, r.spec.service, li.protocol) == (("edge-*",), "edge", "https")
    assert li.certificates[0].cert_file == "/etc/c.pem"
    plain = parse(gateway(listeners=[{"address": "10.0.0.1", "port": 80, "protocol": "http"}]))
    assert plain.spec.listeners[0].certificates == ()


@pytest.mark.parametrize(("spec", "reason"), [
    ({"nodes": []}, "nodes is empty"),
    ({"listeners": []}, "listeners is empty"),
    ({"service": "Edge"}, "service name 'Edge' is invalid"),
    ({"listeners": [{"port": 443, "certificates": []}]}, "missing required field address"),
    ({"listeners": [{"address": "example.com", "port": 443}]}, "not an IPv4 address"),
    ({"listeners": [{"address": "127.0.0.1", "port": 0}]}, "out of range"),
    ({"listeners": [{"address": "127.0.0.1", "port": 443}]}, "give at least one certificate"),
    ({"listeners": [{"address": "127.0.0.1", "port": 80, "protocol": "http",
                     "certificates": [{"hosts": ["a.b"], "certFile": "/c", "keyFile": "/k"}]}]},
     "remove its certificates"),
    ({"listeners": [{"address": "127.0.0.1", "port": 80, "protocol": "tcp"}]},
     "spec.listeners[0].protocol"),
    ({"listeners": [{"address": "127.0.0.1", "port": 80, "protocol": "http"},
                    {"address": "127.0.0.1", "port": 80, "protocol": "http"}]},
     "two listeners on 127.0.0.1:80"),
    ({"listeners": [{"address": "0.0.0.0", "port": 80, "protocol": "http"},
                    {"address": "127.0.0.1", "port": 80, "protocol": "http"}]},
     "two listeners on 127.0.0.1:80"),
    ({"listeners": [{"address": "127.0.0.1", "port": 443, "certificates": [
        {"hosts": ["a.example.com"], "certFile": "/c1", "keyFile": "/k1"},
        {"hosts": ["a.example.com"], "certFile": "/c2", "keyFile": "/k2"}]}]},
     "host a.example.com has two certificates"),
    ({"listeners": [{"address": "127.0.0.1", "port": 443, "certificates": [
        {"hosts": ["Shop.Example.com"], "certFile": "/c", "keyFile": "/k"}]}]},
     "not a lowercase DNS name"),
    ({"listeners": [{"address": "127.0.0.1", "port": 443, "certificates": [
        {"hosts": ["a.*.com"], "certFile": "/c", "keyFile": "/k"}]}]},
     "not a lowercase DNS name"),
    ({"listeners": [{"address": "127.0.0.1", "port": 443, "certificates": [
        {"hosts": [], "certFile": "/c", "keyFile": "/k"}]}]}, "a certificate needs hosts"),
    ({"listeners": [{"address": "127.0.0.1", "port": 443, "certificates": [
        {"hosts": ["a.b"], "certFile": "c.pem", "keyFile": "/k"}]}]},
     "certFile 'c.pem' must be an absolute path"),
])
def test_bad_gateways_are_refused_with_the_reason(spec: dict[str, Any], reason: str) -> None:
    assert reason in refused(gateway(**spec))


def test_the_gateway_service_must_exist() -> None:
    r = parse(gateway())
    with pytest.raises(UsageError, match="Gateway edge refers to Service edge, which does not "
                                         "exist"):
        check_references([r], {})
    svc = Resource("Service", "edge", ServicePolicy())
    check_references([r], {svc.key: svc})
    with pytest.raises(UsageError, match="does not exist after this change"):
        check_references([], {svc.key: svc, r.key: r}, deleted=[svc.key])


def test_wildcards_match_one_label() -> None:
    assert host_matches("*.example.com", "shop.example.com")
    assert not host_matches("*.example.com", "a.shop.example.com")
    assert not host_matches("*.example.com", "example.com")
    assert host_matches("example.com", "example.com")


def test_the_agent_checks_the_files(tmp_path: Path) -> None:
    _, sites = web_certs(tmp_path, {"shop": ["shop.example.com"], "blog": ["blog.example.com"]})
    (shop_cert, shop_key), (_, blog_key) = sites["shop"], sites["blog"]
    good = read_certificate(GatewayCertificate(("shop.example.com",), str(shop_cert),
                                               str(shop_key)))
    assert good.chain.count("BEGIN CERTIFICATE") == 2 and "PRIVATE KEY" in good.key
    with pytest.raises(ConfigError, match=f"cannot read the key file {tmp_path}/nope.key: No "
                                          "such file"):
        read_certificate(GatewayCertificate(("a.b",), str(shop_cert), str(tmp_path / "nope.key")))
    with pytest.raises(ConfigError, match="does not match the certificate"):
        read_certificate(GatewayCertificate(("a.b",), str(shop_cert), str(blog_key)))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(ConfigError, match="holds no certificate"):
        read_certificate(GatewayCertificate(("a.b",), str(junk), str(shop_key)))


def test_sni_picks_the_certificate(tmp_path: Path) -> None:
    """In memory (ssl.MemoryBIO): the server context the worker makes answers each name with
    the certificate listing it, a name no certificate lists with the first one, and ALPN
    offers h2."""
    root, sites = web_certs(tmp_path, {"shop": ["shop.example.com"],
                                       "blog": ["*.blog.example.com"]})
    certs = tuple(read_certificate(GatewayCertificate((h,), str(c), str(k)))
                  for h, (c, k) in (("shop.example.com", sites["shop"]),
                                    ("*.blog.example.com", sites["blog"])))
    h2_hosts = {"shop.example.com", "www.blog.example.com"}  # their backends speak HTTP/2
    server_ctx = sni_contexts(certs, lambda host: host in h2_hosts)

    def handshake(name: str, check: bool = True) -> tuple[str, str | None]:
        client_ctx = ssl.create_default_context(cafile=str(root))
        client_ctx.check_hostname = check
        client_ctx.set_alpn_protocols(["h2", "http/1.1"])
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=name)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for side, out, into in ((client, c_out, s_in), (server, s_out, c_in)):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
                into.write(out.read())
        cert = client.getpeercert()
        assert cert is not None
        san = dict(cert["subjectAltName"])["DNS"]
        return str(san), client.selected_alpn_protocol()

    assert handshake("shop.example.com") == ("shop.example.com", "h2")
    assert handshake("www.blog.example.com") == ("*.blog.example.com", "h2")
    assert handshake("x.blog.example.com") == ("*.blog.example.com", "http/1.1")
    assert handshake("other.example.com", check=False) == ("shop.example.com", "http/1.1")
