"""The ingress gateway end to end: a real agent runs a Gateway on 127.0.0.1 in its namespace,
with two certificates picked by SNI, and Routes whose `hosts` send each site to its own
service. What a client sees: curl over TLS (--resolve, the test root trusted) gets the right
certificate for each name and the right backend, HTTP/2 by ALPN, 404 with the reason for a host
no Route serves; a listener whose key does not match its certificate stays closed with the
reason in the status while the other serves; deleting the Gateway closes its port. And headless
Chromium loads a page and its script through the gateway, as a browser on the internet would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Host, free_port, wait_for
from tests.integration.test_dashboard import CHROMIUM_TIMEOUT, chromium
from tests.integration.test_http import http_service, ports, run
from tests.tls_certs import web_certs

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# A page and its script (served by one backend): the script, loaded through the gateway too,
# fetches /api and writes what it got into the page.
PAGE_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
seen = []
PAGE = b'''<!doctype html><html><head><title>shop</title></head><body>
<h1 id="title">the shop</h1><p id="out">script not run</p>
<script src="/app.js"></script></body></html>'''
APP = b'''fetch("/api").then(r => r.json()).then(j => {
  document.getElementById("out").textContent = "api says " + j.hello + " via " + location.host;
});'''
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        seen.append(self.path)
        if self.path == "/seen":
            body, kind = json.dumps(seen[:-1]).encode(), "application/json"
        elif self.path == "/":
            body, kind = PAGE, "text/html"
        elif self.path == "/app.js":
            body, kind = APP, "text/javascript"
        elif self.path == "/api":
            body, kind = json.dumps({"hello": "world"}).encode(), "application/json"
        else:
            self.send_error(404); return
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
s = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("listening", flush=True)
s.serve_forever()
"""


@dataclass
class Site:
    h: Host
    tmp: Path
    root: Path  # the test CA clients trust
    certs: dict[str, tuple[Path, Path]]


def apply(site: Site, *docs: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = site.tmp / f"apply-{os.urandom(3).hex()}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return site.h.cli("apply", "-f", str(path))


def gateway_doc(listeners: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "Gateway", "name": "edge",
            "spec": {"nodes": ["*"], "service": "edge", "listeners": listeners}}


def cert_entry(site: Site, name: str, hosts: list[str]) -> dict[str, Any]:
    cert, key = site.certs[name]
    return {"hosts": hosts, "certFile": str(cert), "keyFile": str(key)}


def curl(site: Site, url: str, *args: str) -> tuple[dict[str, Any], str, str]:
    """curl inside the host: (write-out as JSON, body, headers)."""
    out = site.tmp / f"curl-{os.urandom(3).hex()}"
    r = subprocess.run(["nsenter", f"--net=/run/netns/{site.h.netns}", "curl", "-sS",
                        "--max-time", "10", "--cacert", str(site.root), "-o", f"{out}.body",
                        "-D", f"{out}.head", "-w", "%{json}", *args, url],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"curl {url}: {r.stderr}"
    return json.loads(r.stdout), Path(f"{out}.body").read_text(), Path(f"{out}.head").read_text()


def refused(h: Host, port: int) -> bool:
    r = subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-c",
                        "import socket, sys\ntry:\n socket.create_connection(('127.0.0.1', "
                        f"{port}), timeout=2).close()\nexcept ConnectionRefusedError:\n"
                        " sys.exit(3)"], timeout=20)
    return r.returncode == 3


@pytest.fixture
def site(make_host: Any, tmp_path: Path) -> Iterator[Site]:
    h = make_host("iptables")
    h.start()
    root, certs = web_certs(tmp_path / "certs", {"shop": ["shop.example.com"],
                                                 "blog": ["blog.example.com",
                                                          "*.blog.example.com"]})
    s = Site(h, tmp_path, root, certs)
    # the gateway's own service: its identity, no endpoints
    assert apply(s, {"kind": "Service", "name": "edge", "spec": {}}).returncode == 0
    yield s


def route(service: str, hosts: list[str]) -> dict[str, Any]:
    return {"kind": "Route", "name": service,
            "spec": {"service": service, "hosts": hosts, "rules": [{"name": "all"}]}}


