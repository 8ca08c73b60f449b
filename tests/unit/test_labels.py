"""Endpoint labels and subsets: the label rules, labels kept by the registry records, the wire
and the compiler, and `ServiceTable.route_backend` (which endpoints a subset picks, the reason
when none, one balancer per candidate set). Apply-time warnings for Routes naming a subset
nobody carries."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode.agent.enrollment import Enrollment
from meshnode.agent.resources_api import ResourceApi
from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.discovery.registry import EndpointRecord, patch_service
from meshnode.errors import UsageError
from meshnode.model import (
    Add,
    BalancerConfig,
    Endpoint,
    HostPort,
    Labels,
    Remove,
    Reset,
    ServiceSpec,
)
from meshnode.policy import compiler
from meshnode.policy.labels import (
    LabelError,
    carries,
    format_labels,
    labels_from,
    parse_label,
    parse_labels,
    subset_warnings,
)
from meshnode.route import NoEndpoint, ServiceTable, ToService
from meshnode.wire import agent_codec, as_update, encode, update_message
from tests.etcd_cluster import EtcdCluster, etcd_available
from tests.unit.test_etcd_registry import agents, eventually

pytestmark = pytest.mark.timeout(30)

VIP = IPv4Address("127.240.0.7")
V1: Labels = (("version", "v1"),)
V2: Labels = (("version", "v2"),)


# -- the label rules ----------------------------------------------------------------------
@pytest.mark.parametrize("text, pair", [
    ("version=v2", ("version", "v2")),
    ("app.example.com/track=canary", ("app.example.com/track", "canary")),
    ("a=", ("a", "")),  # an empty value is a value (as in Kubernetes)
    ("Tier_1.x-y=Z.9_a-b", ("Tier_1.x-y", "Z.9_a-b")),
    ("k=" + "v" * 63, ("k", "v" * 63)),
])
def test_valid_labels(text: str, pair: tuple[str, str]) -> None:
    assert parse_label(text) == pair


@pytest.mark.parametrize("text, says", [
    ("version", "write it as KEY=VALUE"),
    ("=v2", "invalid label key ''"),
    ("-x=1", "invalid label key '-x'"),
    ("x-=1", "invalid label key 'x-'"),
    ("k" * 64 + "=1", "invalid label key"),
    ("a b=1", "invalid label key 'a b'"),
    ("Example.COM/x=1", "prefix 'Example.COM' is not a DNS name"),
    ("/x=1", "prefix '' is not a DNS name"),
    ("a.b/=1", "invalid label key 'a.b/'"),
    ("version=v 2", "invalid value 'v 2' of label version"),
    ("version=-v2", "invalid value '-v2'"),
    ("version=" + "v" * 64, "invalid value"),
    ("version=v2\n", "invalid value"),  # fullmatch: no trailing newline slips through
])
def test_invalid_labels_name_the_fix(text: str, says: str) -> None:
    with pytest.raises(LabelError) as err:
        parse_label(text)
    assert says in str(err.value), str(err.value)
    assert err.value.hint and "\n" not in str(err.value)
    # one error for both worlds: the CLI's (exit 64) and a msgspec __post_init__'s
    assert isinstance(err.value, UsageError) and isinstance(err.value, ValueError)
    assert err.value.exit_code == 64


def test_labels_are_canonical_sorted_pairs() -> None:
    assert parse_labels(["zone=b", "app=web", "app=web"]) == (("app", "web"), ("zone", "b"))
    assert labels_from({"z": "1", "a": "2"}) == (("a", "2"), ("z", "1"))
    assert labels_from([]) == ()
    with pytest.raises(LabelError, match="label app is given twice"):
        parse_labels(["app=web", "app=api"])
    assert format_labels((("app", "web"), ("version", "v2"))) == "app=web,version=v2"


def test_carries_every_pair_of_the_subset() -> None:
    labels = (("app", "web"), ("version", "v2"))
    assert carries(labels, ()) and carries(labels, V2) and carries(labels, labels)
    assert not carries(labels, V1) and not carries((), V2)
    assert not carries(V2, labels)


def test_endpoints_with_labels_stay_hashable_and_sortable() -> None:
    a = Endpoint(HostPort.parse("10.0.0.1:80"), labels=V2)
    b = Endpoint(HostPort.parse("10.0.0.1:80"), labels=V1)
    assert a != b and len({a, b, Endpoint(HostPort.parse("10.0.0.1:80"), labels=V2)}) == 2
    assert sorted([a, b]) == [b, a]
    assert Endpoint(HostPort.parse("10.0.0.1:80")).labels == ()


# -- records, the registry, the wire, the compiler ------------------------------------------
def test_endpoint_record_keeps_labels_and_reads_records_without_them() -> None:
    rec = EndpointRecord(HostPort.parse("127.0.0.1:8001"), "process", 42, "n1", "z1", 2,
                         labels=(("app", "web"), ("version", "v2")))
    stored = rec.to_json()
    assert stored["labels"] == {"app": "web", "version": "v2"}
    assert EndpointRecord.from_json(json.loads(json.dumps(stored))) == rec
    assert rec.endpoint.labels == rec.labels
    # a record written before labels existed (and one without labels: no key is written)
    old = {"addr": "127.0.0.1:8001", "source": "static", "pid": None, "node": "n1",
           "zone": "", "weight": 1}
    assert EndpointRecord.from_json(old).labels == ()
    assert "labels" not in EndpointRecord.from_json(old).to_json()
    with pytest.raises(LabelError):
        EndpointRecord.from_json({**old, "labels": {"version": "v 2"}})
    with pytest.raises(LabelError):
        EndpointRecord.from_json({**old, "labels": ["version=v2"]})


def test_embedded_registry_keeps_labels_across_a_restart_and_relabels(tmp_path: Path) -> None:
    async def go() -> None:
        path = tmp_path / "registry.json"
        reg = EmbeddedRegistry(path)
        await patch_service(reg, "reviews", {})
        one, two = HostPort.parse("127.0.0.1:9001"), HostPort.parse("127.0.0.1:9002")
        await reg.add_endpoints("reviews", [EndpointRecord(one, "static", labels=V1),
                                            EndpointRecord(two, "static", labels=V2)])
        again = EmbeddedRegistry(path).services()["reviews"]
        assert {(str(e.addr), e.labels) for e in again.endpoints} == {
            ("127.0.0.1:9001", V1), ("127.0.0.1:9002", V2)}
        # the same address with other labels replaces the record (one per address)
        await reg.add_endpoints("reviews", [EndpointRecord(one, "static", labels=V2)])
        assert {e.labels for e in EmbeddedRegistry(path).services()["reviews"].endpoints} == {
            V2}

    asyncio.run(go())


def test_a_label_change_reaches_the_workers_as_remove_then_add(tmp_path: Path) -> None:
    async def go() -> None:
        reg = EmbeddedRegistry(tmp_path / "r.json")
        await patch_service(reg, "reviews", {})
        addr = HostPort.parse("127.0.0.1:9001")
        await reg.add_endpoints("reviews", [EndpointRecord(addr, "static", labels=V1)])
        c = compiler.Compiler()
        c.run(reg.services(), lambda *_: True)
        await reg.add_endpoints("reviews", [EndpointRecord(addr, "static", labels=V2)])
        out = c.run(reg.services(), lambda *_: True)
        assert out.updates == [Remove("reviews", (Endpoint(addr, labels=V1),)),
                               Add("reviews", (Endpoint(addr, labels=V2),))]
        # and through the worker channel, labels arrive as hashable tuples
        for update in out.updates:
            back = as_update(agent_codec().decode(encode(update_message(update))))  # type: ignore[arg-type]
            assert back == update and hash(back.endpoints[0])  # type: ignore[union-attr]

    asyncio.run(go())


@pytest.mark.skipif(not etcd_available(), reason="needs etcd and etcdctl")
def test_labels_travel_through_etcd_to_another_agent(tmp_path: Path) -> None:
    async def go(etcd: EtcdCluster) -> None:
        async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
            await patch_service(a, "reviews", {})
            addr = HostPort.parse("10.1.0.1:8080")
            await a.add_endpoints("reviews", [EndpointRecord(addr, "process", 7, labels=V1)])

            def labels_at_b() -> set[Labels]:
                rec = b.services().get("reviews")
                return set() if rec is None else {e.labels for e in rec.endpoints}

            await eventually(lambda: labels_at_b() == {V1}, 5, "v1 at b")
            await a.add_endpoints("reviews", [EndpointRecord(addr, "process", 7, labels=V2)])
            await eventually(lambda: labels_at_b() == {V2}, 5, "relabelled v2 at b")

    with EtcdCluster(tmp_path / "etcd", members=1) as cluster:
        cluster.start()
        asyncio.run(go(cluster))


def test_an_old_agents_endpoint_message_decodes_without_labels() -> None:
    line = (b'{"t":"add","service":"web","endpoints":[{"addr":{"ip":"127.0.0.1","port":80},'
            b'"node":"","zone":"","weight":1}]}\n')
    update = as_update(agent_codec().decode(line))  # type: ignore[arg-type]
    assert update == Add("web", (Endpoint(HostPort.parse("127.0.0.1:80")),))


def test_enrollment_records_keep_labels_and_read_old_ones() -> None:
    e = Enrollment(7, 1.5, "reviews", "/sys/fs/cgroup", {HostPort.parse("127.0.0.1:9001")},
                   labels=V2)
    assert e.to_json()["labels"] == {"version": "v2"}
    assert Enrollment.from_json(json.loads(json.dumps(e.to_json()))) == e
    old = {k: v for k, v in e.to_json().items() if k != "labels"}
    assert Enrollment.from_json(old).labels == ()


# -- subset routing -------------------------------------------------------------------------
def ep(text: str, labels: Labels = ()) -> Endpoint:
    return Endpoint(HostPort.parse(text), labels=labels)


def spec(port: int | None = None, lb: str = "round-robin") -> ServiceSpec:
    return ServiceSpec.build("reviews", 7, VIP, port, lb=BalancerConfig(lb))  # type: ignore[arg-type]


def attempts(route: object) -> list[str]:
    assert isinstance(route, ToService), route
    return [str(e.addr) for e in route.attempts]


def reviews(port: int | None = None) -> ServiceTable:
    t = ServiceTable()
    t.apply(Reset(spec(port), (
        ep("10.0.0.1:8080", V1), ep("10.0.0.2:8080", V2), ep("10.0.0.3:8080", V2),
        ep("10.0.0.4:9090", (("track", "canary"), ("version", "v2"))), ep("10.0.0.5:8080"))))
    return t


def test_a_subset_picks_the_endpoints_carrying_every_label() -> None:
    t = reviews()
    assert attempts(t.route_backend("reviews", 8080, V1)) == ["10.0.0.1:8080"]
    assert sorted(attempts(t.route_backend("reviews", 8080, V2))) == ["10.0.0.2:8080",
                                                                      "10.0.0.3:8080"]
    # on the port dialled unless the backend names one
    assert attempts(t.route_backend("reviews", 8080, V2, port=9090)) == ["10.0.0.4:9090"]
    canary = (("track", "canary"), ("version", "v2"))
    assert attempts(t.route_backend("reviews", 8080, canary, port=9090)) == ["10.0.0.4:9090"]
    # no subset: every endpoint on the port, labelled or not
    assert sorted(attempts(t.route_backend("reviews", 8080))) == [
        "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.5:8080"]


def test_a_service_port_reaches_every_endpoint_unless_the_backend_names_a_port() -> None:
    t = reviews(port=80)
    assert sorted(attempts(t.route_backend("reviews", 80, V2))) == [
        "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:9090"]
    assert sorted(attempts(t.route_backend("reviews", 12345, V2))) == [
        "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:9090"]
    assert attempts(t.route_backend("reviews", 80, V2, port=9090)) == ["10.0.0.4:9090"]


def test_no_endpoint_says_exactly_why() -> None:
    t = reviews()
    v3 = (("version", "v3"),)
    assert t.route_backend("reviews", 8080, v3) == NoEndpoint(
        "reviews", "no endpoint of reviews carries version=v3")
    assert t.route_backend("reviews", 8080, (("track", "canary"),)) == NoEndpoint(
        "reviews", "no endpoint of reviews on port 8080 carries track=canary")
    assert t.route_backend("reviews", 8080, V1, port=7000) == NoEndpoint(
        "reviews", "reviews has no endpoint on port 7000")
    assert t.route_backend("ratings", 8080, V1) == NoEndpoint("ratings",
                                                              "no service named ratings")
    empty = ServiceTable()
    empty.apply(Reset(spec(80), ()))
    assert empty.route_backend("reviews", 80) == NoEndpoint("reviews",
                                                            "reviews has no endpoints")


def test_each_subset_rotates_on_its_own_balancer() -> None:
    t = reviews()
    first = t.route_backend("reviews", 8080, V2)
    assert isinstance(first, ToService)
    assert attempts(first) == ["10.0.0.2:8080", "10.0.0.3:8080"]
    t.route_backend("reviews", 8080, V1)  # another subset's turn does not move this one's
    t.route(HostPort(VIP, 8080))  # nor does the whole port set's
    second = t.route_backend("reviews", 8080, V2)
    assert attempts(second) == ["10.0.0.3:8080", "10.0.0.2:8080"]
    assert isinstance(second, ToService) and second.balancer is first.balancer
    v1 = t.route_backend("reviews", 8080, V1)
    assert isinstance(v1, ToService) and v1.balancer is not first.balancer
    # no subset: the same set, and the same balancer, as routing by the VIP
    whole = t.route_backend("reviews", 8080)
    by_vip = t.route(HostPort(VIP, 8080))
    assert isinstance(whole, ToService) and isinstance(by_vip, ToService)
    assert whole.balancer is by_vip.balancer


def test_endpoint_changes_refresh_a_subset_and_keep_its_balancer() -> None:
    t = reviews()
    before = t.route_backend("reviews", 8080, V1)
    assert isinstance(before, ToService)
    t.apply(Add("reviews", (ep("10.0.0.6:8080", V1),)))
    after = t.route_backend("reviews", 8080, V1)
    assert sorted(attempts(after)) == ["10.0.0.1:8080", "10.0.0.6:8080"]
    assert isinstance(after, ToService) and after.balancer is before.balancer
    # relabelled (remove, then add): it leaves v1 and joins v2
    t.apply(Remove("reviews", (ep("10.0.0.1:8080", V1),)))
    t.apply(Add("reviews", (ep("10.0.0.1:8080", V2),)))
    assert attempts(t.route_backend("reviews", 8080, V1)) == ["10.0.0.6:8080"]
    assert "10.0.0.1:8080" in attempts(t.route_backend("reviews", 8080, V2))
    t.apply(Remove("reviews", (ep("10.0.0.6:8080", V1),)))
    assert t.route_backend("reviews", 8080, V1) == NoEndpoint(
        "reviews", "no endpoint of reviews carries version=v1")


def test_ejected_endpoints_are_left_out_of_a_subset_unless_none_would_remain() -> None:
    t = reviews()
    t.hold_ejections("reviews", {HostPort.parse("10.0.0.2:8080"): 30.0})
    for _ in range(3):
        assert attempts(t.route_backend("reviews", 8080, V2)) == ["10.0.0.3:8080"]
    t.hold_ejections("reviews", {HostPort.parse("10.0.0.1:8080"): 30.0})
    assert attempts(t.route_backend("reviews", 8080, V1)) == ["10.0.0.1:8080"]


def test_ring_hash_keys_a_subset_by_the_client() -> None:
    t = ServiceTable()
    t.apply(Reset(spec(lb="ring-hash"), tuple(ep(f"10.0.0.{i}:8080", V2) for i in range(1, 9))))
    firsts = {attempts(t.route_backend("reviews", 8080, V2, client=("10.1.2.3", 5555)))[0]
              for _ in range(5)}
    assert len(firsts) == 1


# -- apply-time warnings --------------------------------------------------------------------
def test_subset_warnings_name_the_route_and_why() -> None:
    labels = {"reviews": [V1, V2, ()], "idle": []}
    refs = [("reviews", V2), ("reviews", (("version", "v3"),)), ("reviews", ()),
            ("reviews", (("version", "v3"),)), ("idle", ()), ("gone", V1)]
    assert subset_warnings("Route r", refs, labels) == [
        "Route r: no endpoint of reviews carries version=v3; its requests get 503 until one "
        "does",
        "Route r: idle has no endpoints; its requests get 503 until one does",
        "Route r: no service named gone; its requests get 503 until one does"]


def route_doc(subset: dict[str, str], mirror: dict[str, Any] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": "canary",
                            "backends": [{"service": "reviews", "subset": subset}]}
    if mirror is not None:
        rule["mirror"] = mirror
    return {"kind": "Route", "name": "reviews", "spec": {"service": "reviews", "rules": [rule]}}


def test_apply_warns_of_a_subset_no_endpoint_carries(tmp_path: Path) -> None:
    async def go() -> None:
        reg = EmbeddedRegistry(tmp_path / "r.json")
        for name in ("reviews", "shadow"):
            await patch_service(reg, name, {"protocol": "http"})
        await reg.add_endpoints("reviews", [
            EndpointRecord(HostPort.parse("127.0.0.1:9001"), "static", labels=V1)])

        async def settle() -> None:
            pass

        api = ResourceApi(reg, settle)
        ok = await api.apply({"docs": [route_doc({"version": "v1"})]})
        assert ok["warnings"] == []
        r = await api.apply({"docs": [route_doc(
            {"version": "v3"}, {"service": "shadow", "subset": {"version": "v1"},
                                "percent": 10})]})
        assert [o["action"] for o in r["results"]] == ["configured"]  # accepted all the same
        assert r["warnings"] == [
            "Route reviews: no endpoint of reviews carries version=v3; its requests get 503 "
            "until one does",
            "Route reviews: shadow has no endpoints; its requests get 503 until one does"]
        # a Service apply says nothing of Routes
        assert (await api.apply({"docs": [{"kind": "Service", "name": "x", "spec": {}}]})
                )["warnings"] == []

    asyncio.run(go())


def test_a_bad_label_flag_fails_before_the_agent_is_asked(tmp_path: Path) -> None:
    env = {"MESHNODE_RUN_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "meshnode.cli", "enroll", "1", "--service", "web",
                        "--label", "version"], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 64, r.stderr  # not 69: no agent runs, and none was asked
    assert "invalid label 'version'" in r.stderr and "KEY=VALUE" in r.stderr
