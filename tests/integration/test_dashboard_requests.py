"""The dashboard's request view in headless Chromium: HTTP and gRPC services shown in requests
(rate, success, request-latency percentiles, retries), TCP ones in connections. The page polls
a real admin port on 127.0.0.1 whose overview is the agent's telemetry (agent/observe.py) over
the request rows a worker sends (tests/unit/test_request_telemetry.py's traffic), so what
Chromium draws is what the agent computes from the wire. No namespace: no capture is involved."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from meshnode.proxy.stats import WorkerStats
from meshnode.telemetry.admin import AdminServer
from tests.integration.test_dashboard import CHROMIUM_TIMEOUT, chromium
from tests.unit.test_request_telemetry import agent_telemetry, through_wire, traffic

pytestmark = pytest.mark.timeout(180)

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


class Page(HTMLParser):
    """The rendered page's request hooks: rows' data-* by id, KPI texts, chart titles."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.requests: dict[str, dict[str, str]] = {}  # #requests rows by service
        self.tcp: set[str] = set()  # #services rows
        self.edges: dict[str, dict[str, str]] = {}
        self.hidden: set[str] = set()  # ids of hidden elements
        self.text: dict[str, str] = {}  # id -> text, for the KPIs
        self.titles: dict[str, list[str]] = {}  # trend card -> chart titles
        self.updated = 0
        self._table: str | None = None
        self._id: str | None = None
        self._trend: str | None = None
        self._title = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.updated = int(a.get("data-updated") or 0)
        if "id" in a and "hidden" in a:
            self.hidden.add(a["id"])
        if tag == "table":
            self._table = a.get("id")
        data = {k[5:]: v for k, v in a.items() if k.startswith("data-")}
        if tag == "tr" and "service" in data:
            if self._table == "requests":
                self.requests[data["service"]] = data
            elif self._table == "services":
                self.tcp.add(data["service"])
        if tag == "tr" and "edge" in data:
            self.edges[data["edge"]] = data
        if "trend" in data:
            self._trend = data["trend"]
        self._title = a.get("class") == "chart-title"
        self._id = a.get("id") if a.get("id", "").startswith("k-") else None

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        self._title = False
        self._id = None

    def handle_data(self, data: str) -> None:
        if self._id:
            self.text[self._id] = self.text.get(self._id, "") + data.strip()
        if self._title and self._trend:
            self.titles.setdefault(self._trend, []).append(data.strip())


@contextlib.contextmanager
def admin_port() -> Iterator[int]:
    """A real admin server on 127.0.0.1 (a free port) over the agent's telemetry, fed the
    traffic of tests/unit/test_request_telemetry.py for 10 s of a fake clock."""
    stats = WorkerStats()
    traffic(stats)
    tel, clock = agent_telemetry(lambda: [through_wire(stats)])
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


def run_chromium(exe: str, url: str, tmp: Path, *mode: str) -> str:
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    argv = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
            "--window-size=1400,1600", "--virtual-time-budget=8000", *mode, url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: renderers die with it
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, "\n".join(err.splitlines()[-15:])
    return out


def test_dashboard_shows_http_services_in_requests_and_tcp_in_connections(
        tmp_path: Path) -> None:
    exe = chromium()
    with admin_port() as port:
        url = f"http://127.0.0.1:{port}/"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-requests.png"
        shot.unlink(missing_ok=True)
        run_chromium(exe, url, tmp_path, f"--screenshot={shot}")
        page = Page(run_chromium(exe, url, tmp_path, "--dump-dom"))
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    assert page.updated >= 1, "the page never rendered a successful poll"
    # HTTP, gRPC and auto services in requests; the tcp one in connections
    assert set(page.requests) == {"api", "greet", "idle"} and page.tcp == {"db"}
    assert "requests-card" not in page.hidden and "services-card" not in page.hidden
    assert (page.requests["api"]["rps"], page.requests["api"]["success"]) == ("1", "0.8")
    assert (page.requests["greet"]["rps"], page.requests["greet"]["success"]) == ("0.4", "0.75")
    assert "success" not in page.requests["idle"]  # no request yet: no success rate
    # KPIs: 1.4 requests/s over the HTTP and gRPC services, 11 of 14 succeeded
    assert (page.text["k-rps"], page.text["k-success"]) == ("1.4/s", "78.6%")
    assert page.edges["web->api"]["rps"] == "1" and page.edges["web->api"]["success"] == "0.8"
    assert "rps" not in page.edges["web->db"] and page.edges["web->db"]["rate"] == "0.5"
    assert page.titles["api"] == ["Requests / s", "Request latency p50 / p99 (ms)"]
    assert page.titles["db"] == ["Connections / s", "Connect latency p50 / p99 (ms)"]
