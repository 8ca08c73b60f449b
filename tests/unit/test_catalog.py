"""The read-only catalog without root: query parsing, the view, its indexes and blocking
queries (on a private asyncio loop), then the admin port's routing to it over real HTTP on
127.0.0.1 (port 0). The registry and the health checks are fakes the test changes itself."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Literal, TypeVar

import pytest

from meshnode.discovery.catalog import (
    DEFAULT_WAIT,
    MAX_WAIT,
    BlockingQuery,
    Catalog,
    parse_query,
)
from meshnode.discovery.registry import EndpointRecord, ServiceRecord
from meshnode.errors import UsageError
from meshnode.model import HealthConfig, HostPort, ServicePolicy
from meshnode.telemetry import admin
from meshnode.telemetry.admin import AdminServer

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(20):  # a hang fails the test instead of stalling the run
            return await coro

    return asyncio.run(bounded())


def ep(addr: str, node: str = "n1", zone: str = "z1", weight: int = 1) -> EndpointRecord:
    return EndpointRecord(HostPort.parse(addr), "static", None, node, zone, weight)


@dataclass
class Mesh:
    """The registry snapshot and health verdicts the catalog reads; tests edit them."""

    services: dict[str, ServiceRecord] = field(default_factory=dict)
    unhealthy: set[HostPort] = field(default_factory=set)

    def add(self, name: str, *endpoints: EndpointRecord, vip: str = "127.240.0.1",
            port: int | None = 80, checks: Literal["tcp", "http", "none"] = "tcp") -> None:
        old = self.services.get(name)
        self.services[name] = ServiceRecord(
            name, len(self.services) + 1, IPv4Address(vip),
            policy=ServicePolicy(port=port, health=HealthConfig(kind=checks)),
            endpoints=frozenset((old.endpoints if old else frozenset()) | set(endpoints)))

    def healthy(self, service: str, addr: HostPort) -> bool:
        return addr not in self.unhealthy

    def catalog(self) -> Catalog:
        return Catalog(lambda: self.services, self.healthy)


async def settle() -> None:
    """Let scheduled callbacks and woken tasks run (loop turns, not time)."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- query parameters ------------------------------------------------------------------------

@pytest.mark.parametrize("qs,expected", [
    ("", BlockingQuery(None, DEFAULT_WAIT)),
    ("index=7", BlockingQuery(7, DEFAULT_WAIT)),  # Consul's default wait: 5 minutes
    ("index=7&wait=30s", BlockingQuery(7, 30.0)),
    ("index=0&wait=250ms", BlockingQuery(0, 0.25)),
    ("wait=2m&index=3", BlockingQuery(3, 120.0)),
    ("index=3&wait=1.5", BlockingQuery(3, 1.5)),  # a bare number is seconds
    ("index=3&wait=90m", BlockingQuery(3, MAX_WAIT)),  # capped at 10 minutes
])
def test_blocking_query_parameters(qs: str, expected: BlockingQuery) -> None:
    assert parse_query(qs) == expected