def test_gateway_routes_by_host_over_tls(site: Site) -> None:
    h = site.h
    http_service(h, "shop", 1)  # HTTP/1.1
    good, bad, blog_port, plain = ports(4)
    # the second listener's files: the shop's certificate with the blog's key (mismatched)
    bad_cert, bad_key = site.tmp / "bad.pem", site.tmp / "bad.key"
    bad_cert.write_bytes(site.certs["shop"][0].read_bytes())
    bad_key.write_bytes(site.certs["blog"][1].read_bytes())
    run(h, "h2_backend", "blog-0", str(blog_port), service="blog")  # HTTP/2
    h.call("service.add", name="blog", patch={"port": 80, "protocol": "http2"})
    h.wait_endpoints("blog", {f"127.0.0.1:{blog_port}"})
    done = apply(site, route("shop", ["shop.example.com"]),
                 route("blog", ["blog.example.com", "*.blog.example.com"]),
                 gateway_doc([
                     {"address": "127.0.0.1", "port": good, "certificates": [
                         cert_entry(site, "shop", ["shop.example.com"]),
                         cert_entry(site, "blog", ["blog.example.com", "*.blog.example.com"])]},
                     {"address": "127.0.0.1", "port": plain, "protocol": "http"},
                     # its key does not match its certificate: this listener stays closed
                     {"address": "127.0.0.1", "port": bad, "certificates": [
                         {"hosts": ["shop.example.com"], "certFile": str(bad_cert),
                          "keyFile": str(bad_key)}]}]))
    assert done.returncode == 0, done.stderr

    def get(host: str, *args: str, path: str = "/hello") -> tuple[dict[str, Any], str, str]:
        return curl(site, f"https://{host}:{good}{path}", "--resolve",
                    f"{host}:{good}:127.0.0.1", *args)

    # the listener serves once the workers have it
    wait_for("the gateway serving", lambda: refused(h, good) is False, 20)
    # each name gets its own certificate (curl checks it against the name) and its backend,
    # in the protocol the backend speaks: ALPN offers h2 only where the backend speaks it
    for host, backend, version in (("shop.example.com", "shop-0", "1.1"),
                                   ("blog.example.com", "blog-0", "2"),
                                   ("www.blog.example.com", "blog-0", "2")):
        out, body, _ = get(host, "--http2")
        assert (out["http_code"], out["ssl_verify_result"], out["http_version"]) == \
            (200, 0, version), (host, out, body)
        assert json.loads(body)["name"] == backend, (host, body)
    out, body, _ = get("shop.example.com", "--http1.1")
    assert (out["http_code"], out["http_version"]) == (200, "1.1")
    # the plaintext listener: HTTP/1.1, routed by Host the same way
    out, body, _ = curl(site, f"http://shop.example.com:{plain}/p", "--resolve",
                        f"shop.example.com:{plain}:127.0.0.1")
    assert (out["http_code"], json.loads(body)["name"]) == (200, "shop-0"), (out, body)
    # a host no Route serves: 404 and why (the default certificate answers its handshake)
    out, body, head = get("other.example.com", "--insecure")
    assert out["http_code"] == 404, (out, body)
    assert "x-meshnode-error: no_route" in head.lower(), head
    assert "no Route serves host other.example.com" in body, body
    # the listener with the mismatched key: closed, the reason in the status and the log
    assert refused(h, bad)
    problems = h.status()["gateway"]["problems"]
    assert list(problems) == [f"edge 127.0.0.1:{bad}"]
    why = problems[f"edge 127.0.0.1:{bad}"]
    assert f"the key in {bad_key} does not match the certificate in {bad_cert}" in why, why
    assert "listener not opened" in why
    assert "does not match the certificate" in h.log_tail(400)
    doctor = h.cli("doctor", "-o", "json", timeout=120)
    found = [c for c in json.loads(doctor.stdout)["checks"]
             if c["name"] == f"gateway edge 127.0.0.1:{bad}"]
    assert found and found[0]["status"] == "fail" and "does not match" in found[0]["detail"], \
        doctor.stdout[-2000:]
    listeners = h.status()["gateway"]["listeners"]
    assert sorted((li["address"], li["protocol"]) for li in listeners) == \
        sorted([(f"127.0.0.1:{good}", "https"), (f"127.0.0.1:{plain}", "http")])
    assert {li["service"] for li in listeners} == {"edge"}
    # the gateway calls into the mesh as its service: this host asks for that identity
    assert "edge" in h.status()["gateway"]["services"]
    # the key file fixed in place (no apply): the agent notices, the listener opens
    tmp_key = site.tmp / "bad.key.new"
    tmp_key.write_bytes(site.certs["shop"][1].read_bytes())
    tmp_key.rename(bad_key)
    wait_for("the fixed listener serving", lambda: refused(h, bad) is False, 20)
    out, body, _ = curl(site, f"https://shop.example.com:{bad}/x", "--resolve",
                        f"shop.example.com:{bad}:127.0.0.1")
    assert out["http_code"] == 200 and json.loads(body)["name"] == "shop-0"
    assert h.status()["gateway"]["problems"] == {}
    # deleted: both ports are closed (no worker keeps them)
    assert h.cli("delete", "Gateway", "edge").returncode == 0
    wait_for("the gateway ports closed",
             lambda: refused(h, good) and refused(h, bad) and refused(h, plain), 20)


