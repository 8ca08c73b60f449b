"""The dashboard marks services that have a Route, in headless Chromium: a "split 90/10" badge
per rule splitting by weight (the shares drawn from the Route's weights), "fault", "mirror"
and "rate limit" badges, a TCP split too. The page polls a real admin port on 127.0.0.1 over
the agent's telemetry (as test_dashboard_requests.py) whose registry holds the Routes, so the
badges come from agent/routes_api.py through api/overview. No namespace, no capture.

MESHNODE_DASHBOARD_SHOT=PATH also saves the screenshot there (the issue's closing note)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from meshnode.policy.document import parse
from meshnode.proxy.stats import WorkerStats
from meshnode.telemetry.admin import AdminServer
from tests.integration.test_dashboard import chromium
from tests.integration.test_dashboard_requests import ARTIFACTS, run_chromium
from tests.unit.test_request_telemetry import agent_telemetry, through_wire, traffic

pytestmark = pytest.mark.timeout(180)

ROUTES = [
    {"kind": "Route", "name": "api", "spec": {
        "service": "api",
        "rules": [
            {"name": "canary", "match": [{"headers": [{"name": "x-canary", "exact": "1"}]}],
             "backends": [{"service": "api", "subset": {"version": "v2"}}]},
            {"name": "main",
             "backends": [{"service": "api", "subset": {"version": "v1"}, "weight": 90},
                          {"service": "api", "subset": {"version": "v2"}, "weight": 10}],
             "fault": {"delay": {"seconds": 0.2, "percent": 5}},
             "mirror": {"service": "greet", "percent": 10}}]}},
    {"kind": "Route", "name": "greet", "spec": {
        "service": "greet",
        "rules": [{"name": "all", "rateLimit": {"requestsPerSecond": 50}}]}},
    {"kind": "Route", "name": "db", "spec": {
        "service": "db", "tcp": {"backends": [
            {"service": "db", "subset": {"version": "v1"}, "weight": 3},
            {"service": "db", "subset": {"version": "v2"}, "weight": 1}]}}},
]


class Badges(HTMLParser):
    """Per service row (tr[data-service]): its badges' data-badge -> text / data-shares."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: dict[str, list[dict[str, str]]] = {}
        self.updated = 0
        self._row: str | None = None
        self._badge: dict[str, str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.updated = int(a.get("data-updated") or 0)
        if tag == "tr" and "data-service" in a:
            self._row = a["data-service"]
            self.rows.setdefault(self._row, [])
        if tag == "span" and "data-badge" in a and self._row is not None:
            self._badge = {"badge": a["data-badge"], "shares": a.get("data-shares", ""),
                           "title": a.get("title", ""), "text": ""}
            self.rows[self._row].append(self._badge)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._badge = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._badge is not None:
            self._badge["text"] += data.strip()


@contextlib.contextmanager
def admin_port(resources: dict[tuple[str, str], Any]) -> Iterator[int]:
    stats = WorkerStats()
    traffic(stats)
    tel, clock = agent_telemetry(lambda: [through_wire(stats)], resources)
    clock.now = 10.0
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="agent-loop", daemon=True)
    thread.start()
    hosts = {"hosts": [{"node": "n1", "local": True, "ready": True, "current": True,
                        "applied_revision": 1}], "revision": 1, "current_revision": 1}
    server = AdminServer("127.0.0.1", 0, tel, loop, hosts=lambda: hosts)
    server.start()
    try:
        yield server.port
    finally:
        server.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_services_with_a_route_carry_split_fault_mirror_and_rate_limit_badges(
        tmp_path: Path) -> None:
    exe = chromium()
    resources = {r.key: r for r in (parse(d) for d in ROUTES)}
    with admin_port(resources) as port:
        url = f"http://127.0.0.1:{port}/"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-split.png"
        shot.unlink(missing_ok=True)
        run_chromium(exe, url, tmp_path, f"--screenshot={shot}")
        page = Badges(run_chromium(exe, url, tmp_path, "--dump-dom"))
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    if target := os.environ.get("MESHNODE_DASHBOARD_SHOT"):
        shutil.copyfile(shot, target)
    assert page.updated >= 1, "the page never rendered a successful poll"
    api = page.rows["api"]
    assert [(b["badge"], b["text"]) for b in api] == [
        ("split", "split 90/10"), ("fault", "fault"), ("mirror", "mirror")]
    assert api[0]["shares"] == "90/10"
    assert api[0]["title"] == ("Route api, rule main:\napi{version=v1} weight 90\n"
                               "api{version=v2} weight 10")
    assert [(b["badge"], b["text"]) for b in page.rows["greet"]] == [
        ("rate_limit", "rate limit")]
    # a TCP split is drawn from its weights as shares (3:1)
    assert [(b["badge"], b["text"]) for b in page.rows["db"]] == [("split", "split 75/25")]
    assert page.rows["idle"] == []  # no Route: no badge