@pytest.mark.parametrize("qs,message", [
    ("index=-1", "index must be a whole number, not '-1'"),
    ("index=abc", "index must be a whole number, not 'abc'"),
    ("index=", "index must be a whole number, not ''"),
    ("index=1&wait=soon", "wait must be a duration, not 'soon'"),
    ("index=1&wait=-5s", "wait must be a duration, not '-5s'"),
    ("index=1&wait=1h", "wait must be a duration, not '1h'"),
    ("index=1&index=2", "index is given 2 times"),
    ("idx=1", "unknown query parameter 'idx'"),
])
def test_bad_parameters_are_usage_errors_naming_the_fix(qs: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_query(qs)
    assert err.value.message == message and err.value.hint


# -- the view and its indexes ----------------------------------------------------------------

def test_the_catalog_shows_endpoints_with_node_zone_weight_and_health() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8002", "n2", "z2", 3), ep("127.0.0.1:8001"))
    mesh.add("db", ep("198.18.0.5:5432"), vip="127.240.0.2", port=None, checks="none")
    mesh.unhealthy.add(HostPort.parse("127.0.0.1:8002"))
    cat = mesh.catalog()
    services = cat.answer(None)
    assert services.index == 1
    assert services.body == {
        "db": {"vip": "127.240.0.2", "port": None, "endpoints": 1, "healthy": 1},
        "web": {"vip": "127.240.0.1", "port": 80, "endpoints": 2, "healthy": 1}}
    web = cat.answer("web")
    assert web.index == 1
    assert web.body == {"name": "web", "vip": "127.240.0.1", "port": 80, "health_check": "tcp",
                        "endpoints": [
                            {"address": "127.0.0.1", "port": 8001, "node": "n1", "zone": "z1",
                             "weight": 1, "health": "healthy", "labels": {}},
                            {"address": "127.0.0.1", "port": 8002, "node": "n2", "zone": "z2",
                             "weight": 3, "health": "unhealthy", "labels": {}}]}
    assert cat.answer("nope").body is None


def test_each_url_moves_its_index_only_when_its_answer_changes() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))
    mesh.add("db", ep("127.0.0.1:5432"), vip="127.240.0.2")
    cat = mesh.catalog()
    assert (cat.answer(None).index, cat.answer("web").index, cat.answer("db").index) == (1, 1, 1)

    cat.changed()  # nothing the catalog shows changed (a probe's reason text, say)
    assert cat.answer("web").index == 1 and cat.index == 1

    mesh.add("web", ep("127.0.0.1:8002"))
    cat.changed()
    assert cat.answer("web").index == 2 and cat.answer(None).index == 2
    assert cat.answer("db").index == 1  # a client watching db is not woken by web

    mesh.unhealthy.add(HostPort.parse("127.0.0.1:8002"))  # a health verdict flips
    cat.changed()  # a registry change elsewhere: web's record is the same, so is its entry
    assert cat.answer("web").index == 2
    cat.health_changed()
    assert cat.answer("web").index == 3 and cat.answer(None).index == 3

    del mesh.services["web"]
    cat.changed()
    gone = cat.answer("web")
    assert gone.body is None and gone.index == 4  # an unknown service has the list's index
    assert cat.answer("db").index == 1


# -- blocking queries ------------------------------------------------------------------------

def test_a_blocking_query_returns_when_its_service_changes() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))
    mesh.add("db", ep("127.0.0.1:5432"), vip="127.240.0.2")

    async def scenario() -> None:
        cat = mesh.catalog()
        first = cat.answer("web")
        waiting = asyncio.ensure_future(cat.query("web", BlockingQuery(first.index, 30.0)))
        await settle()
        assert not waiting.done()
        mesh.add("db", ep("127.0.0.1:5433"))  # another service: web's watchers sleep on
        cat.changed()
        await settle()
        assert not waiting.done()
        mesh.add("web", ep("127.0.0.1:8002"))
        cat.changed()
        async with asyncio.timeout(1):
            answer = await waiting
        assert answer.index > first.index
        assert answer.body is not None
        assert [e["port"] for e in answer.body["endpoints"]] == [8001, 8002]

    run(scenario())


def test_a_blocking_query_answers_when_the_wait_ends() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))

    async def scenario() -> float:
        cat = mesh.catalog()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answer = await cat.query("web", BlockingQuery(1, 0.2))
        assert answer.index == 1 and answer.body is not None
        return loop.time() - t0

    assert 0.2 <= run(scenario()) < 2.0


def test_an_old_or_unknown_index_is_answered_at_once() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))

    async def scenario() -> None:
        cat = mesh.catalog()
        assert cat.answer("web").index == 1
        mesh.add("web", ep("127.0.0.1:8002"))
        cat.changed()
        assert cat.answer("web").index == 2
        for index in (0, 1, 99):  # 99: from before the agent restarted (indexes began again)
            async with asyncio.timeout(1):
                answer = await cat.query("web", BlockingQuery(index, 300.0))
            assert answer.index == 2

    run(scenario())


def test_the_view_is_read_only_when_asked_and_once_per_loop_turn() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))
    reads = 0

    def read() -> dict[str, ServiceRecord]:
        nonlocal reads
        reads += 1
        return mesh.services

    def scan(*ports: int) -> None:  # an enrollment scan registering some ports
        for port in ports:
            mesh.add("web", ep(f"127.0.0.1:{port}"))
            cat.changed()

    async def scenario() -> None:
        assert cat.answer("web").index == 1 and reads == 1
        scan(8002, 8003)
        await settle()
        assert reads == 1  # nobody asked, nobody waits: no work per change
        assert cat.answer("web").index == 2 and reads == 2  # both changes, one step
        waiting = asyncio.ensure_future(cat.query("web", BlockingQuery(2, 30.0)))
        await settle()
        scan(8004, 8005, 8006)
        async with asyncio.timeout(1):
            answer = await waiting
        assert answer.index == 3 and reads == 3  # a waiter: read once for the whole turn
        assert answer.body is not None and len(answer.body["endpoints"]) == 6

    cat = Catalog(read, mesh.healthy)
    run(scenario())


