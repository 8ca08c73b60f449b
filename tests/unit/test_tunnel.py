"""mTLS between two real worker processes on loopback: host "a" (outbound, explicit mode, its
listener on 127.0.0.3) and host "b" (its inbound listener on 127.0.0.2, handed down as the
agent would: WorkerConfig.inbound_fd). The test plays both agents over the control
socketpairs (Identities, Peers, Security, routes) and a third party poking b's inbound
listener with bad input. Certificates come from tests/tls_certs.py.

Authorization is still a stub that allows everything (policy/authz.py); to see a denial end to
end, the workers run with AuthzTable.decide replaced by one that denies the identities listed
in MESHNODE_TEST_DENY (`_WORKER`), the only test seam.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode.config import WorkerConfig
from meshnode.model import Endpoint, HostPort, Reset, ServiceSpec
from meshnode.proxy.tls import _context
from meshnode.tunnel_wire import HEADER, Answer, Preamble, decode_answer, encode_frame
from meshnode.wire import (
    AgentMessage,
    CgroupSources,
    Identities,
    Peers,
    Security,
    StatsReply,
    StatsRequest,
    encode,
    update_message,
    worker_codec,
)
from tests.tls_certs import Pki, make_pki
from tests.unit.test_worker import Backend, free_port, recv_all, wait_for

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
VIP = "127.240.0.20"
TD = "mesh.test"
HANDSHAKE_TIMEOUT = 1.0
BULK = 8 * 1024 * 1024
_WORKER = """
import os, sys
from meshnode.policy import authz
deny = set(filter(None, os.environ.get("MESHNODE_TEST_DENY", "").split(",")))
def decide(self, src, dst, port, method=None, path=None, *, opaque=False):
    if src in deny:
        return authz.Decision(False, policy="test-deny", reason=f"{src} is denied")
    return authz.Decision(True, reason="allowed")
authz.AuthzTable.decide = decide
from meshnode.proxy.worker import main
sys.exit(main(sys.argv[1:]))
"""


class Proc:
    """A worker process and the agent's end of its control channel."""

    def __init__(self, node: str, listen: str, target: str, inbound: socket.socket | None,
                 log: Path, env: dict[str, str] | None = None) -> None:
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl.settimeout(15)
        self.port = free_port()
        self.listen = listen
        fds = [child.fileno()]
        if inbound is not None:
            fds.append(inbound.fileno())
        config = WorkerConfig(
            worker_id=1, listen_host=listen, listen_port=self.port, mark=0,
            connect_timeout=2.0, control_fd=child.fileno(), explicit_target=target,
            node=node, access_log=str(log),
            inbound_fd=inbound.fileno() if inbound is not None else -1,
            handshake_timeout=HANDSHAKE_TIMEOUT)
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, *config.to_argv()],
                                     pass_fds=fds, cwd=REPO, env={**os.environ, **(env or {})})
        child.close()
        self.log = log
        self._rfile = self.ctl.makefile("rb")
        self._seq = 0
        msg = json.loads(self._rfile.readline())
        assert msg["t"] == "listening", msg

    def send(self, *msgs: AgentMessage) -> None:
        for m in msgs:
            self.ctl.sendall(encode(m))
        self._seq += 1
        self.ctl.sendall(json.dumps({"t": "sync", "seq": self._seq}).encode() + b"\n")
        assert json.loads(self._rfile.readline())["t"] == "synced"

    def stats(self) -> StatsReply:
        self._seq += 1
        self.ctl.sendall(encode(StatsRequest(self._seq)))
        reply = worker_codec().decode(self._rfile.readline())
        assert isinstance(reply, StatsReply)
        return reply

    def labelled(self, name: str) -> dict[tuple[str, ...], int]:
        return {tuple(r.labels): r.value for r in self.stats().labelled.get(name, ())}

    def connect(self) -> socket.socket:
        return socket.create_connection((self.listen, self.port), timeout=15)

    def access(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.ctl.close()


@dataclass
class Mesh:
    pki: Pki
    a: Proc
    b: Proc
    backend: Backend
    inbound: tuple[str, int]
    ids_b: Identities

    def ask(self, payload: bytes = b"hello") -> bytes:
        with self.a.connect() as s:
            s.sendall(b"ECHO\n" + payload)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)


