"""The embedded registry and the rules every store shares (plan, VIPs, patch): resources with
versions, compare-and-swap, atomic applies, history, VIPs and endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from functools import wraps
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode.discovery import embedded
from meshnode.discovery.embedded import EmbeddedRegistry
from meshnode.discovery.registry import EndpointRecord, patch_service
from meshnode.errors import ConflictError, NotFoundError, RegistryError, UsageError
from meshnode.model import Add, CaptureRule, DoesNotExist, Endpoint, HostPort, Remove, Reset
from meshnode.policy import compiler
from meshnode.policy.document import parse
from meshnode.policy.store import HISTORY_DEPTH, Delete
from tests.unit.test_statefile import full_tmpfs, root_only

__all__ = ["full_tmpfs"]  # a fixture, used by name


def run(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))
    return wrapper


def ep(text: str, source: str = "static") -> EndpointRecord:
    return EndpointRecord(HostPort.parse(text), source)


def svc(name: str, version: int = 0, **spec: Any) -> Any:
    return parse({"kind": "Service", "name": name, "spec": spec, "version": version})


@run
async def test_vips_are_unique_loopback_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    r = EmbeddedRegistry(path)
    await r.apply([svc("a", port=80), svc("b")])
    a, b = r.services()["a"], r.services()["b"]
    assert a.vip == IPv4Address("127.240.0.1") and b.vip == IPv4Address("127.240.0.2")
    assert a.id == 1 and b.id == 2  # the VIP's offset: the same scheme as etcd
    await r.add_endpoints("a", [ep("127.0.0.1:8001"), ep("127.0.0.1:8002")])
    again = EmbeddedRegistry(path).services()
    assert again["a"].vip == a.vip and again["a"].port == 80 and again["a"].id == a.id
    assert again["a"].version == a.version
    assert {str(e.addr) for e in again["a"].endpoints} == {"127.0.0.1:8001", "127.0.0.1:8002"}
    await r.apply([], [Delete("Service", "a")])
    c = EmbeddedRegistry(path)
    await c.apply([svc("c")])
    assert c.services()["c"].vip == a.vip  # freed VIPs are reused


@run
async def test_vip_range_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json", vip_cidr="127.240.0.0/30")
    await r.apply([svc("a"), svc("b")])
    with pytest.raises(RegistryError, match="no free VIP"):
        await r.apply([svc("c")])


@run
async def test_pinned_vips_are_kept_and_never_shared(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    await r.apply([svc("a"), svc("b", vip="127.240.0.1")])  # b pins what a would take
    assert r.services()["b"].vip == IPv4Address("127.240.0.1")
    assert r.services()["a"].vip == IPv4Address("127.240.0.2")
    with pytest.raises(ConflictError, match="belongs to Service b"):
        await r.apply([svc("c", vip="127.240.0.1")])
    with pytest.raises(UsageError, match=r"outside 127\.240\.0\.0/16"):
        await r.apply([svc("c", vip="10.0.0.1")])
    assert "c" not in r.services()


@run
async def test_writes_are_compare_and_swap(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    [created] = await r.apply([svc("web", port=80)])
    assert created.action == "created" and created.version == r.revision()
    [same] = await r.apply([svc("web", port=80)])
    assert same.action == "unchanged" and same.version == created.version
    [changed] = await r.apply([svc("web", created.version, port=81)])
    assert changed.action == "configured" and changed.version > created.version
    # a writer that read version `created` loses, with a message that says what to do
    with pytest.raises(ConflictError, match=f"changed since version {created.version}"):
        await r.apply([svc("web", created.version, port=82)])
    assert r.services()["web"].port == 81
    with pytest.raises(ConflictError):
        await r.apply([], [Delete("Service", "web", created.version)])


@run
async def test_a_multi_document_apply_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    r = EmbeddedRegistry(path)
    await r.apply([svc("a", port=80)])
    before, rev = r.journal.read_bytes(), r.revision()
    stale = svc("a", 999, port=81)  # a conflict in the last document
    with pytest.raises(ConflictError):
        await r.apply([svc("b"), svc("c"), stale])
    assert set(r.services()) == {"a"} and r.revision() == rev
    assert r.journal.read_bytes() == before


@root_only
def test_a_full_disk_changes_nothing_and_loses_nothing(full_tmpfs: Path) -> None:
    async def go() -> None:
        (full_tmpfs / "filler").unlink()
        path = full_tmpfs / "r.json"
        r = EmbeddedRegistry(path)
        await r.apply([svc("a")])
        ballast = full_tmpfs / "ballast"
        with open(ballast, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 512)
        rev = r.revision()
        big = svc("b", ports=[{"port": p} for p in range(1000, 1300)])  # more than a page
        with pytest.raises(RegistryError, match="cannot write the registry journal") as exc:
            await r.apply([big])
        assert "nothing was changed" in exc.value.hint
        assert set(r.services()) == {"a"} and r.revision() == rev
        ballast.unlink()
        await r.apply([svc("c")])  # the journal is whole again: later writes land
        assert set(EmbeddedRegistry(path).services()) == {"a", "c"}
    asyncio.run(go())


@run
async def test_the_journal_is_folded_into_a_snapshot_and_a_torn_line_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "COMPACT_MIN", 2000)
    path = tmp_path / "r.json"
    r = EmbeddedRegistry(path)
    for i in range(30):
        await r.apply([svc(f"s{i}", port=80)])
        await r.add_endpoints(f"s{i}", [ep(f"127.0.0.1:{9000 + i}")])
    # folded into the snapshot whenever it outgrew it, then started over
    assert path.exists() and r.journal.stat().st_size <= max(2000, path.stat().st_size) + 400
    with open(r.journal, "ab") as f:
        f.write(b'{"revision": 99999, "ops": [{"put"')  # a crash mid-append
    again = EmbeddedRegistry(path)
    assert again.services() == r.services() and again.revision() == r.revision()
    await again.apply([svc("after")])  # appends after the torn line is cut away
    assert "after" in EmbeddedRegistry(path).services()


@run
async def test_history_keeps_the_last_versions_and_deletions(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    for port in range(1, HISTORY_DEPTH + 3):
        await r.apply([svc("web", port=port)])
    await r.apply([], [Delete("Service", "web")])
    h = await r.history("Service", "web")
    assert len(h) == HISTORY_DEPTH
    assert h[-1].spec is None  # the deletion is a version too
    assert [e.spec["port"] for e in h[:-1] if e.spec] == list(range(4, HISTORY_DEPTH + 3))
    assert h == await EmbeddedRegistry(tmp_path / "r.json").history("Service", "web")


@run
async def test_an_endpoint_belongs_to_one_service(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    await r.apply([svc("a"), svc("b")])
    await r.add_endpoints("a", [ep("127.0.0.1:9000")])
    with pytest.raises(ConflictError, match="already belongs to service 'a'"):
        await r.add_endpoints("b", [ep("127.0.0.1:9000")])


@run
async def test_bad_names_and_missing_services(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    for bad in ("", "Web", "-a", "a_b", "x" * 64):
        with pytest.raises(UsageError):
            await patch_service(r, bad, {})
    with pytest.raises(NotFoundError):
        await r.add_endpoints("nope", [ep("127.0.0.1:1")])
    with pytest.raises(NotFoundError):
        await r.apply([], [Delete("Service", "nope")])


@run
async def test_patches_merge_fields_over_the_stored_version(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    await patch_service(r, "web", {"port": 80, "health": {"interval": 2.0}})
    # two operators change different fields at once: neither change is lost
    await asyncio.gather(patch_service(r, "web", {"balancer": {"algorithm": "ring-hash"}}),
                         patch_service(r, "web", {"failMode": "closed"}))
    web = r.services()["web"]
    assert web.port == 80 and web.lb.algorithm == "ring-hash" and web.fail_closed
    assert web.health.interval == 2.0 and web.health.timeout == 1.0
    await patch_service(r, "web", {"health": {"interval": 0.5}})  # the timeout follows
    assert r.services()["web"].health.timeout == 0.5
    with pytest.raises(UsageError, match=r"spec\.outlier"):
        await patch_service(r, "web", {"outlier": {"maxEjectedShare": 2}})


@run
async def test_a_format_1_registry_file_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"next_id": 3, "services": [
        {"name": "web", "id": 1, "vip": "127.240.0.7", "port": 80, "fail_closed": True,
         "lb": {"algorithm": "ring-hash", "locality": False},
         "health": {"kind": "http", "path": "/ready", "interval": 5.0, "timeout": 1.0,
                    "healthy_threshold": 2, "unhealthy_threshold": 3},
         "endpoints": [{"addr": "127.0.0.1:8001", "source": "static"}]}]}))
    web = EmbeddedRegistry(path).services()["web"]
    assert (web.vip, web.port, web.fail_closed) == (IPv4Address("127.240.0.7"), 80, True)
    assert web.lb.algorithm == "ring-hash" and web.health.path == "/ready"
    assert {str(e.addr) for e in web.endpoints} == {"127.0.0.1:8001"}


@run
async def test_corrupt_registry_file_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(RegistryError) as exc:
        EmbeddedRegistry(path)
    assert "move the file away" in exc.value.hint


@run
async def test_listeners_hear_every_change(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    calls: list[int] = []
    r.subscribe(lambda: calls.append(1))
    await r.apply([svc("a")])
    await r.apply([svc("a")])  # no change, no call
    await r.add_endpoints("a", [ep("127.0.0.1:1")])
    await r.remove_endpoints("a", [HostPort.parse("127.0.0.1:1")])
    assert len(calls) == 3


@run
async def test_updates_diff_is_reset_add_remove_doesnotexist(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    await r.apply([svc("a"), svc("gone")])
    await r.add_endpoints("a", [ep("127.0.0.1:1")])
    old = compiler.snapshot(r.services())
    await r.add_endpoints("a", [ep("127.0.0.1:2")])
    await r.remove_endpoints("a", [HostPort.parse("127.0.0.1:1")])
    await r.apply([svc("new")], [Delete("Service", "gone")])
    out = compiler.diff(old, compiler.snapshot(r.services()))
    e2, e1 = Endpoint(HostPort.parse("127.0.0.1:2")), Endpoint(HostPort.parse("127.0.0.1:1"))
    assert out[0] == DoesNotExist("gone")
    assert Add("a", (e2,)) in out and Remove("a", (e1,)) in out
    assert any(isinstance(u, Reset) and u.service.name == "new" for u in out)
    # a changed port re-sends the whole service
    await r.apply([svc("a", port=81)])
    out = compiler.diff(compiler.snapshot(r.services()) | {"a": old["a"]},
                       compiler.snapshot(r.services()))
    assert [type(u) for u in out] == [Reset]


@run
async def test_capture_state_only_redirects_when_ready(tmp_path: Path) -> None:
    r = EmbeddedRegistry(tmp_path / "r.json")
    await r.apply([svc("a", failMode="closed")])
    a = r.services()["a"]
    await r.add_endpoints("a", [ep("127.0.0.1:7")])
    st = compiler.capture_state(r.services(), ready=False)
    assert st.rules == {CaptureRule(a.vip, 0, a.id),
                        CaptureRule(IPv4Address("127.0.0.1"), 7, a.id)}
    assert st.redirected() == []
    assert len(st.refused()) == 2  # fail-closed and not ready: refuse
    st = compiler.capture_state(r.services(), ready=True)
    assert len(st.redirected()) == 2 and st.refused() == []