def run_chromium(h: Host, exe: str, url: str, tmp: Path, rules: str) -> str:
    """Headless Chromium in the host's namespace: the page's DOM once its scripts ran."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    argv = ["nsenter", f"--net=/run/netns/{h.netns}", exe, "--headless=new", "--no-sandbox",
            "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={profile}", f"--host-resolver-rules={rules}",
            "--ignore-certificate-errors", "--virtual-time-budget=8000", "--dump-dom", url]
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


def test_a_browser_loads_a_page_through_the_gateway(site: Site) -> None:
    exe = chromium()
    h = site.h
    backend = free_port()
    p = h.popen([sys.executable, "-c", PAGE_SERVER, str(backend)], "shop",
                stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening"
    h.call("service.add", name="shop", patch={"port": 80, "protocol": "http"})
    h.wait_endpoints("shop", {f"127.0.0.1:{backend}"})
    port = free_port()
    done = apply(site, route("shop", ["shop.example.com"]), gateway_doc([
        {"address": "127.0.0.1", "port": port,
         "certificates": [cert_entry(site, "shop", ["shop.example.com"])]}]))
    assert done.returncode == 0, done.stderr
    wait_for("the gateway serving", lambda: refused(h, port) is False, 20)
    dom = run_chromium(h, exe, f"https://shop.example.com:{port}/", site.tmp,
                       "MAP shop.example.com 127.0.0.1")
    # the page came through, and so did its script and the script's fetch
    assert '<h1 id="title">the shop</h1>' in dom, dom
    assert f"api says world via shop.example.com:{port}" in dom, dom
    status, body = h.http_get("/seen", port=backend)
    assert status == 200
    seen = json.loads(body)
    assert {"/", "/app.js", "/api"} <= set(seen), seen


def test_the_listener_outlives_an_agent_restart(site: Site) -> None:
    """The workers hold the listener like the inbound one: it serves while no agent runs,
    the next agent takes it back (no second bind, no error), and deleting the Gateway then
    closes it everywhere."""
    h = site.h
    http_service(h, "shop", 1)
    port = free_port()
    done = apply(site, route("shop", ["shop.example.com"]), gateway_doc([
        {"address": "127.0.0.1", "port": port,
         "certificates": [cert_entry(site, "shop", ["shop.example.com"])]}]))
    assert done.returncode == 0, done.stderr
    wait_for("the gateway serving", lambda: refused(h, port) is False, 20)

    def shop() -> str:
        out, body, _ = curl(site, f"https://shop.example.com:{port}/", "--resolve",
                            f"shop.example.com:{port}:127.0.0.1")
        assert out["http_code"] == 200, (out, body)
        return str(json.loads(body)["name"])

    assert shop() == "shop-0"
    h.stop()  # a restart's stop: the data plane serves on
    assert shop() == "shop-0"
    h.start()
    assert shop() == "shop-0"
    assert h.status()["gateway"]["problems"] == {}
    assert "cannot listen" not in h.log_tail(400)
    assert h.cli("delete", "Gateway", "edge").returncode == 0
    wait_for("the gateway port closed", lambda: refused(h, port), 20)


def test_a_per_source_rate_limit_at_the_gateway_is_per_client_address(site: Site) -> None:
    """Callers from outside the mesh all come "from" the gateway's service: a per-source
    limit keys on each client's address instead, so one client cannot spend another's."""
    h = site.h
    http_service(h, "shop", 1)
    (plain,) = ports(1)
    limited = {"kind": "Route", "name": "shop", "spec": {
        "service": "shop", "hosts": ["shop.example.com"],
        "rules": [{"name": "all", "rateLimit": {"requestsPerSecond": 0.01, "burst": 2,
                                                "perSource": True}}]}}
    done = apply(site, limited,
                 gateway_doc([{"address": "127.0.0.1", "port": plain, "protocol": "http"}]))
    assert done.returncode == 0, done.stderr
    wait_for("the gateway serving", lambda: refused(h, plain) is False, 20)

    def statuses(client: str) -> list[tuple[int, str]]:
        out = []
        for _ in range(6):  # a connection each: whichever worker accepts it
            got, _, head = curl(site, f"http://shop.example.com:{plain}/p", "--resolve",
                                f"shop.example.com:{plain}:127.0.0.1", "--interface", client)
            retry = next((line.split(":", 1)[1].strip() for line in head.splitlines()
                          if line.lower().startswith("retry-after:")), "")
            out.append((got["http_code"], retry))
        return out

    # Each worker holds its share of the burst (2 over the host's workers, at least 1 each)
    # and refills at its share of 0.01/s: a client gets at most 2 answers, then 429s with
    # a long Retry-After. The second address has buckets of its own: it is answered too.
    first, second = statuses("127.0.0.2"), statuses("127.0.0.3")
    for got in (first, second):
        ok = [s for s, _ in got if s == 200]
        others = [(s, r) for s, r in got if s != 200]
        assert 1 <= len(ok) <= 2, got
        assert all(s == 429 and r.isdigit() and int(r) >= 100 for s, r in others), got