def _spec() -> ServiceSpec:
    return ServiceSpec.build("web", 1, IPv4Address(VIP), 80)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    pki = make_pki(tmp_path / "pki", TD)
    backend = Backend("web-on-b", random.Random(1).randbytes(BULK))
    inbound = socket.create_server(("127.0.0.2", 0))
    addr = inbound.getsockname()
    ep = Endpoint(HostPort.parse(backend.addr), node="b")
    b = Proc("b", "127.0.0.2", f"{VIP}:80", inbound, tmp_path / "b.log",
             {"MESHNODE_TEST_DENY": f"spiffe://{TD}/svc/denied"})
    inbound.close()  # the worker holds it now
    a = Proc("a", "127.0.0.3", f"{VIP}:80", None, tmp_path / "a.log")
    ids_b = Identities(TD, str(pki.bundle), str(pki.node("b")), generation=1)
    b.send(ids_b, Security("STRICT"), update_message(Reset(_spec(), (ep,))))
    a.send(Identities(TD, str(pki.bundle), str(pki.node("a")),
                      {"client": str(pki.service("client", "a")),
                       "denied": str(pki.service("denied", "a"))}, generation=1),
           Peers({"b": f"{addr[0]}:{addr[1]}"}), Security("STRICT"),
           CgroupSources({"0": "client"}), update_message(Reset(_spec(), (ep,))))
    m = Mesh(pki, a, b, backend, addr, ids_b)
    try:
        yield m
    finally:
        a.stop()
        b.stop()
        backend.close()


