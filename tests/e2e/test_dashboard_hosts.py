"""The cluster on the dashboard: three namespaces, an agent each, one etcd. Host 0's admin port
lists every agent that reports to the registry (GET /api/hosts), and its page, rendered by
headless Chromium inside host 0, shows the three hosts, each running the newest resources,
and every endpoint with the host it runs on. The screenshot is artifacts/dashboard-3-hosts.png.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fabric import Fabric
from tests.e2e.test_multihost import PORT, web_everywhere
from tests.harness import Host, wait_for
from tests.integration.test_dashboard import (
    ARTIFACTS,
    RenderedPage,
    api_hosts,
    chromium,
    run_chromium,
    trickle,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SHOT = "dashboard-3-hosts.png"
SIZE = "1400,2050"  # the whole page: hosts, topology, services, endpoints, trends, cards


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    f = Fabric(tmp_path, hosts=3, etcd_members=1, ttl=3)
    try:
        f.start()
        yield f
    finally:
        f.close()


def test_host0_dashboard_shows_every_host_and_where_each_endpoint_runs(
        fabric: Fabric, tmp_path: Path) -> None:
    exe = chromium()
    h0 = fabric.hosts[0]
    nodes = {h.node for h in fabric.hosts}
    t0 = time.monotonic()
    vip = web_everywhere(fabric)  # Service "web", an instance on each host
    version = h0.call("get", kind="Service", name="web")["items"][0]["version"]

    def converged() -> dict[str, Any] | None:
        view = api_hosts(h0)
        hosts = view["hosts"]
        done = {x["node"] for x in hosts} == nodes and all(x["current"] for x in hosts)
        return view if done else None

    view = wait_for("three hosts current on h0's api/hosts", converged, timeout=15,
                    interval=0.05)
    print(f"\nh0's api/hosts: 3 hosts current {time.monotonic() - t0:.2f}s after the "
          f"service was added; registry r{view['revision']}, applied "
          + ", ".join(f"{x['node']} r{x['applied_revision']}" for x in view["hosts"]))
    # the registry's revision counts served data (web and its endpoints), not the reports
    assert view["current_revision"] == view["revision"] >= version
    for x in view["hosts"]:
        # each agent's own report, read through etcd: its state, not h0's
        assert x["applied_revision"] >= version and x["ready"], x
        assert (x["capture"], x["workers"], x["services"], x["local_endpoints"]) == \
            ("ebpf", 2, 1, 1), x
        assert x["local"] == (x["node"] == h0.node), x
        assert x["instance"] == fabric.hosts[int(x["node"][1:])].tag, x

    client = h0.probe(service="client")
    assert client.connect(vip, 80)["ok"]
    with trickle(client, vip, 80):  # so the topology and the traffic table have an edge
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / SHOT
        shot.unlink(missing_ok=True)
        run_chromium(h0, exe, tmp_path, f"--screenshot={shot}", size=SIZE)
        print(f"dashboard screenshot: {shot}")
        page = RenderedPage(run_chromium(h0, exe, tmp_path, "--dump-dom", size=SIZE))

    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    assert page.updated >= 1 and page.banner_hidden
    assert page.kpi_hosts == "3"
    assert set(page.hosts) == nodes, page.hosts
    for node, row in page.hosts.items():
        assert (row["state"], row["current"]) == ("ready", "true"), (node, row)
        assert int(row["applied"]) >= version, (node, row)
    assert page.endpoint_hosts == {f"web {fabric.ip(i)}:{PORT}": f"h{i}" for i in range(3)}


def current(h: Host) -> dict[str, bool]:
    """Host h's api/hosts: each node and whether it is current."""
    return {x["node"]: x["current"] for x in api_hosts(h)["hosts"]}


def test_h0_sees_a_rollout_converge_and_a_stopped_host_leave(fabric: Fabric) -> None:
    web_everywhere(fabric)
    h0, h2 = fabric.hosts[0], fabric.hosts[2]
    everyone = {"h0": True, "h1": True, "h2": True}
    wait_for("all current", lambda: current(h0) == everyone, timeout=15)

    # h2's agent frozen (well within its lease's TTL): an apply on h0 reaches h1, not h2
    assert h2.agent is not None
    os.kill(h2.agent.pid, signal.SIGSTOP)
    try:
        doc = {"kind": "Service", "name": "web",
               "spec": {"port": 81, "balancer": {"algorithm": "round-robin"}}}
        rev = h0.call("apply", docs=[doc])["results"][0]["version"]
        wait_for("h1 current, h2 behind",
                 lambda: current(h0) == {"h0": True, "h1": True, "h2": False}, timeout=2,
                 interval=0.02)
        view = api_hosts(h0)
        h2_row = {x["node"]: x for x in view["hosts"]}["h2"]
        assert view["current_revision"] >= rev > h2_row["applied_revision"], view
    finally:
        os.kill(h2.agent.pid, signal.SIGCONT)
    t0 = time.monotonic()
    wait_for("h2 current again", lambda: current(h0) == everyone, timeout=10, interval=0.02)
    print(f"\nh2 thawed -> current on h0's api/hosts in {time.monotonic() - t0:.2f}s")

    # a stopped agent's report goes with its lease; a new one comes back, current again
    h2.stop()
    wait_for("h2 gone from h0's api/hosts",
             lambda: current(h0) == {"h0": True, "h1": True}, timeout=10)
    h2.start()
    wait_for("h2 back and current", lambda: current(h0) == everyone, timeout=15)
