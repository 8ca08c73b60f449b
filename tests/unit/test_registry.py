from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from meshnode.discovery import updates
from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.discovery.registry import EndpointRecord
from meshnode.errors import ConflictError, NotFoundError, RegistryError, UsageError
from meshnode.model import Add, CaptureRule, DoesNotExist, Endpoint, HostPort, Remove, Reset


def ep(text: str, source: str = "static") -> EndpointRecord:
    return EndpointRecord(HostPort.parse(text), source)


def test_vips_are_unique_loopback_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    r = EmbeddedRegistry(path)
    a = r.ensure_service("a", port=80)
    b = r.ensure_service("b")
    assert a.vip == IPv4Address("127.240.0.1") and b.vip == IPv4Address("127.240.0.2")
    r.add_endpoints("a", [ep("127.0.0.1:8001"), ep("127.0.0.1:8002")])
    again = EmbeddedRegistry(path).services()
    assert again["a"].vip == a.vip and again["a"].port == 80 and again["a"].id == a.id
    assert {str(e.addr) for e in again["a"].endpoints} == {"127.0.0.1:8001", "127.0.0.1:8002"}
    r.remove_service("a")
    c = EmbeddedRegistry(path).ensure_service("c")
    assert c.vip == a.vip  # freed VIPs are reused
    assert c.id not in (a.id, b.id)  # ids never are: a stale kernel entry cannot alias


def test_vip_range_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json", vip_cidr="127.240.0.0/30")
    r.ensure_service("a")
    r.ensure_service("b")
    with pytest.raises(RegistryError, match="no free VIP"):
        r.ensure_service("c")


def test_an_endpoint_belongs_to_one_service(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    r.ensure_service("a")
    r.ensure_service("b")
    r.add_endpoints("a", [ep("127.0.0.1:9000")])
    with pytest.raises(ConflictError, match="already belongs to service 'a'"):
        r.add_endpoints("b", [ep("127.0.0.1:9000")])


def test_bad_names_and_missing_services(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    for bad in ("", "Web", "-a", "a_b", "x" * 64):
        with pytest.raises(UsageError):
            r.ensure_service(bad)
    with pytest.raises(NotFoundError):
        r.add_endpoints("nope", [ep("127.0.0.1:1")])
    with pytest.raises(NotFoundError):
        r.remove_service("nope")


def test_corrupt_registry_file_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(RegistryError) as exc:
        EmbeddedRegistry(path)
    assert "move the file away" in exc.value.hint


def test_listeners_hear_every_change(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    calls: list[int] = []
    r.subscribe(lambda: calls.append(1))
    r.ensure_service("a")
    r.ensure_service("a")  # no change, no call
    r.add_endpoints("a", [ep("127.0.0.1:1")])
    r.remove_endpoints("a", [HostPort.parse("127.0.0.1:1")])
    assert len(calls) == 3


def test_updates_diff_is_reset_add_remove_doesnotexist(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    r.ensure_service("a")
    r.add_endpoints("a", [ep("127.0.0.1:1")])
    r.ensure_service("gone")
    old = updates.snapshot(r.services())
    r.add_endpoints("a", [ep("127.0.0.1:2")])
    r.remove_endpoints("a", [HostPort.parse("127.0.0.1:1")])
    r.remove_service("gone")
    r.ensure_service("new")
    out = updates.diff(old, updates.snapshot(r.services()))
    e2, e1 = Endpoint(HostPort.parse("127.0.0.1:2")), Endpoint(HostPort.parse("127.0.0.1:1"))
    assert out[0] == DoesNotExist("gone")
    assert Add("a", (e2,)) in out and Remove("a", (e1,)) in out
    assert any(isinstance(u, Reset) and u.service.name == "new" for u in out)
    # a changed port re-sends the whole service
    r.ensure_service("a", port=81)
    out = updates.diff(updates.snapshot(r.services()) | {"a": old["a"]},
                       updates.snapshot(r.services()))
    assert [type(u) for u in out] == [Reset]


def test_capture_state_only_redirects_when_ready(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    a = r.ensure_service("a", fail_closed=True)
    r.add_endpoints("a", [ep("127.0.0.1:7")])
    st = updates.capture_state(r.services(), ready=False)
    assert st.rules == {CaptureRule(a.vip, 0, a.id),
                        CaptureRule(IPv4Address("127.0.0.1"), 7, a.id)}
    assert st.redirected() == []
    assert len(st.refused()) == 2  # fail-closed and not ready: refuse
    st = updates.capture_state(r.services(), ready=True)
    assert len(st.redirected()) == 2 and st.refused() == []