def _wait_log(p: Proc, cond: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    wait_for(lambda: bool(found.extend(x for x in p.access() if cond(x)) or found),
             what="an access log line")
    return found[0]


def _assert_reset(p: Proc) -> None:
    """The worker resets the client (on loopback the RST can beat connect()'s return)."""
    with contextlib.suppress(ConnectionResetError), p.connect() as s:
        s.sendall(b"ECHO\nsecret")
        assert recv_all(s) == b""


# -- the path works --------------------------------------------------------------------------

def test_bytes_cross_the_tunnel_intact_and_both_sides_know_who(mesh: Mesh) -> None:
    assert mesh.ask(b"ping") == b"ping"
    upload = random.Random(2).randbytes(BULK)
    with mesh.a.connect() as s:
        s.sendall(f"BULK {BULK}\n".encode() + upload)
        s.shutdown(socket.SHUT_WR)  # half-close through the tunnel
        reply = recv_all(s)
    assert reply[:32] == hashlib.sha256(upload).digest()
    assert hashlib.sha256(reply[32:]).digest() == hashlib.sha256(mesh.backend.payload).digest()
    client, web = f"spiffe://{TD}/svc/client", f"spiffe://{TD}/svc/web"
    assert mesh.a.labelled("tunnels") == {("out", "b"): 2}
    assert mesh.b.labelled("tunnels") == {("in", "a"): 2}
    wait_for(lambda: mesh.b.labelled("inbound_active").get((client, web)) == 0,
             what="the inbound relays to end")
    assert mesh.b.labelled("inbound_connections") == {(client, web): 2}
    assert mesh.b.labelled("inbound_bytes_up")[(client, web)] > BULK
    line = _wait_log(mesh.b, lambda x: x["bytes_down"] > BULK)
    assert (line["src_identity"], line["dst_identity"], line["src"]) == (client, web, "client")
    assert line["outcome"] == "ok" and line["endpoint"] == mesh.backend.addr
    out = _wait_log(mesh.a, lambda x: x["bytes_down"] > BULK)
    assert (out["src_identity"], out["dst_identity"]) == (client, web)
    # the app's bytes never travel in the clear: the backend saw the inbound worker's connect
    assert mesh.backend.accepted == 2


def test_an_interactive_exchange_flows_both_ways_without_a_fin(mesh: Mesh) -> None:
    """Turns of a conversation, each waiting for the other side: nothing may wait for more
    bytes (or an EOF) to arrive before it is passed on."""
    with mesh.a.connect() as s:
        s.sendall(b"ECHO\n")
        for i in range(50):
            msg = bytes([65 + i % 26]) * (1 + i * 311)
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(65536)
            assert got == msg


def test_sessions_resume_per_identity_and_host(mesh: Mesh) -> None:
    for _ in range(10):
        assert mesh.ask() == b"hello"
    server = mesh.b.labelled("tls_handshakes")
    client = mesh.a.labelled("tls_handshakes")
    assert server == {("server", "full"): 1, ("server", "resumed"): 9}
    assert client == {("client", "full"): 1, ("client", "resumed"): 9}


def test_a_rotated_node_certificate_rekeys_tickets_once(mesh: Mesh) -> None:
    """Ticket keys come from the node key: after a rotation one full handshake, then resumed
    again (and the new certificate is what the server presents)."""
    assert mesh.ask() == b"hello"
    mesh.b.send(Identities(TD, str(mesh.pki.bundle), str(mesh.pki.leaf(
        "node-b-2", f"spiffe://{TD}/node/b", "node/b", "b")), generation=2))
    assert mesh.ask() == b"hello"
    assert mesh.ask() == b"hello"
    assert mesh.b.labelled("tls_handshakes") == {("server", "full"): 2, ("server", "resumed"): 1}


def test_tickets_resume_on_another_worker_of_the_host(tmp_path: Path) -> None:
    """Two workers accept from one inbound listener, one after the other: a ticket the first
    issued resumes on the second (shared ticket keys, tickets.py)."""
    pki = make_pki(tmp_path / "pki", TD)
    backend = Backend("web-on-b")
    inbound = socket.create_server(("127.0.0.2", 0))
    ep = Endpoint(HostPort.parse(backend.addr), node="b")
    ids = Identities(TD, str(pki.bundle), str(pki.node("b")), generation=1)
    ctx = _client_ctx(pki, pki.service("client", "a"))
    workers = []
    try:
        session = None
        for i in range(2):
            w = Proc("b", "127.0.0.2", f"{VIP}:80", inbound, tmp_path / f"b{i}.log")
            workers.append(w)
            w.send(ids, Security("STRICT"), update_message(Reset(_spec(), (ep,))))
            raw = socket.create_connection(inbound.getsockname(), timeout=10)
            with ctx.wrap_socket(raw, session=session, suppress_ragged_eofs=False) as s:
                assert _exchange(s, Preamble(backend.addr, "web")) == Answer(True)
                assert s.session_reused == (i == 1)
                session = s.session
            expect = {("server", "resumed" if i else "full"): 1}
            assert w.labelled("tls_handshakes") == expect
            w.stop()  # the next connection can only go to the next worker
    finally:
        for w in workers:
            w.stop()
        inbound.close()
        backend.close()


def test_a_denied_identity_is_refused_and_counted(mesh: Mesh) -> None:
    mesh.a.send(CgroupSources({"0": "denied"}))
    _assert_reset(mesh.a)
    denied = f"spiffe://{TD}/svc/denied"
    wait_for(lambda: mesh.b.labelled("authz_denied") == {(denied, "web", "test-deny"): 1},
             what="the denial to be counted")
    assert mesh.b.labelled("tunnel_refusals") == {("server", "denied"): 1}
    assert mesh.a.labelled("tunnel_refusals") == {("client", "peer_denied"): 1}
    line = _wait_log(mesh.b, lambda x: x["outcome"] == "tunnel_denied")
    assert (line["src_identity"], line["dst_identity"]) == (denied, f"spiffe://{TD}/svc/web")
    assert mesh.backend.accepted == 0
    mesh.a.send(CgroupSources({"0": "client"}))
    assert mesh.ask() == b"hello"  # and the worker serves on


def test_strict_without_a_tunnel_refuses_and_permissive_goes_plain(mesh: Mesh) -> None:
    mesh.a.send(Peers({}))
    _assert_reset(mesh.a)
    assert mesh.a.labelled("tunnel_refusals") == {("client", "no_peer"): 1}
    mesh.a.send(Security("PERMISSIVE"))
    assert mesh.ask() == b"hello"  # plaintext, straight to the endpoint
    assert mesh.b.labelled("tunnels") == {}


# -- bad input at the inbound listener -------------------------------------------------------

def _client_ctx(pki: Pki, chain: Path | None) -> ssl.SSLContext:
    if chain is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(pki.bundle))
        return ctx
    return _context(False, str(pki.bundle), str(chain))


