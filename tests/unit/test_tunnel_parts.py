"""The tunnel's pure parts: the preamble format, the peer checks (Trust) against real
certificates and the injected clock, TLS material refreshes, and the security counters from
the worker's stats reply to /metrics."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.counters import SECURITY_FIELDS
from meshnode.proxy.stats import WorkerStats
from meshnode.proxy.tickets import derive_keys, share_ticket_keys
from meshnode.proxy.tls import (
    ClientIdentity,
    PeerError,
    TlsMaterial,
    Trust,
    _context,
    skip_ticket,
)
from meshnode.security.clock import OFFSET_ENV
from meshnode.telemetry.aggregate import Accumulator
from meshnode.telemetry.metrics import MeshCollector
from meshnode.tunnel_wire import (
    HEADER,
    MAX_FRAME,
    Answer,
    FrameError,
    Preamble,
    decode_answer,
    decode_preamble,
    encode_frame,
    frame_length,
)
from meshnode.wire import Identities
from tests.tls_certs import Pki, make_pki
from tests.unit.test_telemetry import snapshot

TD = "mesh.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), TD)


def _peer_cert(pki: Pki, chain: Path) -> dict[str, object]:
    """getpeercert() of a server presenting `chain`, as a client sees it."""
    server = _context(True, str(pki.bundle), str(chain))
    client = _context(False, str(pki.bundle), str(pki.node("x")))
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    with a, b:
        s = server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        c = client.wrap_socket(b, do_handshake_on_connect=False)
        t = threading.Thread(target=s.do_handshake)
        t.start()
        c.do_handshake()
        t.join(5)
        cert = c.getpeercert()
        assert cert
        return dict(cert)


def test_preamble_round_trip_and_bad_frames() -> None:
    frame = encode_frame(Preamble("10.0.0.7:8080", "web", software="1"))
    n = frame_length(frame[:HEADER])
    assert n == len(frame) - HEADER
    assert decode_preamble(frame[HEADER:]) == Preamble("10.0.0.7:8080", "web", software="1")
    assert decode_answer(encode_frame(Answer(False, "denied"))[HEADER:]) == Answer(False,
                                                                                  "denied")
    assert encode_frame(Answer(True)) == b"\x00\x0b" + b'{"ok":true}'
    for head in (b"\x00\x00", (MAX_FRAME + 1).to_bytes(2, "big")):
        with pytest.raises(FrameError):
            frame_length(head)
    for body in (b"not json", b'{"service":"web"}', b'{"target":"a","service":"b","v":2}',
                 b"[1,2]"):
        with pytest.raises(FrameError):
            decode_preamble(body)


def test_trust_checks_domain_revocation_and_the_injected_clock(
        pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _peer_cert(pki, pki.node("b"))
    trust = Trust(TD)
    peer = trust.check(good, f"spiffe://{TD}/node/b")
    assert (peer.kind, peer.name, peer.node) == ("node", "b", "b")
    with pytest.raises(PeerError) as e:
        trust.check(good, f"spiffe://{TD}/node/c")
    assert e.value.cause == "wrong_peer"
    with pytest.raises(PeerError) as e:
        Trust("other.test").check(good)
    assert e.value.cause == "trust_domain"
    with pytest.raises(PeerError) as e:
        Trust(TD, frozenset({"b"})).check(good)
    assert e.value.cause == "revoked"
    monkeypatch.setenv(OFFSET_ENV, str(3 * 86400))  # the clock pushed past notAfter
    with pytest.raises(PeerError) as e:
        trust.check(good)
    assert e.value.cause == "expired"
    monkeypatch.setenv(OFFSET_ENV, str(-3 * 86400))
    with pytest.raises(PeerError) as e:
        trust.check(good)
    assert e.value.cause == "not_yet_valid"
    with pytest.raises(PeerError) as e:
        trust.check(None)
    assert e.value.cause == "no_client_cert"


def test_material_keeps_the_server_context_across_a_node_rotation(pki: Pki) -> None:
    tls = TlsMaterial("b")
    tls.apply(Identities(TD, str(pki.bundle), str(pki.node("b")), {"web": str(
        pki.service("web", "b"))}, generation=1))
    server = tls.server
    web = tls.client("web")
    assert server is not None and web is not None
    assert web.identity == f"spiffe://{TD}/svc/web"
    node = tls.client("unknown")
    assert node is not None and node.identity == f"spiffe://{TD}/node/b"
    rotated = pki.leaf("node-b-next", f"spiffe://{TD}/node/b", "node/b", "b")
    tls.apply(Identities(TD, str(pki.bundle), str(rotated), {"web": str(
        pki.service("web", "b"))}, generation=2))
    assert tls.server is server  # same context: its session tickets stay valid
    assert tls.client("web") is web  # unchanged certificate file: same sessions
    tls.apply(Identities(TD, str(pki.bundle), "", generation=3))
    assert not tls.ready and tls.client("web") is None
    tls.apply(Identities(TD, str(pki.bundle), "/nonexistent.pem", generation=4))
    assert not tls.ready  # unusable files: no mTLS, said in the log


def test_security_counters_reach_metrics_and_stay_monotonic() -> None:
    def reply(pid: int, n: int) -> object:
        stats = WorkerStats()
        for _ in range(n):
            stats.count("tls_handshakes", "server", "resumed")
        stats.count("authz_denied", "spiffe://t/svc/x", "web", "deny-x")
        p = stats.inbound_pair("spiffe://t/svc/a", "spiffe://t/svc/web")
        p.connections, p.active, p.bytes_up = n, 1, 10 * n
        return stats.to_wire(1, 0, pid, 0)

    acc = Accumulator()
    acc.update([reply(100, 5)])  # type: ignore[list-item]
    totals = acc.update([reply(200, 2)])  # type: ignore[list-item]  # restarted
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(lambda: snapshot(totals)))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(registry).decode())
               for s in fam.samples}
    ids = (("dst_identity", "spiffe://t/svc/web"), ("src_identity", "spiffe://t/svc/a"))
    assert samples[("meshnode_tls_handshakes_total",
                    (("result", "resumed"), ("side", "server")))] == 7
    assert samples[("meshnode_authz_denied_total",
                    (("dst", "web"), ("policy", "deny-x"), ("src", "spiffe://t/svc/x")))] == 2
    assert samples[("meshnode_inbound_connections_total", ids)] == 7
    assert samples[("meshnode_inbound_connections_active", ids)] == 1  # live worker only
    assert samples[("meshnode_inbound_bytes_total", (("direction", "up"), *ids))] == 70
    names = {f.family for f in SECURITY_FIELDS}
    assert all(f.startswith("meshnode_") for f in names)


def test_contexts_are_tls13_only_and_require_client_certs(pki: Pki) -> None:
    ctx = _context(True, str(pki.bundle), str(pki.node("b")))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_IGNORE_UNEXPECTED_EOF
    assert time.time() > 0


@pytest.mark.parametrize("skip", [True, False])
def test_a_resumed_handshake_told_to_skip_its_ticket_gets_none(pki: Pki, skip: bool) -> None:
    """skip_ticket once the server knows it resumed, before the client's Finished (as
    inbound.py calls it): the client keeps the session it offered, no NewSessionTicket comes;
    without it, a new ticket comes. Memory BIOs: each flight is handed over in turn."""
    server = _context(True, str(pki.bundle), str(pki.node("b")))
    client = _context(False, str(pki.bundle), str(pki.service("web", "a")))

    def handshake(session: ssl.SSLSession | None
                  ) -> tuple[ssl.SSLSession | None, bool, list[bool]]:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, session=session)
        s = server.wrap_bio(s_in, s_out, server_side=True)
        told: list[bool] = []
        for _ in range(4):
            with contextlib.suppress(ssl.SSLWantReadError):
                c.do_handshake()
            s_in.write(c_out.read())
            try:
                s.do_handshake()
            except ssl.SSLWantReadError:
                if skip and s.session_reused and not told:
                    told.append(skip_ticket(s))
            c_in.write(s_out.read())
        s.write(b"x")
        c_in.write(s_out.read())
        assert c.read(1) == b"x"  # after any NewSessionTicket
        return c.session, c.session_reused, told

    first, reused, _ = handshake(None)
    assert first is not None and first.has_ticket and not reused
    again, reused, told = handshake(first)
    assert reused and told == ([True] if skip else [])
    assert again is not None and (again.id == first.id) == skip
    assert handshake(again)[1]  # and what it kept still resumes


def test_a_stale_ticket_is_not_offered() -> None:
    """Past a quarter of its lifetime a ticket is not offered: the full handshake brings a
    fresh one (a resumed handshake brings none, skip_ticket)."""
    class Session:
        timeout = 7200

    ident = ClientIdentity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "id", {})
    ident.save("b", Session())  # type: ignore[arg-type]
    assert ident.session("b") is not None and not ident.stale("b")
    ident.sessions["b"] = (ident.sessions["b"][0], time.monotonic() - 7200 / 4 - 1)
    assert ident.stale("b") and ident.session("b") is None


def test_two_contexts_with_shared_ticket_keys_resume_each_others_sessions(pki: Pki) -> None:
    node = pki.node("b")
    client = _context(False, str(pki.bundle), str(pki.service("web", "a")))

    def handshake(server: ssl.SSLContext, session: ssl.SSLSession | None
                  ) -> tuple[ssl.SSLSession | None, bool]:
        a, b = socket.socketpair()
        a.settimeout(5)
        b.settimeout(5)
        s = server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        c = client.wrap_socket(b, do_handshake_on_connect=False, session=session)
        t = threading.Thread(target=lambda: (s.do_handshake(), s.sendall(b"x")))
        t.start()
        c.do_handshake()
        assert c.recv(1) == b"x"  # after the NewSessionTicket: the session can resume
        t.join(5)
        got = (c.session, c.session_reused)
        s.close()
        c.close()
        return got

    first, second, other = (_context(True, str(pki.bundle), str(node)) for _ in range(3))
    assert share_ticket_keys(first, node.read_bytes())
    assert share_ticket_keys(second, node.read_bytes())
    assert derive_keys(b"a") == derive_keys(b"a") != derive_keys(b"b")
    session, reused = handshake(first, None)
    assert session is not None and not reused
    assert handshake(second, session)[1]  # another worker's context
    assert not handshake(other, session)[1]  # its own random keys


def test_the_same_anchors_under_a_new_file_name_are_read_from_it(pki: Pki, tmp_path: Path
                                                                  ) -> None:
    """A revocation moves the bundle to a new file (new serial) with the same roots; the
    agent removes the old file soon after: later client contexts must load the new one."""
    import shutil

    first, second = tmp_path / "bundle-1.pem", tmp_path / "bundle-2.pem"
    shutil.copy(pki.bundle, first)
    tls = TlsMaterial("b")
    tls.apply(Identities(TD, str(first), str(pki.node("b")), {}, generation=1))
    shutil.copy(pki.bundle, second)
    tls.apply(Identities(TD, str(second), str(pki.node("b")), {
        "web": str(pki.service("web", "b"))}, revoked_nodes=("x",), generation=2))
    first.unlink()
    web = tls.client("web")  # a context made after the old file is gone
    assert web is not None and web.identity == f"spiffe://{TD}/svc/web"
