"""The dashboard end to end: a real agent's admin port, rendered by headless Chromium inside
the host's network namespace. The page polls api/overview and api/hosts and draws the topology
with ECharts' SVG renderer, so graph labels are DOM text the test can read back from
--dump-dom. tests/e2e/test_dashboard_hosts.py reuses these helpers on three hosts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Host, Probe, free_port, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

ADMIN = "http://127.0.0.1:15090/"  # the default admin port, on the namespace's own loopback
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_TIMEOUT = 90.0
FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; "
                "`./setup.sh test` installs it)")


def overview(h: Host) -> dict[str, Any]:
    """GET api/overview from inside the host (the admin port listens on its loopback)."""
    r = subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-c", FETCH,
                        f"{ADMIN}api/overview?window=10"],
                       capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise OSError((r.stderr.strip().splitlines() or ["fetch failed"])[-1])
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def edge_rate(view: dict[str, Any], src: str, dst: str) -> float:
    return sum(e["rate"] for e in view["edges"] if (e["src"], e["dst"]) == (src, dst))


def api_hosts(h: Host) -> dict[str, Any]:
    """GET api/hosts from inside the host, as the page does."""
    status, body = h.http_get("/api/hosts")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def run_chromium(h: Host, exe: str, tmp: Path, *mode: str, size: str = "1400,1000") -> str:
    """One headless Chromium run in the host's namespace; killed (whole group) on failure."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    argv = ["nsenter", f"--net=/run/netns/{h.netns}", exe, "--headless=new", "--no-sandbox",
            "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={size}",
            "--virtual-time-budget=8000", *mode, ADMIN]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: renderers die with it
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise AssertionError(f"chromium {' '.join(mode)} exited {proc.returncode}:\n"
                             + "\n".join(err.splitlines()[-15:]))
    return out


class RenderedPage(HTMLParser):
    """The test hooks of the rendered dashboard, read from Chromium's --dump-dom."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.edges: dict[str, float] = {}
        self.services: set[str] = set()
        self.hosts: dict[str, dict[str, str]] = {}  # the Hosts table: node -> data-* of its row
        self.endpoint_hosts: dict[str, str] = {}  # the Endpoints table: "SERVICE ADDR" -> node
        self.kpi_hosts = ""
        self._kpi_hosts = False
        self.updated = 0
        self.banner_hidden = False
        self.graph_text: list[str] = []
        self._graph_depth = 0  # > 0 inside <div id="graph">
        self._in_text = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.updated = int(a.get("data-updated") or 0)
        if a.get("id") == "banner":
            self.banner_hidden = "hidden" in a
        if a.get("data-edge") is not None:
            self.edges[str(a["data-edge"])] = float(a.get("data-rate") or 0)
        if a.get("data-service") is not None:
            self.services.add(str(a["data-service"]))
        if tag == "tr" and a.get("data-current") is not None:
            self.hosts[str(a["data-host"])] = {k[5:]: str(v) for k, v in a.items()
                                               if k.startswith("data-")}
        if tag == "tr" and a.get("data-endpoint") is not None:
            self.endpoint_hosts[str(a["data-endpoint"])] = str(a.get("data-host") or "")
        self._kpi_hosts = a.get("id") == "k-hosts"
        if tag in self.VOID:
            return
        if self._graph_depth or a.get("id") == "graph":
            self._graph_depth += 1
        self._in_text = self._graph_depth > 0 and tag == "text"

    def handle_endtag(self, tag: str) -> None:
        self._kpi_hosts = False
        if self._graph_depth:
            self._graph_depth -= 1
        self._in_text = False

    def handle_data(self, data: str) -> None:
        if self._kpi_hosts:
            self.kpi_hosts += data.strip()
        if self._in_text:
            self.graph_text.append(data.strip())


@contextlib.contextmanager
def trickle(probe: Probe, vip: str, port: int) -> Iterator[None]:
    """Keeps calls flowing so the 10 s window still has traffic while Chromium renders."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.1):
            try:
                probe.connect(vip, port)
            except (AssertionError, OSError, ValueError):
                return

    t = threading.Thread(target=run, name="trickle", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)


def test_dashboard_renders_live_topology(make_host, tmp_path: Path) -> None:
    exe = chromium()
    h = make_host("ebpf", workers=1)
    h.start()
    vip = h.call("service.add", name="api", patch={"port": 80})["vip"]
    ports = [free_port(), free_port()]
    while ports[0] == ports[1]:
        ports[1] = free_port()
    for i, p in enumerate(ports):
        h.server(f"api-{i}", p, service="api")
    h.wait_endpoints("api", {f"127.0.0.1:{p}" for p in ports})
    web = h.probe(service="web")
    replies = [web.connect(vip, 80) for _ in range(40)]
    assert all(r["ok"] for r in replies), replies

    with trickle(web, vip, 80):
        def web_to_api() -> dict[str, Any] | None:
            view = overview(h)
            return view if edge_rate(view, "web", "api") > 0 else None

        view = wait_for("web -> api traffic on api/overview", web_to_api, timeout=30)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        run_chromium(h, exe, tmp_path, f"--screenshot={shot}")
        print(f"dashboard screenshot: {shot}")
        page = RenderedPage(run_chromium(h, exe, tmp_path, "--dump-dom"))

    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    assert page.updated >= 1, "the page never rendered a successful poll"
    assert page.banner_hidden, "the page shows 'agent unreachable'"
    assert "api" in page.services
    assert {s["name"] for s in view["services"]} <= page.services  # "web" too, if a service
    assert page.edges.get("web->api", 0) > 0, page.edges
    assert {"api", "web"} <= set(page.graph_text), page.graph_text

    # one agent, one host: its report, current, and each endpoint placed on it
    cluster = api_hosts(h)
    api_version = h.call("get", kind="Service", name="api")["items"][0]["version"]
    assert cluster["current_revision"] >= api_version
    node = h.status()["node"]  # the harness's tag names the instance; the node is the agent's
    (me,) = cluster["hosts"]
    assert me["node"] == node and me["local"] and me["current"] and me["ready"], me
    assert (me["capture"], me["workers"], me["local_endpoints"]) == ("ebpf", 1, 2), me
    assert me["applied_revision"] >= cluster["current_revision"]
    assert page.kpi_hosts == "1"
    assert set(page.hosts) == {node}, page.hosts
    row = page.hosts[node]
    assert (row["state"], row["current"]) == ("ready", "true"), row
    assert int(row["applied"]) >= api_version
    assert page.endpoint_hosts == {f"api 127.0.0.1:{p}": node for p in ports}