def _tls(mesh: Mesh, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
         ) -> ssl.SSLSocket:
    raw = socket.create_connection(mesh.inbound, timeout=10)
    return ctx.wrap_socket(raw, session=session, suppress_ragged_eofs=False)


def _refused_after_handshake(s: ssl.SSLSocket) -> None:
    """TLS 1.3: the client's handshake ends before the server judged its certificate; the
    verdict is the next read (an alert, or the connection cut)."""
    with pytest.raises((ssl.SSLError, ConnectionResetError, ConnectionAbortedError,
                        BrokenPipeError)):
        s.sendall(encode_frame(Preamble("127.0.0.1:1", "web")))
        if not s.recv(100):
            raise ConnectionAbortedError("closed")


def _exchange(s: ssl.SSLSocket, preamble: Preamble) -> Answer:
    s.sendall(encode_frame(preamble))
    head = s.recv(HEADER)
    body = b""
    n = int.from_bytes(head, "big")
    while len(body) < n:
        body += s.recv(n - len(body))
    return decode_answer(body)


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.mark.parametrize("case", ["no_client_cert", "trust_domain", "untrusted", "expired",
                                  "not_yet_valid", "revoked", "wrong_kind"])
def test_bad_certificates_are_refused_and_counted(mesh: Mesh, case: str) -> None:
    pki = mesh.pki
    chain = {
        "no_client_cert": None,
        "trust_domain": pki.leaf("other-td", "spiffe://other.test/svc/x", "x", "a"),
        "untrusted": pki.foreign("foreign", f"spiffe://{TD}/svc/x", "a"),
        "expired": pki.service("old", "a", start_days=-3, end_days=-1),
        "not_yet_valid": pki.service("early", "a", start_days=1, end_days=3),
        "revoked": pki.service("client", "gone"),
        "wrong_kind": pki.leaf("two-uris", "https://example.org/x", "x", "a"),
    }[case]
    if case == "revoked":
        mesh.b.send(Identities(TD, str(pki.bundle), mesh.ids_b.node, revoked_nodes=("gone",),
                               generation=2))
    with _tls(mesh, _client_ctx(pki, chain)) as s:
        _refused_after_handshake(s)
    cause = "bad_identity" if case == "wrong_kind" else case
    wait_for(lambda: mesh.b.labelled("tls_handshakes").get(("server", cause)) == 1,
             what=f"the {cause} refusal to be counted")
    line = _wait_log(mesh.b, lambda x: x["outcome"] == f"tls_{cause}")
    assert line["client"].startswith("127.0.0.1:")
    assert mesh.ask() == b"hello"  # the worker is fine
    assert mesh.backend.accepted == 1


