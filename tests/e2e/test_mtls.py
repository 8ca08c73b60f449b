"""Security across hosts: three namespaces on a bridge, an agent each, one etcd; host 0 holds
the mesh CA, the others joined it with single-use tokens. What an operator must be able to
rely on, checked where it shows: on the wire (the bridge), at the client, in the metrics.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fabric import Fabric
from tests.e2e.sniff import Sniffer
from tests.harness import Host, Probe, wait_for
from tests.integration import progs

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

ECHO_PORT = 18090
NAME_PORT = 18080


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    f = Fabric(tmp_path_factory.mktemp("mtls"), hosts=3, etcd_members=1, ttl=3)
    try:
        f.start_with_ca("e2e.test")
        yield f
    finally:
        f.close()


def echo_server(h: Host, service: str, port: int = ECHO_PORT) -> subprocess.Popen[Any]:
    p = h.popen([sys.executable, "-c", progs.ECHO_SERVER, str(port), "0.0.0.0"], service,
                stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "listening"
    return p


def metric(h: Host, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    _, text = h.http_get("/metrics")
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def service(f: Fabric, name: str, **spec: Any) -> str:
    """Create or change a service (from host 0); returns its VIP once every host sees it."""
    vip = str(f.hosts[0].call("service.add", name=name, patch=spec)["vip"])
    return vip


def workload_identity(h: Host, svc: str) -> None:
    def held() -> bool:  # by the agent, and applied by every worker (the agent's barrier)
        ident = h.status()["identity"]
        return svc in ident["services"] and ident["workers_generation"] == ident["generation"]

    wait_for(f"{h.node}'s workers present {svc}'s identity", held, timeout=30)


def echoed(client: Probe, vip: str, port: int, data: str) -> dict[str, Any]:
    opened = client.ask(op="open", host=vip, port=port)
    assert opened["ok"], opened
    return client.ask(op="ping", id=opened["id"], data=data)


@pytest.fixture(scope="module")
def web(fabric: Fabric) -> Iterator[str]:
    """Service `secure` (STRICT) with one echo instance on host 1; a client on host 0."""
    vip = service(fabric, "secure", port=80, mtls="STRICT")
    echo_server(fabric.hosts[1], "secure")
    want = {f"{fabric.ip(1)}:{ECHO_PORT}"}
    for h in fabric.hosts:
        h.wait_endpoints("secure", want)
    yield vip


def test_cross_host_calls_are_encrypted_in_strict_and_clear_with_disable(
        fabric: Fabric, web: str) -> None:
    h0, h1 = fabric.hosts[0], fabric.hosts[1]
    client = h0.probe(service="client")
    workload_identity(h0, "client")
    marker = "MARKER-" + secrets.token_hex(8)
    with Sniffer(fabric.switch) as wire:
        reply = echoed(client, web, 80, marker)
    assert reply["ok"] and reply["reply"] == marker, reply
    assert wire.bytes > 0, "the sniffer saw nothing on the bridge"
    assert max(map(len, wire.frames)) > 1000, "no handshake seen (certificates cross)"
    assert not wire.saw(marker.encode()), "the payload crossed the bridge in the clear"
    # the inbound side saw who called: both identities on its metrics
    wait_for("h1 counts an inbound mTLS connection from client",
             lambda: metric(h1, "meshnode_inbound_connections_total",
                            src_identity="spiffe://e2e.test/svc/client",
                            dst_identity="spiffe://e2e.test/svc/secure") >= 1, timeout=10)
    # the same call with the service opted out: plaintext, visible on the wire
    service(fabric, "secure", mtls="DISABLE")
    seen: list[int] = []

    def clear_on_the_wire() -> bool:
        marker2 = "CLEAR-" + secrets.token_hex(8)
        with Sniffer(fabric.switch) as wire:
            reply = echoed(client, web, 80, marker2)
        assert reply["ok"] and reply["reply"] == marker2, reply
        seen.append(len(wire.frames))
        return wire.saw(marker2.encode())

    wait_for("DISABLE sends plaintext across the bridge", clear_on_the_wire, timeout=10)
    print(f"\nframes seen per try until the payload showed in the clear: {seen}")
    service(fabric, "secure", mtls="STRICT")


def plaintext_connect(h: Host, ip: str, port: int) -> tuple[bool, float, str]:
    """A client on host h that is not in the mesh (no capture): connect straight to ip:port."""
    script = ("import socket, sys, time\nt = time.monotonic()\ntry:\n"
              " s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
              " s.sendall(b'hi\\n'); d = s.recv(10)\n"
              " print('ok', time.monotonic() - t, d)\n"
              "except OSError as e:\n print('error', time.monotonic() - t, e.errno)\n")
    out = subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-c",
                          script, ip, str(port)], capture_output=True, text=True,
                         timeout=30).stdout.split()
    return out[0] == "ok", float(out[1]), " ".join(out[2:])


def test_strict_refuses_plaintext_from_another_host_permissive_counts_it(
        fabric: Fabric, web: str) -> None:
    h0, h1 = fabric.hosts[0], fabric.hosts[1]
    ok, seconds, why = plaintext_connect(h0, fabric.ip(1), ECHO_PORT)
    assert not ok and why == "111" and seconds < 1.0, (ok, seconds, why)  # ECONNREFUSED, at once
    assert metric(h1, "meshnode_inbound_plaintext_total", verdict="refused") >= 1
    service(fabric, "secure", mtls="PERMISSIVE")
    wait_for("PERMISSIVE reaches h1's kernel",
             lambda: plaintext_connect(h0, fabric.ip(1), ECHO_PORT)[0], timeout=10)
    assert metric(h1, "meshnode_inbound_plaintext_total", service="secure",
                  verdict="accepted") >= 1
    # the endpoint's own host is local: it may always connect in the clear
    ok, _, _ = plaintext_connect(h1, fabric.ip(1), ECHO_PORT)
    assert ok
    service(fabric, "secure", mtls="STRICT")
    wait_for("STRICT again", lambda: not plaintext_connect(h0, fabric.ip(1), ECHO_PORT)[0],
             timeout=10)


def handshake_failures(h: Host) -> float:
    """Server-side handshakes that did not end full or resumed (result names the cause)."""
    return (metric(h, "meshnode_tls_handshakes_total", side="server")
            - metric(h, "meshnode_tls_handshakes_total", side="server", result="full")
            - metric(h, "meshnode_tls_handshakes_total", side="server", result="resumed"))


def tls_client(h: Host, ip: str, cert: Path | None, key: Path | None) -> str:
    """A TLS client on host h to ip:15008 with this certificate (or none): how it ended."""
    script = ("import socket, ssl, sys\n"
              "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False\n"
              "ctx.verify_mode = ssl.CERT_NONE\n"
              "if sys.argv[2] != '-': ctx.load_cert_chain(sys.argv[2], sys.argv[3])\n"
              "try:\n"
              " s = ctx.wrap_socket(socket.create_connection((sys.argv[1], 15008), timeout=5))\n"
              " s.sendall(b'\\x00\\x10garbage-preamble'); d = s.recv(100)\n"
              " print('open', d)\n"
              "except (OSError, ssl.SSLError) as e:\n print('refused', type(e).__name__)\n")
    return subprocess.run(["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-c",
                           script, ip, str(cert or "-"), str(key or "-")],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def test_missing_or_foreign_certificates_are_refused(fabric: Fabric, web: str,
                                                     tmp_path: Path) -> None:
    from tests.tls_certs import foreign_pair

    h0, h1 = fabric.hosts[0], fabric.hosts[1]
    before = handshake_failures(h1)
    assert tls_client(h0, fabric.ip(1), None, None).startswith("refused")
    cert, key = foreign_pair(tmp_path)  # a valid-looking SPIFFE cert from another CA
    assert tls_client(h0, fabric.ip(1), cert, key).startswith("refused")
    wait_for("h1 counts both refusals",
             lambda: handshake_failures(h1) >= before + 2, timeout=10)


def test_revoked_host_is_refused_mesh_wide(fabric: Fabric, web: str, tmp_path: Path) -> None:
    h0, h1, h2 = fabric.hosts
    c2 = h2.probe(service="client")
    workload_identity(h2, "client")
    assert echoed(c2, web, 80, "before")["reply"] == "before"
    # what a compromised h2 would keep presenting: its node certificate and key
    ident = h2.tmp / "state" / h2.tag / "identity"
    cert, key = tmp_path / "h2.pem", tmp_path / "h2.key"
    cert.write_bytes((ident / "node.pem").read_bytes())
    key.write_bytes((ident / "node.key").read_bytes())
    done = h0.cli("ca", "revoke-host", h2.node)
    assert done.returncode == 0, done.stderr
    t0 = time.monotonic()

    def refused() -> bool:
        r = c2.ask(op="open", host=web, port=80)
        if not r["ok"]:
            return True
        return not c2.ask(op="ping", id=r["id"], data="after")["ok"]

    wait_for("h2's calls refused", refused, timeout=15)
    print(f"\nh2's own calls refused {time.monotonic() - t0:.1f}s after the revocation")
    # h1 itself refuses the revoked certificate, whoever presents it
    wait_for("h1 refuses h2's certificate",
             lambda: (tls_client(h2, fabric.ip(1), cert, key),
                      metric(h1, "meshnode_tls_handshakes_total", side="server",
                             result="revoked") >= 1)[1], timeout=15)
    print(f"h1 refuses h2's certificate {time.monotonic() - t0:.1f}s after the revocation")
    # everyone else keeps calling
    c0 = h0.probe(service="client")
    assert echoed(c0, web, 80, "still")["reply"] == "still"


def test_ca_status_shows_hosts_and_expiry(fabric: Fabric) -> None:
    done = fabric.hosts[0].cli("ca", "status")
    assert done.returncode == 0, done.stderr
    print("\n" + done.stdout)
    assert "e2e.test" in done.stdout
    assert re.search(r"h1", done.stdout)


def test_a_restart_with_the_ca_down_keeps_identities(fabric: Fabric, web: str) -> None:
    """The CA's host is down; host 1 restarts under load: it serves on with the identities
    it held (no round trip to the CA, and its workers never see them go), and no STRICT call
    into it fails."""
    h0, h1 = fabric.hosts[0], fabric.hosts[1]
    workload_identity(h1, "secure")
    client = h0.probe(service="client")
    assert echoed(client, web, 80, "one")["reply"] == "one"
    loader = h0.probe(service="client")  # enrolled while h0's agent runs
    h0.stop()  # the CA's agent; h0's workers keep serving
    try:
        with Load(loader, web, ping=True) as load:
            load.until(10)
            h1.stop()
            h1.start()
            load.until(load.ok + 50)  # calls into the restarted host
        ident = h1.status()["identity"]
        assert ident["ready"] and "secure" in ident["services"], ident
        print(f"\nrestart under load, CA down: {load.ok} calls, {load.failed} failed")
        assert load.ok > 10 and load.failed == 0, load.errors[:5]
        assert echoed(client, web, 80, "two")["reply"] == "two"
    finally:
        h0.start()


class Load:
    """Calls from an enrolled client, one after another, counting failures."""

    def __init__(self, client: Probe, vip: str, ping: bool = False) -> None:
        self.client, self.vip, self.ping = client, vip, ping
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.ping:  # an echo server: open, one line there and back
                r = self.client.ask(op="open", host=self.vip, port=80)
                if r["ok"]:
                    r = self.client.ask(op="ping", id=r["id"], data="x")
            else:
                r = self.client.connect(self.vip, 80)
            if r["ok"] and r["reply"]:
                self.ok += 1
            else:
                self.failed += 1
                self.errors.append(str(r))

    def until(self, calls: int) -> None:
        """Wait until `calls` calls have answered (failures are counted, not waited for)."""
        wait_for(f"{calls} calls answered", lambda: self.ok >= calls or self.failed > 0,
                 timeout=60)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_root_rotation_under_load_loses_no_call(tmp_path: Path) -> None:
    f = Fabric(tmp_path, hosts=2, etcd_members=1, ttl=3)
    try:
        f.start_with_ca("rot.test")
        h0, h1 = f.hosts
        vip = service(f, "named", port=80, mtls="STRICT", balancer={"algorithm": "round-robin"})
        h1.server("h1", NAME_PORT, service="named", host="0.0.0.0")
        h0.wait_endpoints("named", {f"{f.ip(1)}:{NAME_PORT}"})
        client = h0.probe(service="client")
        workload_identity(h0, "client")
        old = _active_root(h0)
        with Load(client, vip) as load:
            load.until(10)
            added = h0.cli("ca", "root", "add")
            assert added.returncode == 0, added.stderr
            new = re.search(r"root (\S+) added", added.stdout)
            assert new, added.stdout
            done = h0.cli("ca", "root", "activate", new.group(1))
            assert done.returncode == 0, done.stderr
            # every leaf renewed under the new root before the old one goes
            for h in f.hosts:
                wait_for(f"{h.node} renewed under the new root",
                         lambda h=h: _renewed(h, old), timeout=60)
            done = h0.cli("ca", "root", "remove", old)
            assert done.returncode == 0, done.stderr
            load.until(load.ok + 50)  # calls after the old root is gone
        print(f"\nroot rotation under load: {load.ok} calls, {load.failed} failed")
        assert load.ok > 20 and load.failed == 0, load.errors[:5]
    finally:
        f.close()


def _active_root(h: Host) -> str:
    import json

    s = json.loads(h.cli("ca", "status", "-o", "json").stdout)
    return str(next(r["fingerprint"] for r in s["roots"] if r.get("active")))


def _renewed(h: Host, old_root: str) -> bool:
    ident = h.status()["identity"]
    return bool(ident["ready"]) and all(
        s["root"] and s["root"] != old_root for s in [ident["node"], *ident["services"].values()])


def test_expired_leaf_is_never_presented(tmp_path: Path) -> None:
    """Host 1's clock is pushed past its certificates' end (an injected clock): it drops
    them at once, and a STRICT call to it fails instead of meeting an expired certificate."""
    f = Fabric(tmp_path, hosts=2, etcd_members=1, ttl=3)
    try:
        f.start_with_ca("exp.test")
        h0, h1 = f.hosts
        vip = service(f, "late", port=80, mtls="STRICT")
        h1.server("h1", NAME_PORT, service="late", host="0.0.0.0")
        h0.wait_endpoints("late", {f"{f.ip(1)}:{NAME_PORT}"})
        client = h0.probe(service="client")
        workload_identity(h0, "client")
        assert client.connect(vip, 80)["reply"] == "h1"
        h1.stop()  # a restart: the workers keep serving; the new agent has the pushed clock
        h1.start(env={"MESHNODE_CLOCK_OFFSET": str(2 * 86400)})
        wait_for("h1 dropped its expired identity",
                 lambda: not h1.status()["identity"]["ready"], timeout=20)
        # said at once, when the agent read the certificate: before any worker could get it
        assert "node certificate spiffe://exp.test/node/h1 expired: not presented" in \
            h1.log_tail(400)
        wait_for("STRICT calls to h1 fail",
                 lambda: not client.connect(vip, 80)["ok"] or
                 not client.connect(vip, 80).get("reply"), timeout=20)
    finally:
        f.close()

