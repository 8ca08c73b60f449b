from __future__ import annotations

import asyncio
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


async def _test_vips_are_unique_loopback_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    r = EmbeddedRegistry(path)
    a = await r.ensure_service("a", port=80)
    b = await r.ensure_service("b")
    assert a.vip == IPv4Address("127.240.0.1") and b.vip == IPv4Address("127.240.0.2")
    await r.add_endpoints("a", [ep("127.0.0.1:8001"), ep("127.0.0.1:8002")])
    again = EmbeddedRegistry(path).services()
    assert again["a"].vip == a.vip and again["a"].port == 80 and again["a"].id == a.id
    assert {str(e.addr) for e in again["a"].endpoints} == {"127.0.0.1:8001", "127.0.0.1:8002"}
    await r.remove_service("a")
    c = await EmbeddedRegistry(path).ensure_service("c")
    assert c.vip == a.vip  # freed VIPs are reused
    assert c.id not in (a.id, b.id)  # ids never are: a stale kernel entry cannot alias


def test_vips_are_unique_loopback_and_survive_a_restart(tmp_path: Path) -> None:
    asyncio.run(_test_vips_are_unique_loopback_and_survive_a_restart(tmp_path))

async def _test_vip_range_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json", vip_cidr="127.240.0.0/30")
    await r.ensure_service("a")
    await r.ensure_service("b")
    with pytest.raises(RegistryError, match="no free VIP"):
        await r.ensure_service("c")


def test_vip_range_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    asyncio.run(_test_vip_range_exhaustion_is_a_clear_error(tmp_path))

async def _test_an_endpoint_belongs_to_one_service(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    await r.ensure_service("a")
    await r.ensure_service("b")
    await r.add_endpoints("a", [ep("127.0.0.1:9000")])
    with pytest.raises(ConflictError, match="already belongs to service 'a'"):
        await r.add_endpoints("b", [ep("127.0.0.1:9000")])


def test_an_endpoint_belongs_to_one_service(tmp_path: Path) -> None:
    asyncio.run(_test_an_endpoint_belongs_to_one_service(tmp_path))

async def _test_bad_names_and_missing_services(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    for bad in ("", "Web", "-a", "a_b", "x" * 64):
        with pytest.raises(UsageError):
            await r.ensure_service(bad)
    with pytest.raises(NotFoundError):
        await r.add_endpoints("nope", [ep("127.0.0.1:1")])
    with pytest.raises(NotFoundError):
        await r.remove_service("nope")


def test_bad_names_and_missing_services(tmp_path: Path) -> None:
    asyncio.run(_test_bad_names_and_missing_services(tmp_path))

async def _test_corrupt_registry_file_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(RegistryError) as exc:
        EmbeddedRegistry(path)
    assert "move the file away" in exc.value.hint


def test_corrupt_registry_file_names_the_fix(tmp_path: Path) -> None:
    asyncio.run(_test_corrupt_registry_file_names_the_fix(tmp_path))

async def _test_listeners_hear_every_change(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    calls: list[int] = []
    r.subscribe(lambda: calls.append(1))
    await r.ensure_service("a")
    await r.ensure_service("a")  # no change, no call
    await r.add_endpoints("a", [ep("127.0.0.1:1")])
    await r.remove_endpoints("a", [HostPort.parse("127.0.0.1:1")])
    assert len(calls) == 3


def test_listeners_hear_every_change(tmp_path: Path) -> None:
    asyncio.run(_test_listeners_hear_every_change(tmp_path))

async def _test_updates_diff_is_reset_add_remove_doesnotexist(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    await r.ensure_service("a")
    await r.add_endpoints("a", [ep("127.0.0.1:1")])
    await r.ensure_service("gone")
    old = updates.snapshot(r.services())
    await r.add_endpoints("a", [ep("127.0.0.1:2")])
    await r.remove_endpoints("a", [HostPort.parse("127.0.0.1:1")])
    await r.remove_service("gone")
    await r.ensure_service("new")
    out = updates.diff(old, updates.snapshot(r.services()))
    e2, e1 = Endpoint(HostPort.parse("127.0.0.1:2")), Endpoint(HostPort.parse("127.0.0.1:1"))
    assert out[0] == DoesNotExist("gone")
    assert Add("a", (e2,)) in out and Remove("a", (e1,)) in out
    assert any(isinstance(u, Reset) and u.service.name == "new" for u in out)
    # a changed port re-sends the whole service
    await r.ensure_service("a", port=81)
    out = updates.diff(updates.snapshot(r.services()) | {"a": old["a"]},
                       updates.snapshot(r.services()))
    assert [type(u) for u in out] == [Reset]


def test_updates_diff_is_reset_add_remove_doesnotexist(tmp_path: Path) -> None:
    asyncio.run(_test_updates_diff_is_reset_add_remove_doesnotexist(tmp_path))

async def _test_capture_state_only_redirects_when_ready(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    a = await r.ensure_service("a", fail_closed=True)
    await r.add_endpoints("a", [ep("127.0.0.1:7")])
    st = updates.capture_state(r.services(), ready=False)
    assert st.rules == {CaptureRule(a.vip, 0, a.id),
                        CaptureRule(IPv4Address("127.0.0.1"), 7, a.id)}
    assert st.redirected() == []
    assert len(st.refused()) == 2  # fail-closed and not ready: refuse
    st = updates.capture_state(r.services(), ready=True)
    assert len(st.redirected()) == 2 and st.refused() == []


def test_capture_state_only_redirects_when_ready(tmp_path: Path) -> None:
    asyncio.run(_test_capture_state_only_redirects_when_ready(tmp_path))
