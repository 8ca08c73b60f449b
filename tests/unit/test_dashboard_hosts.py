"""The mesh's hosts as the dashboard and the `hosts` operation show them: which agents report,
which are current (agent/cluster.py), and the admin port's GET /api/hosts that serves it."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from meshnode.agent.cluster import hosts_view
from meshnode.telemetry.admin import AdminServer, HostsSource


def report(node: str, applied: Any, ready: bool = True, **extra: Any) -> dict[str, Any]:
    return {"node": node, "zone": "z1", "version": "0.1.0", "ready": ready, "capture": "ebpf",
            "services": 2, "local_endpoints": 1, "workers": 2, "applied_revision": applied,
            "applied_at": 1.5, **extra}


@dataclass
class Store:
    """A registry snapshot: the reports it holds and its revision (of served data only)."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    rev: int = 0

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {n: dict(r) for n, r in self.reports.items()}

    def revision(self) -> int:
        return self.rev


def by_node(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["node"]: h for h in view["hosts"]}


def test_a_host_is_current_once_it_applied_the_registry_revision() -> None:
    # the registry's revision counts served data only (agents' reports do not move it)
    store = Store({"h1": report("h1", 25), "h2": report("h2", 12)}, rev=25)
    view = hosts_view(store, report("h0", 25))
    assert (view["revision"], view["current_revision"]) == (25, 25)
    assert [h["node"] for h in view["hosts"]] == ["h0", "h1", "h2"]
    hosts = by_node(view)
    assert {n: h["current"] for n, h in hosts.items()} == {"h0": True, "h1": True, "h2": False}
    assert {n: h["local"] for n, h in hosts.items()} == {"h0": True, "h1": False, "h2": False}
    assert hosts["h1"]["capture"] == "ebpf" and hosts["h1"]["workers"] == 2  # report kept whole


def test_this_hosts_fresh_report_replaces_its_published_one() -> None:
    # the registry still holds h0's report from before its last apply (publishing lags)
    store = Store({"h0": report("h0", 10)}, rev=20)
    hosts = by_node(hosts_view(store, report("h0", 20)))
    assert hosts["h0"]["applied_revision"] == 20 and hosts["h0"]["current"]


def test_a_host_that_is_not_ready_is_never_current() -> None:
    store = Store({"h1": report("h1", 50, ready=False)}, rev=50)
    hosts = by_node(hosts_view(store, report("h0", 50)))
    assert not hosts["h1"]["current"] and hosts["h0"]["current"]


def test_an_empty_registry_every_ready_host_is_current() -> None:
    store = Store({"h1": report("h1", 0)}, rev=0)
    view = hosts_view(store, report("h0", 0))
    assert view["current_revision"] == 0
    assert all(h["current"] for h in view["hosts"])


def test_an_odd_report_from_another_agent_does_not_break_the_view() -> None:
    # an agent of another version may leave a field out or write it as text
    store = Store({"h1": report("h1", "seven"), "h2": {"node": "h2"}}, rev=4)
    hosts = by_node(hosts_view(store, report("h0", "4")))
    assert hosts["h0"]["applied_revision"] == 4 and hosts["h0"]["current"]
    assert hosts["h1"]["applied_revision"] == 0 and not hosts["h1"]["current"]
    assert hosts["h2"]["applied_revision"] == 0 and not hosts["h2"]["current"]


# -- GET /api/hosts --------------------------------------------------------------------------
class NoProvider:
    ready = True

    async def snapshot(self) -> Any:
        raise AssertionError("not under test")

    async def overview(self, window: float) -> dict[str, Any]:
        raise AssertionError("not under test")


@contextmanager
def admin_port(hosts: HostsSource | None) -> Iterator[int]:
    """An admin server whose loop runs in its own thread, as the agent's does."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="agent-loop", daemon=True)
    thread.start()
    server = AdminServer("127.0.0.1", 0, NoProvider(), loop, hosts=hosts)
    server.start()
    try:
        yield server.port
    finally:
        server.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
    except urllib.error.HTTPError as e:
        r = e
    return r.status, r.headers["Content-Type"], r.read().decode()


def test_api_hosts_serves_the_view_computed_on_the_agents_loop() -> None:
    store = Store({"h1": report("h1", 7)}, rev=7)
    threads: list[str] = []

    def source() -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return hosts_view(store, report("h0", 7))

    with admin_port(source) as port:
        status, ctype, body = get(port, "/api/hosts")
    assert (status, ctype) == (200, "application/json")
    view = json.loads(body)
    assert [(h["node"], h["current"]) for h in view["hosts"]] == [("h0", True), ("h1", True)]
    assert view["current_revision"] == 7
    # the registry snapshot belongs to the loop: never read from a request thread
    assert threads == ["agent-loop"]


def test_api_hosts_is_not_found_on_an_admin_port_without_it() -> None:
    with admin_port(None) as port:
        status, _, body = get(port, "/api/hosts")
    assert (status, body) == (404, "not found\n")