def test_a_query_for_a_service_that_does_not_exist_yet_wakes_when_it_appears() -> None:
    mesh = Mesh()

    async def scenario() -> None:
        cat = mesh.catalog()
        missing = cat.answer("web")
        assert missing.body is None
        waiting = asyncio.ensure_future(cat.query("web", BlockingQuery(missing.index, 30.0)))
        await settle()
        assert not waiting.done()
        mesh.add("web", ep("127.0.0.1:8001"))
        cat.changed()
        async with asyncio.timeout(1):
            answer = await waiting
        assert answer.body is not None and answer.index > missing.index

    run(scenario())


# -- the admin port's routing ----------------------------------------------------------------

class NoProvider:
    """The admin port's other pages; the catalog tests never reach them."""

    ready = True

    async def snapshot(self) -> Any:
        raise AssertionError("not under test")

    async def overview(self, window: float) -> dict[str, Any]:
        raise AssertionError("not under test")


def get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
    except urllib.error.HTTPError as e:
        r = e
    return r.status, dict(r.headers), r.read().decode()


@contextmanager
def admin_port(mesh: Mesh) -> Iterator[tuple[int, Callable[[Callable[[], None]], None]]]:
    """An admin server over `mesh`'s catalog, its loop in a thread (as the agent's is to the
    server's threads); yields the port and a way to run a change on that loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make() -> Catalog:
        return mesh.catalog()

    cat = asyncio.run_coroutine_threadsafe(make(), loop).result(5)
    server = AdminServer("127.0.0.1", 0, NoProvider(), loop, catalog=cat)
    server.start()

    def change(edit: Callable[[], None]) -> None:
        def apply() -> None:
            edit()
            cat.changed()
        loop.call_soon_threadsafe(apply)

    try:
        yield server.port, change
    finally:
        server.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_catalog_urls_answer_json_with_the_index_header() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))
    with admin_port(mesh) as (port, _):
        status, headers, body = get(port, "/v1/catalog/services")
        assert status == 200 and headers["X-Meshnode-Index"] == "1"
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"web": {"vip": "127.240.0.1", "port": 80, "endpoints": 1,
                                            "healthy": 1}}
        status, headers, body = get(port, "/v1/catalog/service/web")
        assert status == 200 and headers["X-Meshnode-Index"] == "1"
        assert json.loads(body)["endpoints"][0]["port"] == 8001


def test_catalog_errors_are_one_json_line_naming_the_fix() -> None:
    with admin_port(Mesh()) as (port, _):
        status, headers, body = get(port, "/v1/catalog/service/nope")
        assert status == 404 and headers["X-Meshnode-Index"] == "1"
        assert json.loads(body) == {"error": "no service named 'nope'",
                                    "hint": "list them: GET /v1/catalog/services"}
        status, _, body = get(port, "/v1/catalog/services?index=1&wait=soon")
        assert status == 400 and body.count("\n") == 1
        assert json.loads(body) == {"error": "wait must be a duration, not 'soon'",
                                    "hint": "write it as 500ms, 30s or 5m (at most 10m)"}
        status, _, body = get(port, "/v1/catalog/nodes")
        assert status == 404 and "/v1/catalog/services" in json.loads(body)["hint"]


def test_a_blocking_http_query_returns_on_a_change() -> None:
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))
    with admin_port(mesh) as (port, change):
        result: list[tuple[int, dict[str, str], str]] = []
        client = threading.Thread(target=lambda: result.append(
            get(port, "/v1/catalog/service/web?index=1&wait=30s")))
        client.start()
        client.join(0.3)  # it must still be waiting: nothing changed
        assert client.is_alive()
        change(lambda: mesh.add("web", ep("127.0.0.1:8002")))
        client.join(5)
        assert not client.is_alive()
        status, headers, body = result[0]
        assert status == 200 and int(headers["X-Meshnode-Index"]) > 1
        assert [e["port"] for e in json.loads(body)["endpoints"]] == [8001, 8002]


def test_blocking_queries_beyond_the_thread_budget_get_429(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "MAX_BLOCKING", 0)  # as if every slot were taken
    mesh = Mesh()
    mesh.add("web", ep("127.0.0.1:8001"))
    with admin_port(mesh) as (port, _):
        status, _, body = get(port, "/v1/catalog/service/web?index=1&wait=30s")
        assert status == 429 and "retry later" in json.loads(body)["hint"]
        status, _, _ = get(port, "/v1/catalog/service/web")  # a plain read takes no slot
        assert status == 200
