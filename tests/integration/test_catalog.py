"""Discovery for clients that balance themselves, end to end: a real agent in its own network
namespace, asked the way such a client would. SRV through a real DNS client (dnslib's) on the
agent's DNS port, and the HTTP catalog's blocking queries on its admin port, both from
processes inside the namespace; the service's endpoints are real listeners, so the agent's own
health checks pass them (or, once one is stopped, fail it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.harness import Host, free_port, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

CATALOG = "http://127.0.0.1:15090/v1/catalog/"  # the default admin port, on the netns' loopback

# A SRV client: one query to the agent's DNS port, the answer as JSON (and dig-like text).
SRV_CLIENT = r"""
import json, sys
from dnslib import QTYPE, DNSRecord
name, qtype = sys.argv[1:3]
r = DNSRecord.parse(DNSRecord.question(name, qtype).send("127.0.0.1", 15053, timeout=5))
print(json.dumps({
    "rcode": r.header.rcode,
    "srv": sorted([a.rdata.priority, a.rdata.weight, a.rdata.port, str(a.rdata.target)]
                  for a in r.rr if a.rtype == QTYPE.SRV),
    "a": sorted([str(a.rname), str(a.rdata)] for a in r.rr + r.ar if a.rtype == QTYPE.A),
    "text": str(r)}))
"""

# An HTTP client: one GET, then status, index header, body and the (system-wide monotonic)
# time the answer arrived, as JSON.
HTTP_CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=60)
except urllib.error.HTTPError as e:
    r = e
body = r.read().decode()
print(json.dumps({"at": time.monotonic(), "status": r.status,
                  "index": r.headers.get("X-Meshnode-Index"), "body": json.loads(body)}))
"""


def in_host(h: Host, script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-c",
                             script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def result(p: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    answer: dict[str, Any] = json.loads(out)
    return answer


def srv(h: Host, name: str, qtype: str = "SRV") -> dict[str, Any]:
    return result(in_host(h, SRV_CLIENT, name, qtype))


def catalog(h: Host, path: str) -> dict[str, Any]:
    return result(in_host(h, HTTP_CLIENT, CATALOG + path))


def add(h: Host, *args: str) -> None:
    r = h.cli("service", "add", "api", *args)
    assert r.returncode == 0, r.stderr


def test_srv_and_blocking_catalog_follow_endpoints_and_health(make_host: Any) -> None:
    h = make_host("ebpf", workers=1)
    h.start()
    ports: list[int] = []
    while len(ports) < 4:
        if (p := free_port()) not in ports:
            ports.append(p)
    ports.sort()
    servers = {p: h.server(f"api-{p}", p) for p in ports}  # plain listeners, not enrolled
    # fast checks, so a stopped endpoint is seen within a second
    add(h, "--port", "80", "--health-interval", "0.5", "--health-timeout", "0.5",
        "--unhealthy-threshold", "1")
    for weight, p in enumerate(ports[:3], start=1):
        add(h, "--endpoint", f"127.0.0.1:{p}", "--weight", str(weight))

    # SRV: the three endpoints with their ports and weights, targets resolving to them
    answer = wait_for("three SRV records", lambda: (a := srv(h, "_api._tcp.mesh"))
                      and len(a["srv"]) == 3 and a)
    print(answer["text"])
    assert answer["rcode"] == 0
    assert [(pr, w, p) for pr, w, p, _ in answer["srv"]] == [
        (0, w, p) for w, p in enumerate(ports[:3], start=1)]  # all on this node: priority 0
    targets = {t for *_, t in answer["srv"]}
    assert {name for name, _ in answer["a"]} == targets
    assert {ip for _, ip in answer["a"]} == {"127.0.0.1"}
    target = sorted(targets)[0]
    assert srv(h, target, "A")["a"] == [[target, "127.0.0.1"]]
    assert srv(h, "_nope._tcp.mesh")["rcode"] == 3  # NXDOMAIN

    # the catalog: a blocking query waits while nothing changes ...
    first = catalog(h, "service/api")
    assert first["status"] == 200 and len(first["body"]["endpoints"]) == 3
    index = int(first["index"])
    t0 = time.monotonic()
    unchanged = catalog(h, f"service/api?index={index}&wait=2s")
    waited = unchanged["at"] - t0
    assert 2.0 <= waited < 5.0, waited
    assert int(unchanged["index"]) == index and unchanged["body"] == first["body"]

    # ... and returns within a second of a new endpoint
    blocked = in_host(h, HTTP_CLIENT, f"{CATALOG}service/api?index={index}&wait=60s")
    with pytest.raises(subprocess.TimeoutExpired):
        blocked.wait(1.0)  # still waiting: nothing changed yet
    t_add = time.monotonic()
    add(h, "--endpoint", f"127.0.0.1:{ports[3]}", "--weight", "4")
    t_added = time.monotonic()
    woke = result(blocked)
    print(f"blocking query: index {index} -> {woke['index']}, answered "
          f"{woke['at'] - t_add:.3f}s after the add began (the add took {t_added - t_add:.3f}s)")
    assert woke["at"] - t_added < 1.0
    assert int(woke["index"]) > index
    assert [(e["port"], e["weight"]) for e in woke["body"]["endpoints"]] == [
        (p, w) for w, p in enumerate(ports, start=1)]

    # a stopped endpoint: unhealthy in the catalog (a blocking query wakes), gone from SRV
    index = int(woke["index"])
    blocked = in_host(h, HTTP_CLIENT, f"{CATALOG}service/api?index={index}&wait=60s")
    servers[ports[0]].kill()
    flipped = result(blocked)
    assert int(flipped["index"]) > index
    assert {e["port"]: e["health"] for e in flipped["body"]["endpoints"]} == {
        ports[0]: "unhealthy", ports[1]: "healthy", ports[2]: "healthy", ports[3]: "healthy"}
    listed = catalog(h, "services")["body"]["api"]
    assert (listed["endpoints"], listed["healthy"]) == (4, 3)
    assert sorted(p for _, _, p, _ in srv(h, "_api._tcp.mesh")["srv"]) == ports[1:]

    missing = catalog(h, "service/nope")
    assert missing["status"] == 404 and missing["index"] is not None
