"""The pure parts of the etcd registry: key layout, value codec, VIP ids, URL parsing, and the
mirror's ordering rules (Reset, stale events, tombstones, cache). No etcd needed."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from meshnode.discovery.etcd import EtcdRegistry
from meshnode.discovery.etcd_keys import (
    ClaimKey,
    EndpointKey,
    HistoryKey,
    HostKey,
    KeyLayout,
    ResourceKey,
    VipKey,
    check_node,
    decode_endpoint,
    encode_endpoint,
    parse_url,
    prefix_end,
)
from meshnode.discovery.etcd_mirror import Mirror
from meshnode.discovery.registry import EndpointRecord, VipRange
from meshnode.errors import ConfigError, RegistryError
from meshnode.model import HostPort
from meshnode.policy import store
from meshnode.policy.document import parse

K = KeyLayout()
VIPS = VipRange()
WEB_DOC = parse({"kind": "Service", "name": "web", "spec": {
    "port": 80, "failMode": "closed", "balancer": {"algorithm": "ring-hash"},
    "health": {"kind": "http", "path": "/ready"}}})
A1 = HostPort.parse("10.0.0.1:80")


def service_value(name: str = "web", vip: str = "127.240.0.1", **spec: object) -> bytes:
    r = WEB_DOC if name == "web" and not spec else parse({"kind": "Service", "name": name,
                                                          "spec": spec})
    return store.encode(r, {"vip": vip})


def ep(addr: str, node: str = "a") -> EndpointRecord:
    return EndpointRecord(HostPort.parse(addr), "process", 42, node, "z1", 2)


def test_key_layout_and_parse_round_trip() -> None:
    assert K.service("web") == b"/meshnode/resources/Service/web"
    assert K.vip(IPv4Address("127.240.0.7")) == b"/meshnode/vips/127.240.0.7"
    assert K.endpoint("web", "host-1", A1) == b"/meshnode/endpoints/web/host-1/10.0.0.1:80"
    assert K.claim(A1, "web", "host-1") == b"/meshnode/addrs/10.0.0.1:80/web/host-1"
    assert K.parse(K.service("web")) == ResourceKey("Service", "web")
    assert K.parse(K.history("Service", "web", "t1")) == HistoryKey("Service", "web", "t1")
    assert K.parse(K.host("host-1")) == HostKey("host-1")
    assert K.parse(K.vip(IPv4Address("127.240.0.7"))) == VipKey(IPv4Address("127.240.0.7"))
    assert K.parse(K.endpoint("web", "host-1", A1)) == EndpointKey("web", "host-1", A1)
    assert K.parse(K.claim(A1, "web", "host-1")) == ClaimKey(A1, "web", "host-1")
    # other prefixes, older layouts, newer kinds and malformed keys are not ours to interpret
    for key in (b"/other/resources/Service/web", b"/meshnode/services/web", b"/meshnode/new/x",
                b"/meshnode/endpoints/web/a/not-an-addr", b"/meshnode/vips/300.1.1.1",
                b"/meshnode/resources/Service/", b"/meshnode/endpoints/web/a/10.0.0.1:0",
                b"\xff"):
        assert K.parse(key) is None, key
    assert KeyLayout("/t1/").service("x") == b"/t1/resources/Service/x"
    with pytest.raises(ConfigError):
        KeyLayout("meshnode")


def test_foreign_claim_ranges_cover_every_other_service_and_never_our_own() -> None:
    ranges = K.foreign_claims(A1, "a")

    def foreign(key: bytes) -> bool:
        return any(lo <= key < hi for lo, hi in ranges)

    assert not foreign(K.claim(A1, "a", "n1")) and not foreign(K.claim(A1, "a", "zzz"))
    for other in ("b", "ab", "a-b", "0", "z", "aa"):  # "ab" shares our name's prefix
        assert foreign(K.claim(A1, other, "n1")), other
    assert not foreign(K.claim(HostPort.parse("10.0.0.1:8080"), "b", "n1"))  # another addr
    assert not foreign(K.claim(HostPort.parse("10.0.0.10:80"), "b", "n1"))


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


def test_values_round_trip_and_garbage_is_a_registry_error() -> None:
    r, status = store.decode(service_value(), 7)
    assert (r.spec, r.version, status) == (WEB_DOC.spec, 7, {"vip": "127.240.0.1"})
    assert "version" not in json.loads(service_value())  # the key's mod revision is
    assert decode_endpoint(encode_endpoint(ep("10.0.0.1:80"))) == ep("10.0.0.1:80")
    for bad in (b"{", b"[]", b'{"name": "x"}', b'{"kind": "Service", "name": "x", '
                                                b'"spec": {"port": "80"}}'):
        with pytest.raises(RegistryError):
            store.decode(bad, 1)
    with pytest.raises(RegistryError):
        decode_endpoint(b'{"addr": "nope"}')


def test_service_ids_are_vip_offsets_and_vips_run_out_clearly() -> None:
    r = VIPS
    assert r.id_of(IPv4Address("127.240.0.1")) == 1
    assert r.id_of(IPv4Address("127.240.1.0")) == 256
    assert r.id_of(IPv4Address("127.240.255.254")) == 65534
    with pytest.raises(RegistryError):
        r.id_of(IPv4Address("127.241.0.1"))
    assert r.first_free({IPv4Address("127.240.0.1"), IPv4Address("127.240.0.3")}.__contains__) == \
        IPv4Address("127.240.0.2")
    small = VipRange("127.240.0.0/30")
    with pytest.raises(RegistryError, match="no free VIP"):
        small.first_free(set(small.net.hosts()).__contains__)


def test_registry_urls() -> None:
    assert parse_url("etcd://10.0.0.5:2379") == ([("10.0.0.5", 2379)], "/meshnode/")
    assert parse_url("etcd://a:1,b:2,c") == ([("a", 1), ("b", 2), ("c", 2379)], "/meshnode/")
    assert parse_url("etcd://a:1/team/mesh") == ([("a", 1)], "/team/mesh/")
    for bad in ("http://a:1", "etcd://", "etcd://a:x", "etcd://a:1,,b:2", "etcd://a:70000"):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_node_names_are_one_key_part() -> None:
    assert check_node("host-1.example") == "host-1.example"
    for bad in ("", "a/b", "tab\there"):
        with pytest.raises(ConfigError):
            check_node(bad)


def _mirror_with_web() -> Mirror:
    m = Mirror(K, VIPS)
    m.reset([(K.service("web"), service_value(), 5, 0),
             (K.endpoint("web", "a", A1), encode_endpoint(ep("10.0.0.1:80")), 6, 77),
             (K.vip(IPv4Address("127.240.0.1")), b"web", 5, 0),
             (K.claim(A1, "web", "a"), b"", 6, 77)], 10)
    return m


def test_mirror_reset_builds_records_and_replaces_everything() -> None:
    m = _mirror_with_web()
    assert m.revision == 10
    web = m.services()["web"]
    assert web.endpoints == {ep("10.0.0.1:80")}
    assert (web.id, web.vip, web.version, web.policy) == (1, IPv4Address("127.240.0.1"), 5,
                                                           WEB_DOC.spec)
    assert m.reserved_vips() == {IPv4Address("127.240.0.1"): "web"}
    assert m.endpoints_of_node("a") == {("web", "a", A1): (ep("10.0.0.1:80"), 77)}
    m.reset([(K.service("web"), service_value(), 5, 0)], 20)  # the endpoint went away
    assert m.services()["web"].endpoints == frozenset()


def test_mirror_drops_stale_events_and_keeps_tombstones_until_the_watch_passes() -> None:
    m = _mirror_with_web()
    key = K.endpoint("web", "a", A1)
    assert m.put(key, encode_endpoint(ep("10.0.0.1:80")), 6, 77) is None  # already held
    # our own delete at 12 is applied before the watch gets there...
    assert m.delete(key, 12, local=True) == "web"
    # ...so a put event from 11 arriving late must not bring the endpoint back
    assert m.put(key, encode_endpoint(ep("10.0.0.1:80")), 11, 77) is None
    assert m.services()["web"].endpoints == frozenset()
    m.advance(12)
    assert m.put(key, encode_endpoint(ep("10.0.0.1:80")), 13, 78) == "web"  # a real re-add
    # the key names the owner, whatever the value claims
    other = K.endpoint("web", "b", HostPort.parse("10.0.0.2:80"))
    m.put(other, encode_endpoint(ep("10.0.0.2:80", node="a")), 14, 79)
    assert {e.node for e in m.services()["web"].endpoints} == {"a", "b"}


def test_mirror_hides_orphans_and_skips_garbage() -> None:
    m = Mirror(K, VIPS)
    m.reset([(K.endpoint("gone", "a", A1), encode_endpoint(ep("10.0.0.1:80")), 3, 7),
             (K.service("bad"), b"{", 4, 0),
             (K.service("far"), service_value("far", "10.9.9.9"), 4, 0)], 5)
    # an endpoint without its service, a service that won't parse, a VIP outside the range
    assert m.services() == {}
    m.put(K.service("gone"), service_value("gone", "127.240.0.9"), 6, 0)
    assert m.services()["gone"].endpoints == {ep("10.0.0.1:80")}


def test_mirror_cache_round_trip(tmp_path: Path) -> None:
    m = _mirror_with_web()
    m.save(tmp_path / "cache.json")
    again = Mirror(K, VIPS)
    assert again.load(tmp_path / "cache.json")
    assert again.services() == m.services() and again.revision == 10
    assert again.resources() == m.resources()
    assert not Mirror(KeyLayout("/other/"), VIPS).load(tmp_path / "cache.json")  # another prefix
    (tmp_path / "bad.json").write_text("{")
    assert not Mirror(K, VIPS).load(tmp_path / "bad.json")
    assert not Mirror(K, VIPS).load(tmp_path / "missing.json")


def test_the_factory_opens_an_etcd_registry_from_a_url(tmp_path: Path) -> None:
    from meshnode.discovery.factory import open_registry

    reg = open_registry("etcd://127.0.0.1:1,127.0.0.1:2/t/", tmp_path, "node-1")
    assert isinstance(reg, EtcdRegistry)
    d = reg.describe()
    assert d["backend"] == "etcd" and d["endpoints"] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert d["prefix"] == "/t/" and d["connected"] is False and d["node"] == "node-1"
    assert reg.cache_path == tmp_path / "etcd-cache.json"
    with pytest.raises(ConfigError):
        EtcdRegistry.from_url("etcd://a:1", node="bad/name")
