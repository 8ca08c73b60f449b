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
    KeyLayout,
    ServiceKey,
    VipKey,
    VipRange,
    check_node,
    decode_endpoint,
    decode_service,
    encode_endpoint,
    encode_service,
    parse_url,
    prefix_end,
)
from meshnode.discovery.etcd_mirror import Mirror
from meshnode.discovery.registry import EndpointRecord, ServiceRecord
from meshnode.errors import ConfigError, RegistryError
from meshnode.model import BalancerConfig, HealthConfig, HostPort

K = KeyLayout()
WEB = ServiceRecord("web", 1, IPv4Address("127.240.0.1"), 80, True,
                    BalancerConfig("ring-hash"), health=HealthConfig("http", "/ready"))
A1 = HostPort.parse("10.0.0.1:80")


def ep(addr: str, node: str = "a") -> EndpointRecord:
    return EndpointRecord(HostPort.parse(addr), "process", 42, node, "z1", 2)


def test_key_layout_and_parse_round_trip() -> None:
    assert K.service("web") == b"/meshnode/services/web"
    assert K.vip(IPv4Address("127.240.0.7")) == b"/meshnode/vips/127.240.0.7"
    assert K.endpoint("web", "host-1", A1) == b"/meshnode/endpoints/web/host-1/10.0.0.1:80"
    assert K.claim(A1, "web", "host-1") == b"/meshnode/addrs/10.0.0.1:80/web/host-1"
    assert K.parse(K.service("web")) == ServiceKey("web")
    assert K.parse(K.vip(IPv4Address("127.240.0.7"))) == VipKey(IPv4Address("127.240.0.7"))
    assert K.parse(K.endpoint("web", "host-1", A1)) == EndpointKey("web", "host-1", A1)
    assert K.parse(K.claim(A1, "web", "host-1")) == ClaimKey(A1, "web", "host-1")
    # other prefixes, policies, newer kinds and malformed keys are not ours to interpret
    for key in (b"/other/services/web", b"/meshnode/policies/web", b"/meshnode/new/x",
                b"/meshnode/endpoints/web/a/not-an-addr", b"/meshnode/vips/300.1.1.1",
                b"/meshnode/services/", b"/meshnode/endpoints/web/a/10.0.0.1:0", b"\xff"):
        assert K.parse(key) is None, key
    assert KeyLayout("/t1/").service("x") == b"/t1/services/x"
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
    assert decode_service(encode_service(WEB)) == WEB
    with_eps = ServiceRecord("x", 2, IPv4Address("127.240.0.2"), endpoints=frozenset({ep(
        "10.0.0.2:1")}))
    assert "endpoints" not in json.loads(encode_service(with_eps))  # they have keys of their own
    assert decode_endpoint(encode_endpoint(ep("10.0.0.1:80"))) == ep("10.0.0.1:80")
    for bad in (b"{", b"[]", b'{"name": "x"}'):
        with pytest.raises(RegistryError):
            decode_service(bad)
    with pytest.raises(RegistryError):
        decode_endpoint(b'{"addr": "nope"}')


def test_service_ids_are_vip_offsets_and_vips_run_out_clearly() -> None:
    r = VipRange()
    assert r.id_of(IPv4Address("127.240.0.1")) == 1
    assert r.id_of(IPv4Address("127.240.1.0")) == 256
    assert r.id_of(IPv4Address("127.240.255.254")) == 65534
    with pytest.raises(RegistryError):
        r.id_of(IPv4Address("127.241.0.1"))
    assert r.first_free([IPv4Address("127.240.0.1"), IPv4Address("127.240.0.3")]) == \
        IPv4Address("127.240.0.2")
    small = VipRange("127.240.0.0/30")
    with pytest.raises(RegistryError, match="no free VIP"):
        small.first_free(small.net.hosts())


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
    m = Mirror(K)
    m.reset([(K.service("web"), encode_service(WEB), 5, 0),
             (K.endpoint("web", "a", A1), encode_endpoint(ep("10.0.0.1:80")), 6, 77),
             (K.vip(WEB.vip), b"web", 5, 0), (K.claim(A1, "web", "a"), b"", 6, 77)], 10)
    return m


def test_mirror_reset_builds_records_and_replaces_everything() -> None:
    m = _mirror_with_web()
    assert m.revision == 10
    assert m.services()["web"].endpoints == {ep("10.0.0.1:80")}
    assert m.endpoints_of_node("a") == {("web", "a", A1): (ep("10.0.0.1:80"), 77)}
    m.reset([(K.service("web"), encode_service(WEB), 5, 0)], 20)  # the endpoint went away
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
    m = Mirror(K)
    m.reset([(K.endpoint("gone", "a", A1), encode_endpoint(ep("10.0.0.1:80")), 3, 7),
             (K.service("bad"), b"{", 4, 0)], 5)
    assert m.services() == {}  # an endpoint without its service, a service that won't parse
    m.put(K.service("gone"), encode_service(ServiceRecord("gone", 9, IPv4Address(
        "127.240.0.9"))), 6, 0)
    assert m.services()["gone"].endpoints == {ep("10.0.0.1:80")}


def test_mirror_cache_round_trip(tmp_path: Path) -> None:
    m = _mirror_with_web()
    m.save(tmp_path / "cache.json")
    again = Mirror(K)
    assert again.load(tmp_path / "cache.json")
    assert again.services() == m.services() and again.revision == 10
    assert not Mirror(KeyLayout("/other/")).load(tmp_path / "cache.json")  # another prefix
    (tmp_path / "bad.json").write_text("{")
    assert not Mirror(K).load(tmp_path / "bad.json")
    assert not Mirror(K).load(tmp_path / "missing.json")


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