def test_a_revoked_host_is_refused_on_a_resumed_session_too(mesh: Mesh) -> None:
    ctx = _client_ctx(mesh.pki, mesh.pki.service("client", "c"))
    with _tls(mesh, ctx) as s:
        assert _exchange(s, Preamble(mesh.backend.addr, "web")) == Answer(True)
        session = s.session
    assert session is not None and session.has_ticket
    mesh.b.send(Identities(TD, str(mesh.pki.bundle), mesh.ids_b.node, revoked_nodes=("c",),
                           generation=2))
    with _tls(mesh, ctx, session) as s:
        assert s.session_reused  # no chain verification happens on this one
        _refused_after_handshake(s)
    wait_for(lambda: mesh.b.labelled("tls_handshakes").get(("server", "revoked")) == 1,
             what="the revoked refusal")


def test_an_expiry_reached_under_a_resumed_session_is_refused(mesh: Mesh) -> None:
    """The leaf expires while its session can still resume: OpenSSL verifies nothing on a
    resumed session, the worker's own check (at security.clock.now()) refuses it."""
    ctx = _client_ctx(mesh.pki, mesh.pki.service("client", "a", end_days=3 / 86400))
    not_after = time.time() + 3
    with _tls(mesh, ctx) as s:
        assert _exchange(s, Preamble(mesh.backend.addr, "web")) == Answer(True)
        session = s.session
    assert session is not None and session.has_ticket
    wait_for(lambda: time.time() > not_after + 1, timeout=10, what="the leaf to expire")
    with _tls(mesh, ctx, session) as s:
        assert s.session_reused
        _refused_after_handshake(s)
    wait_for(lambda: mesh.b.labelled("tls_handshakes").get(("server", "expired")) == 1,
             what="the expired refusal")


@pytest.mark.parametrize("case", ["garbage", "scanner", "truncated", "stall_handshake",
                                  "stall_preamble", "bad_preamble", "not_local", "vip",
                                  "wrong_service"])
def test_bad_input_is_refused_or_timed_out_and_counted(mesh: Mesh, case: str) -> None:
    t0 = time.monotonic()
    good = _client_ctx(mesh.pki, mesh.pki.service("client", "a"))
    if case in ("garbage", "scanner", "truncated", "stall_handshake"):
        with socket.create_connection(mesh.inbound, timeout=10) as raw:
            if case == "garbage":
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            elif case in ("truncated", "stall_handshake"):
                hello = _client_hello()
                raw.sendall(hello[: len(hello) // 2])
            if case in ("scanner", "truncated"):
                raw.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(4096):
                    pass  # a TLS alert maybe, then the end
        cause = {"garbage": "protocol", "scanner": "eof", "truncated": "eof",
                 "stall_handshake": "timeout"}[case]
        wait_for(lambda: mesh.b.labelled("tls_handshakes").get(("server", cause)) == 1,
                 what=f"{cause} counted")
    elif case == "stall_preamble":
        with _tls(mesh, good) as s, contextlib.suppress(ConnectionResetError, ssl.SSLError):
            assert s.recv(100) == b""  # cut after handshake_timeout
        wait_for(lambda: mesh.b.labelled("tunnel_refusals").get(
            ("server", "preamble_timeout")) == 1, what="the stall counted")
    else:
        target = {"bad_preamble": "", "not_local": "127.0.0.1:22",
                  "vip": f"{VIP}:80", "wrong_service": mesh.backend.addr}[case]
        with _tls(mesh, good) as s:
            if case == "bad_preamble":
                s.sendall(b"\x00\x05hello")
                reason = "bad_preamble"
                got = decode_answer(s.recv(100)[HEADER:])
            else:
                reason = "wrong_service" if case == "wrong_service" else "not_local"
                got = _exchange(s, Preamble(target, "api" if case == "wrong_service"
                                            else "web"))
            assert got == Answer(False, reason)
            assert s.recv(100) == b""  # then a clean end
        wait_for(lambda: mesh.b.labelled("tunnel_refusals").get(("server", reason)) == 1,
                 what=f"{reason} counted")
    if case.startswith("stall"):
        assert HANDSHAKE_TIMEOUT * 0.9 < time.monotonic() - t0 < HANDSHAKE_TIMEOUT + 3
    assert mesh.ask() == b"hello"
    assert mesh.b.proc.poll() is None
