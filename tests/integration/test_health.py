"""Active health checks end to end: an endpoint that fails its checks leaves the balancer
(no traffic, no connect errors) and `status` says why; it returns once it passes again."""

from __future__ import annotations

import collections

import pytest

from tests.harness import Host, free_port, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def endpoint(h: Host, service: str, addr: str) -> dict:
    return {e["addr"]: e for e in h.service(service)["endpoints"]}[addr]


@pytest.mark.parametrize("backend", ["ebpf"])
def test_unhealthy_endpoint_leaves_and_returns(make_host, backend: str) -> None:
    h = make_host(backend, workers=1)  # one round-robin cursor: exact shares
    h.start()
    up, down = free_port(), free_port()
    h.server("up", up)
    r = h.cli("service", "add", "web", "--port", "80", "--lb", "round-robin",
              "--endpoint", f"127.0.0.1:{up}", "--endpoint", f"127.0.0.1:{down}",
              "--health", "tcp", "--health-interval", "0.2", "--health-timeout", "0.2",
              "--unhealthy-threshold", "2", "--healthy-threshold", "1")
    assert r.returncode == 0, r.stderr
    down_addr = f"127.0.0.1:{down}"
    wait_for("the dead endpoint marked down",
             lambda: not endpoint(h, "web", down_addr)["health"]["healthy"], timeout=10)
    reason = endpoint(h, "web", down_addr)["health"]["reason"]
    assert "tcp connect failed" in reason and "in a row" in reason, reason
    vip = h.service("web")["vip"]
    client = h.probe(service="client")
    replies = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(10))
    assert replies == {"up": 10}
    assert h.service("web")["counters"]["connect_errors"] == 0  # never even tried
    h.server("back", down)
    wait_for("the endpoint healthy again",
             lambda: endpoint(h, "web", down_addr)["health"]["healthy"], timeout=10)
    replies = collections.Counter(client.connect(vip, 80)["reply"] for _ in range(10))
    assert replies == {"up": 5, "back": 5}
    text = h.cli("status").stdout
    assert "tcp connect ok" in text and down_addr in text
